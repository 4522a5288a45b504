"""Continue a trained model's recipe at a later stage: the whole model fills a run's earlier stages.

    python tools/reuse_model.py SOURCE_MODEL RUN_DIR --stages clip decoder ... generation
        [--source-note TEXT] [--curves SOURCE_CURVES.csv] [--samples CARD_SAMPLES_DIR] [--condition-word-tokens N]
        [--fresh-generation]

Why: a run folder is the only place a stage's optimizer state and curves live, and run folders do not travel
with the code (runs/ is git-ignored; a new checkout has none). The bundled model does. So a trial of a later
stage (another instruct stage, a refine stage) starts from the bundle: this exports SOURCE_MODEL, every weight,
as each of RUN_DIR/<stage>/model, and `blip3o train` resumes at the first stage not filled. Each later stage
starts, as in any run, with a fresh optimizer and fresh stage heads (e.g. the slot-label head).

It reads RUN_DIR/config.json (write it with `blip3o train ... --print-config > RUN_DIR/config.json`) and refuses a
source whose model config differs from the run's. A float16 source (the bundle) is cast to float32, the dtype
runs train in. `--condition-word-tokens N` first gives the source N word tokens in its condition
(`Blip3o.set_condition_word_tokens`: no weight added), for a run whose later stages train with them.
`--fresh-generation` fills the stages before `generation` with the source but its DiT and latent queries as a new
run of RUN_DIR's config initialises them (its seed): a trial of another generation side (a deeper DiT from
`generation` on, session 65) that keeps the trained backbone, CLIP and decoder. Refused for stages that train
the DiT.

Provenance, as tools/reuse_backbone.py writes it: each filled stage gets a `reused.json` (the source, with
`--source-note`, and this tool), which `blip3o card` reports in place of a training time. `--curves` copies each
filled stage's rows of the source's curves (a CSV written by `blip3o curves` or `blip3o card`, e.g. the previous
model card's curves.csv) as its log.jsonl; `--samples` copies a card's sample grids (`<stage>_step_*.png`) back to
`<stage>/samples/step_*.png`, so a card of the run still shows how the reused stages trained.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from stage_fill import (  # tools/ is on sys.path when this script runs
    fill_stage,
    read_run_config,
    read_stage_curves,
    reused_record,
)

from blip3o.models.blip3o import Blip3o
from blip3o.train.config import ConfigError, StageConfig
from blip3o.train.loop import check_model_config
from blip3o.train.stages import set_trainable

# What a new run's DiT side is: the weights --fresh-generation starts afresh.
GENERATION_SIDE = ("dit.", "backbone.latent_queries")


def trains_generation_side(model: Blip3o, stage: StageConfig) -> bool:
    """Whether `stage` trains any of the DiT or the latent queries, as `blip3o train` sets it up."""
    trained = set_trainable(model, stage.kind, stage.freeze_vision, stage.freeze_language)
    return any(name.startswith(GENERATION_SIDE) for name in trained)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="trained model folder, e.g. src/blip3o/bundled/model")
    parser.add_argument("run", type=Path, help="the run folder (its config.json is read)")
    parser.add_argument("--stages", nargs="+", required=True, help="stages to fill, in the run's order")
    parser.add_argument("--source-note", default="", help="where the source came from, for reused.json")
    parser.add_argument("--curves", type=Path, help="the source's training curves (CSV), copied per stage")
    parser.add_argument("--samples", type=Path, help="a model card's samples folder, copied per stage")
    parser.add_argument(
        "--condition-word-tokens", type=int, help="give the source this many condition word tokens first"
    )
    parser.add_argument(
        "--fresh-generation",
        action="store_true",
        help="the DiT and latent queries as a new run of the config starts them (the rest from the source)",
    )
    args = parser.parse_args(argv)

    run_config = read_run_config(args.run, "write the run's config first (--print-config)")
    if run_config is None:
        return 1
    names = [stage.name for stage in run_config.stages]
    if unknown := [s for s in args.stages if s not in names]:
        print(
            f"the run has no stage(s) {', '.join(unknown)}; its stages: {', '.join(names)}", file=sys.stderr
        )
        return 1
    if args.stages != names[: len(args.stages)]:
        print(
            f"fill the run's first stages in order ({', '.join(names)}), not {args.stages}", file=sys.stderr
        )
        return 1
    curves = read_stage_curves(args.curves, args.stages)
    if curves is None:
        return 1

    model = Blip3o.from_pretrained(args.source).float()
    if args.condition_word_tokens is not None:
        model.set_condition_word_tokens(args.condition_word_tokens)
    try:
        for (
            stage
        ) in args.stages:  # each stage's own model: a stage's deepen_dit_after changes it from there on
            check_model_config(
                model.config,
                run_config.stage_model(stage),
                f"{args.source} (for stage {stage})",
                "It cannot fill this run: give a source of the run's model config (--condition-word-tokens sets "
                "that field), or write the run's config.json from the source's recipe",
            )
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 1
    weights = "all"
    if args.fresh_generation:
        trains_dit = [s for s in args.stages if trains_generation_side(model, run_config.stage(s))]
        if trains_dit:
            print(
                f"--fresh-generation: stage(s) {', '.join(trains_dit)} train the DiT; fill fewer",
                file=sys.stderr,
            )
            return 1
        fresh = Blip3o.from_config(run_config.stage_model(args.stages[-1]), run_config.seed)
        # The same names the refusal above checks: what is reset and what must not be trained agree by construction.
        fresh_side = {k: v for k, v in fresh.state_dict().items() if k.startswith(GENERATION_SIDE)}
        model.load_state_dict(fresh_side, strict=False)  # the rest (missing here) stays the source's
        weights = f"all but the DiT and latent queries (fresh, seed {run_config.seed})"
    reused = reused_record(args.source, args.source_note, "tools/reuse_model.py", weights)
    if args.condition_word_tokens is not None:
        reused["condition_word_tokens"] = args.condition_word_tokens
    for stage in args.stages:
        fill_stage(model, args.run, stage, reused, args.curves, curves)
        if args.samples:
            for grid in sorted(args.samples.glob(f"{stage}_step_*.png")):
                (args.run / stage / "samples").mkdir(exist_ok=True)
                shutil.copyfile(grid, args.run / stage / "samples" / grid.name.removeprefix(f"{stage}_"))
        print(f"wrote {args.run / stage / 'model'} ({weights} of {args.source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
