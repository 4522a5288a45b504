"""The study's report: report.md (command, budget, findings, tables) and PNG plots, from results.json alone."""

from __future__ import annotations

from pathlib import Path

from blip3o.eval.frechet import FRECHET_NOTE
from blip3o.study.findings import decide_findings

ANALYSIS_FILE = (
    "analysis.md"  # optional hand-written interpretation, appended to report.md under its own heading
)

PLOTS = {
    # file: (title, y label, value of a point)
    "geneval_vs_step.png": ("ShapesGenEval overall vs training step", "GenEval overall", lambda p: p["geneval"]["overall"]),
    "geneval_vs_time.png": ("ShapesGenEval overall vs training time", "GenEval overall", lambda p: p["geneval"]["overall"]),
    "clip_score_vs_time.png": ("CLIP score (image-prompt cosine) vs training time", "CLIP score", lambda p: p["clip_score"]["mean"]),
    "diversity_vs_time.png": ("Sample diversity (CLIP, 1 - cos) vs training time", "diversity", lambda p: p["diversity"]["image"]),
    "vqa_vs_time.png": ("ShapesVQA accuracy vs training time", "VQA accuracy", lambda p: p["vqa"]["overall"]),
    "frechet_vs_time.png": ("CLIP-FD (not Inception-FID) vs training time", "CLIP-FD", lambda p: p["frechet_clip"]),
}  # fmt: skip


def write_plots(out: Path, results: dict) -> list[str]:
    """One PNG per quantity, a line per variant; x is the step for geneval_vs_step, training minutes otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, (title, ylabel, value) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant, state in results["variants"].items():
            points = state["points"]
            if not points:
                continue
            xs = [p["step"] if name.endswith("_step.png") else p["train_s"] / 60 for p in points]
            ax.plot(xs, [value(p) for p in points], marker="o", label=variant)
        base = results.get("base", {})
        if name == "vqa_vs_time.png" and "vqa" in base:
            ax.axhline(base["vqa"], color="grey", linestyle="--", label="stage-1 backbone")
        if name == "clip_score_vs_time.png" and "reference_clip_score" in base:
            ax.axhline(
                base["reference_clip_score"]["mean"], color="grey", linestyle="--", label="real renders"
            )
        ax.set_title(title)
        ax.set_xlabel("training step" if name.endswith("_step.png") else "training wall time (min)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)
    return written


SAMPLES_PNG = "samples.png"
SAMPLES_PER_VARIANT = 12


def write_sample_grid(out: Path, results: dict) -> str | None:
    """samples.png: a row per variant of its final point's first GenEval images (the same prompts and seed in
    every row), so the variants can be compared by eye."""
    from PIL import Image, ImageDraw

    from blip3o.eval.model_eval import seed_dir
    from blip3o.study.measure import generated_images

    seed = results["settings"]["seed"]
    rows: list[tuple[str, list[Image.Image]]] = []
    for variant, state in results["variants"].items():
        if not state["points"]:
            continue
        folder = seed_dir(out / variant / "points" / str(len(state["points"])) / "geneval", seed)
        if folder.is_dir():
            images, _ = generated_images(folder)
            rows.append((variant, images[:SAMPLES_PER_VARIANT]))
    if not rows:
        return None
    size, label_w = 64, 80
    width = label_w + size * max(len(images) for _, images in rows)
    grid = Image.new("RGB", (width, size * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (variant, images) in enumerate(rows):
        draw.text((4, r * size + size // 2 - 6), variant, fill="black")
        for c, image in enumerate(images):
            grid.paste(image.convert("RGB").resize((size, size)), (label_w + c * size, r * size))
    grid = grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST)
    grid.save(out / SAMPLES_PNG)
    return SAMPLES_PNG


def _number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _row(variant: str, p: dict, tokens: int | None) -> str:
    return (
        f"| {variant} | {p['point']} | {p['step']} | {p['train_s'] / 60:.1f} | {p['samples_per_s']:.1f} | "
        f"{p['geneval']['overall']:.3f} | {p['clip_score']['mean']:.4f} | {p['diversity']['image']:.4f} | {p['diversity']['target']:.4f} | "
        f"{p['frechet_clip']:.3f} | {p['vqa']['overall']:.3f} | {tokens} | {p['generation_images_per_s']:.2f} | "
        f"{_number(p['loss'])} |"
    )


def _environment(env: dict) -> str:
    return f"{env['cpus']} CPUs ({env['machine']}), {env['threads']} torch threads, torch {env['torch']}"


def format_report(results: dict) -> str:
    settings = results["settings"]
    variants = results["variants"]
    lines = [
        "# Design study on ShapesWorld",
        "",
        "Command(s) that produced this folder (a resume repeats the command):",
        "",
        *[f"    {c}" for c in results["commands"]],
        "",
        f"Budget: **{settings['budget_minutes']:g} min of training wall time per variant**, measured at "
        f"{settings['points']} equally spaced points; vae_fm's VAE (its stage 0) trained for a separate "
        f"{settings['vae_minutes']:g} min, not counted in the budget. Base model (CLIP, pixel decoder, stage-1 "
        f"backbone, shared by every variant; each variant starts with a fresh DiT and fresh queries, seed "
        f"{settings['seed']}): `{settings['base']}`. Machine: {_environment(results['environment'])}. Started "
        f"{results['started']}. Training time is time inside the optimisation loop; measurements, checkpoints "
        "and exports are excluded. Throughput depends on whatever else ran on the machine.",
        "",
        f"Measurements: ShapesGenEval on a category-balanced subset of {settings['geneval_prompts']} prompts x "
        f"{settings['images_per_prompt']} images (not the full benchmark); ShapesVQA on {settings['vqa_questions']} "
        f"questions; sample diversity over {settings['diversity_samples']} samples of each of "
        f"{settings['diversity_prompts']} prompts, as the mean pairwise 1 - cosine similarity of the project's CLIP "
        "image embeddings (0 = identical samples; 'DiT div.' is the same on the DiT's own outputs, before any "
        "pixel decoder); CLIP score: the mean cosine similarity of each GenEval image's CLIP embedding with its "
        f"prompt's; CLIP-FD: generated GenEval images against renders of the same prompts, as a {FRECHET_NOTE}. "
        "Sampling uses each model's default settings"
        + (f" with {settings['sample_steps']} DiT steps" if settings["sample_steps"] else "")
        + (f" and {settings['decoder_steps']} decoder steps" if settings["decoder_steps"] else "")
        + ".",
        "",
        "## Findings",
        "",
    ]
    for f in decide_findings(results):
        lines += [
            f"- **{f.claim}** — reproduced: **{f.verdict}**",
            f"  - rule: {f.rule}",
            f"  - evidence: {f.evidence}",
        ]
    lines += ["", "## Results at the final point", ""]
    header = (
        "| variant | point | step | train min | samples/s | GenEval | CLIP score | diversity | DiT div. | CLIP-FD | VQA | "
        "tokens/img | gen img/s | loss |"
    )
    sep = "|" + "---|" * (header.count("|") - 1)
    lines += [header, sep]
    for name, state in variants.items():
        if state["points"]:
            lines.append(_row(name, state["points"][-1], state.get("tokens_per_image")))
    base = results.get("base", {})
    if "vqa" in base:
        lines += [
            "",
            f"Stage-1 backbone (the sequential design's understanding): ShapesVQA {base['vqa']:.3f}.",
        ]
    if "reference_clip_score" in base:
        ref = base["reference_clip_score"]
        lines += [
            "",
            f"Real renders of the same GenEval prompts (the CLIP-FD reference set) have CLIP score {ref['mean']:.4f} "
            f"(std {ref['std']:.4f}, n = {ref['n']}): the level of a generator that draws exactly what is asked.",
        ]
    if "vae_stage" in variants.get("vae_fm", {}):
        v = variants["vae_fm"]["vae_stage"]
        lines += [
            "",
            f"vae_fm's VAE stage: {v['steps']} steps in {v['train_s'] / 60:.1f} min, final loss "
            f"{_number(v['final_loss'])}, reconstruction L1 "
            f"{v['reconstruction_l1']:.4f} on the CLIP-FD reference renders (pixels in [-1, 1]).",
        ]
    lines += ["", "## Every point", "", header, sep]
    for name, state in variants.items():
        lines += [_row(name, p, state.get("tokens_per_image")) for p in state["points"]]
    lines += ["", "## ShapesGenEval per category (final point)", ""]
    categories = sorted(
        {c for s in variants.values() if s["points"] for c in s["points"][-1]["geneval"]["categories"]}
    )
    if categories:
        lines += ["| variant | " + " | ".join(categories) + " |", "|" + "---|" * (len(categories) + 1)]
        for name, state in variants.items():
            if state["points"]:
                cats = state["points"][-1]["geneval"]["categories"]
                lines.append(
                    f"| {name} | " + " | ".join(f"{cats.get(c, float('nan')):.3f}" for c in categories) + " |"
                )
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({name})" for name in PLOTS]
    lines += [
        "",
        "## Samples (final point, the first GenEval prompts, the same sampling seed in every row)",
        "",
        f"![{SAMPLES_PNG}]({SAMPLES_PNG})",
    ]
    return "\n".join(lines) + "\n"


def analysis_section(out: Path) -> str:
    """`<out>/ANALYSIS_FILE`, if someone wrote one after the run, under a heading that says it is not measured
    output: the report's numbers and verdicts stay what the code computed."""
    path = out / ANALYSIS_FILE
    if not path.is_file():
        return ""
    return (
        "\n## Analysis (written by hand after the run, not generated)\n\n" + path.read_text().strip() + "\n"
    )


def write_report(out: Path, results: dict) -> Path:
    write_plots(out, results)
    write_sample_grid(out, results)
    path = out / "report.md"
    tmp = out / "report.md.tmp"
    tmp.write_text(format_report(results) + analysis_section(out))
    tmp.replace(path)
    return path
