"""The `blip3o` command: a thin dispatcher to one module per command, each with `main(argv) -> int`.

Modules are imported lazily so that `blip3o --help` and light commands start fast.
"""

from __future__ import annotations

import importlib
import sys

# "command words" -> (module, one-line help). Each module defines main(argv: list[str] | None) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "world shards": ("blip3o.cli.world_shards", "write ShapesWorld webdataset shards"),
    "world preview": (
        "blip3o.cli.world_preview",
        "render a preview of ShapesWorld and its judge (HTML + PNG)",
    ),
    "eval geneval": (
        "blip3o.cli.eval_geneval",
        "ShapesGenEval: score a sample folder, or generate and score with --model",
    ),
    "eval vqa": ("blip3o.cli.eval_vqa", "ShapesVQA: score an answer file, or answer and score with --model"),
    "curves": (
        "blip3o.cli.curves",
        "a training run's loss curves as CSV + PNG (optionally over a reference)",
    ),
    "train": ("blip3o.cli.train", "train a preset's stages (resumable; torchrun for many processes)"),
    "generate": ("blip3o.cli.generate", "text -> images with a trained model (PNG files, optional grid)"),
    "ask": ("blip3o.cli.ask", "answer questions about images with a trained model"),
    "card": ("blip3o.cli.card", "a model card (scores, curves, grids, failures) from a finished run"),
    "demo": (
        "blip3o.cli.demo",
        "the model generating and answering, judged (grid.png, report.html, summary.json)",
    ),
    "study": (
        "blip3o.cli.study",
        "the paper's design study: generation designs on equal time budgets, measured, reported",
    ),
}


def _usage() -> str:
    width = max(len(k) for k in COMMANDS)
    lines = ["usage: blip3o <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `blip3o <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    for n_words in (2, 1):
        key = " ".join(argv[:n_words])
        if len(argv) >= n_words and key in COMMANDS:
            module = importlib.import_module(COMMANDS[key][0])
            return int(module.main(argv[n_words:]) or 0)
    print(f"blip3o: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
