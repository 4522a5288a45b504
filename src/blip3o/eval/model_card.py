"""A model card built from a finished run folder: recipe, compute, scores, curves, sample grids, failures.

Everything in the card is read from the run (`blip3o train` writes config.json, <stage>/log.jsonl,
<stage>/samples/, <stage>/model and <out>/eval), so the numbers in it are the ones that run measured; nothing is
typed in by hand. Stage wall times come from `<stage>/stage_summary.json` when the run wrote one, else from the
files' modification times (the end of the previous stage to this stage's exported model), which the card says.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
from datetime import UTC, datetime
from pathlib import Path

import torch
from PIL import Image

from blip3o.eval.curves import plot, read_run, write_csv
from blip3o.models.vae import VaeConfig
from blip3o.train.config import ConfigError, RunConfig, migrate_saved_config
from blip3o.train.presets import overrides_from_preset
from blip3o.transport.flow_matching import FlowMatchingConfig
from blip3o.viz import image_grid
from blip3o.world.prompts import CATEGORIES

CARD_NAME = "MODEL_CARD.md"
EXAMPLES_PER_CATEGORY = 4


class ModelCardError(RuntimeError):
    """The run folder lacks what a card needs."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelCardError(f"cannot read {path}: {err}") from err


def stage_facts(run: Path, config: dict) -> list[dict]:
    """Per stage: kind, steps, batch, lr, first/last logged loss, median samples/s, wall time and its source."""
    facts = []
    previous_end = (run / "data" / "manifest.json").stat().st_mtime if (run / "data").exists() else None
    for stage in config["stages"]:
        name = stage["name"]
        log = [json.loads(line) for line in (run / name / "log.jsonl").read_text().splitlines() if line]
        if not log:
            raise ModelCardError(f"{run / name / 'log.jsonl'} is empty")
        end = (run / name / "model" / "config.json").stat().st_mtime
        summary_path = run / name / "stage_summary.json"
        reused_path = run / name / "reused.json"  # filled from another model (tools/reuse_backbone.py)
        reused = _read_json(reused_path) if reused_path.exists() else None
        resumed_at = 0
        if reused:
            wall, source = None, "reused"
        elif summary_path.exists():
            summary = _read_json(summary_path)
            wall, source = summary["wall_s"], "stage_summary.json"
            resumed_at = summary.get("resumed_at", 0)
        else:
            wall, source = (end - previous_end if previous_end else None), "file times"
        previous_end = end
        rates = sorted(r["samples_per_s"] for r in log if "samples_per_s" in r)
        facts.append(
            {
                "name": name,
                "kind": stage["kind"],
                "steps": stage["steps"],
                "batch_size": stage["batch_size"],
                "lr": stage["lr"],
                "first_loss": log[0]["loss"],
                "last_loss": log[-1]["loss"],
                "samples_per_s": rates[len(rates) // 2] if rates else None,
                "wall_s": wall,
                "wall_source": source,
                "resumed_at": resumed_at,
                "reused": reused,
            }
        )
    return facts


def _examples(
    results_path: Path, samples_root: Path, want_correct: bool, out: Path, title: str
) -> Path | None:
    """A grid of up to EXAMPLES_PER_CATEGORY images per category that the judge passed (or failed)."""
    if not results_path.exists():
        return None
    rows = [json.loads(line) for line in results_path.read_text().splitlines() if line]
    images, labels = [], []
    for tag in CATEGORIES:
        picked = [r for r in rows if r["tag"] == tag and bool(r["correct"]) == want_correct]
        step = max(1, len(picked) // EXAMPLES_PER_CATEGORY)  # spread through the category, not the first few
        for r in picked[::step][:EXAMPLES_PER_CATEGORY]:
            with Image.open(samples_root / r["image"]) as img:
                images.append(img.convert("RGB"))
            reason = "" if want_correct else f" | {r['reason']}"
            labels.append(f"[{tag}] {r['prompt']}{reason}")
    if not images:
        return None
    grid = image_grid(images, labels, columns=EXAMPLES_PER_CATEGORY, cell=160, title=title, label_lines=3)
    grid.save(out)
    return out


def _stage_row(f: dict, source_numbers: dict[tuple[str, str], int]) -> str:
    rate = "" if f["samples_per_s"] is None else f"{f['samples_per_s']:.0f}"
    wall = "" if f["wall_s"] is None else f"{f['wall_s'] / 60:.1f} min"
    if f["reused"]:
        # The source's name can be a long note; the table cites it by number, the sentence below names it once.
        wall = f"reused, see ({source_numbers[_reuse_key(f)]}) below"
    elif f["resumed_at"]:
        wall += f" (steps {f['resumed_at']}+ only)"
    return (
        f"| {f['name']} | {f['kind']} | {f['steps']} | {f['batch_size']} | {f['lr']:g} | "
        f"{f['first_loss']:.4f} | {f['last_loss']:.4f} | {rate} | {wall} |"
    )


def _mean_std(d: dict) -> str:
    return f"{d['mean']:.3f} ± {d['std']:.3f}"


def _model_section(model: dict) -> list[str]:
    """The components' sizes and what the DiT generates, from the run's resolved model config."""
    bb, clip, dit, dec = model["backbone"], model["clip"], model["dit"], model["decoder"]
    grid = clip["image_size"] // clip["patch_size"] // clip["target_pool"]
    channels = clip["vision_hidden"]
    k = clip.get("target_components", 0)
    if not k:
        target = "all channels"
    elif clip.get("target_basis", "pca") == "labels":
        target = (
            f"the {k} directions its label head reads, orthonormalised and whitened (mapped back to {channels} "
            "channels before the decoder)"
        )
    else:
        target = (
            f"the top {k} principal components of each, whitened (fitted on data with the feature statistics, "
            f"mapped back to {channels} channels before the decoder)"
        )
    if model.get("target", "clip") == "vae":
        vae = VaeConfig.from_dict(model["vae"])
        side = vae.latent_size
        target_line = f"- Generation target: VAE latents, {vae.latent_channels} channels x {side}x{side}."
    else:
        target_line = (
            f"- Generation target: {grid}x{grid} = {grid * grid} CLIP tokens of {channels} channels "
            f"({clip['image_size']} px, patch {clip['patch_size']}); the DiT generates {target}."
        )
    aux = []
    if clip.get("reconstruction_weight", 0):
        aux.append(f"a linear head redraws each patch's pixels (weight {clip['reconstruction_weight']})")
    if clip.get("patch_label_weight", 0) and clip.get("patch_label_kind", "coverage") == "object":
        aux.append(
            "a linear head reads from each patch token the object whose box centre lies in it (shape, colour, "
            f"centre offset, size, rotation; weight {clip['patch_label_weight']})"
        )
    elif clip.get("patch_label_weight", 0):
        aux.append(
            "a linear head reads from each patch token what the scene holds there: the covered share of each "
            f"class of {len(clip['patch_label_groups'])} groups (shape, colour) and {clip['patch_label_values']} "
            f"finer coverage values (weight {clip['patch_label_weight']})"
        )
    clip_line = "- CLIP: trained here, contrastive" + (f"; auxiliary: {'; '.join(aux)}." if aux else ".")
    objective_name = model.get("objective", "flow_matching")
    objective = objective_name.replace("_", " ")
    flow = FlowMatchingConfig(**model.get("flow", {}))  # the interval's fields are absent before session 34
    interval = (flow.cfg_sigma_min, flow.cfg_sigma_max)
    if objective_name == "flow_matching" and interval != (0.0, 1.0):
        objective += (
            f", sampled with guidance {flow.cfg_scale:g} while the noise level is in [{interval[0]:g}, "
            f"{interval[1]:g}] and {flow.outside_weight(flow.cfg_scale):g} elsewhere"
        )
    unet_channels = ", ".join(map(str, dec["block_out_channels"]))
    slots = dit.get("condition_slots", 0)  # absent in configs saved before the resampler existed
    words = bb.get("condition_word_tokens", 0)  # absent in configs saved before session 29
    read = (
        "the query states" if not words else f"the prompt's last {words} word embeddings and the query states"
    )
    resampler = (
        f" It reads {slots} slot tokens of a condition resampler ({dit['condition_resampler_layers']} layers) over "
        f"{read}, not those tokens themselves."
        if slots
        else (f" Its condition is {read}." if words else "")
    )
    return [
        "## Model",
        "",
        f"- Backbone: Qwen2.5-VL layout, {bb['num_layers']} layers of width {bb['hidden_size']}, a vision tower "
        f"of {bb['vision_depth']} blocks; {bb['n_queries']} learnable query tokens give the condition.",
        clip_line,
        target_line,
        f"- DiT: {dit['n_layers']} layers of width {dit['dim']}, {dit['n_heads']} heads, patch {dit['patch_size']}, "
        f"{dit['in_channels']} channels in and out; {objective}.{resampler}",
        f"- Pixel decoder: a diffusion UNet at {dec['image_size']} px (channels {unet_channels}), "
        f"{dec['sample_steps']} sampling steps{_candidates_phrase(dec.get('sample_candidates', 1))}.",
        "",
    ]


def _candidates_phrase(candidates: int) -> str:
    """How many decodes the model keeps one of (`PixelDecoderConfig.sample_candidates`); empty for one."""
    if candidates <= 1:
        return ""
    return (
        f"; each DiT sample is decoded {candidates} times and the decode whose CLIP reading agrees best with the "
        "sample is kept (models/decode_choice.py)"
    )


def sampler_phrase(settings: dict) -> str:
    """How a GenEval summary's images were sampled, as `blip3o eval geneval` options (empty: the defaults)."""
    options = [
        f"--{key.replace('_', '-')} {settings[key]}"
        for key in ("steps", "cfg_scale", "decoder_steps", "decoder_cfg_scale", "decoder_candidates")
        if settings.get(key) is not None
    ]
    if settings.get("count_guidance"):  # 0 (off) and older runs without the key say nothing
        options.append(f"--count-guidance {settings['count_guidance']:g}")
    if settings.get("self_check", 1) > 1:
        options.append(f"--self-check {settings['self_check']}")
        if settings.get("self_check_accept") is not None:
            options.append(f"--self-check-accept {settings['self_check_accept']}")
    return " ".join(options)


def other_sampler_section(run_summary: dict, other: dict, folder: Path) -> list[str]:
    """A table of another GenEval evaluation of the model (another sampler; its geneval_summary.json from
    `folder`) next to the run's own, category by category, with what each cost in sampling time."""
    settings = other.get("settings", {})
    # Evaluated before decoder candidates existed: one decode per sample.
    if settings and "decoder_candidates" not in settings:
        settings = {**settings, "decoder_candidates": 1}
    phrase = sampler_phrase(settings) or "the default sampler"

    def seconds(summary: dict) -> str:
        # A resumed seed's time covers only what was left of it (sampled_images says how much): not a cost.
        whole = summary.get("images_per_seed")
        times = [
            t["generate_s"]
            for t in summary.get("timing", {}).values()
            if t.get("sampled_images", whole) == whole
        ]
        return f"{sum(times) / len(times):,.0f} s" if times else "not measured (resumed)"

    def cell(summary: dict, tag: str | None) -> str:
        value = summary["overall"] if tag is None else summary["categories"].get(tag)
        return _mean_std(value) if value else "-"

    tags = [t for t in CATEGORIES if t in run_summary["categories"] or t in other["categories"]]
    return [
        f"Sampled with `{phrase}` (`{folder}`, seeds {other.get('seeds')}, {other.get('images_per_seed')} "
        "images per seed, the same judge), next to the run's own evaluation:",
        "",
        f"| category | run's sampler | {phrase} |",
        "|---|---|---|",
        *[f"| {tag} | {cell(run_summary, tag)} | {cell(other, tag)} |" for tag in tags],
        f"| **overall** | **{cell(run_summary, None)}** | **{cell(other, None)}** |",
        f"| sampling time per seed | {seconds(run_summary)} | {seconds(other)} |",
        "",
    ]


def _scores_section(run: Path, other_geneval: tuple[Path, ...] = ()) -> list[str]:
    summary_path = run / "eval" / "summary.json"
    if not summary_path.exists():
        return ["## Scores", "", "The run has no evaluation yet (`<run>/eval/summary.json` is missing).", ""]
    s = _read_json(summary_path)
    lines = ["## Scores", ""]
    if "geneval" in s:
        g = s["geneval"]
        geneval_summary = _read_json(run / "eval" / "geneval" / "geneval_summary.json")
        seeds = geneval_summary.get("seeds", [])
        lines += [
            f"ShapesGenEval (the project's judge, not the GenEval benchmark's detector), sampling seeds {seeds}, "
            f"{geneval_summary.get('images_per_seed')} images per seed; mean ± sample std over seeds:",
            "",
            "| category | accuracy |",
            "|---|---|",
            *[
                f"| {tag} | {_mean_std(g['categories'][tag])} |"
                for tag in CATEGORIES
                if tag in g["categories"]
            ],
            f"| **overall** (mean of categories) | **{_mean_std(g['overall'])}** |",
            "",
        ]
        for folder in other_geneval:
            other = _read_json(folder / "geneval_summary.json")
            lines += other_sampler_section(geneval_summary, other, folder)
    if "vqa" in s:
        v = s["vqa"]
        lines += [
            "ShapesVQA (greedy answers, so the seed does not matter; std is 0 by construction):",
            "",
            "| question kind | accuracy |",
            "|---|---|",
            *[f"| {kind} | {val['mean']:.3f} |" for kind, val in v["per_kind"].items()],
            f"| **overall** | **{v['overall']['mean']:.3f}** |",
            "",
        ]
    if s.get("note"):  # a summary put together by hand from separate evaluations says how
        lines += [f"Not measured by the run itself; how: {s['note']}.", ""]
        return lines
    lines += [
        "Measured by the run itself (`eval` section of its config); the same numbers come from "
        f"`blip3o eval geneval --model {run}/final --out DIR --seeds ...` and "
        f"`blip3o eval vqa --model {run}/final`.",
        "",
    ]
    return lines


def _reuse_key(f: dict) -> tuple[str, str]:
    return f["reused"]["source"], f["reused"]["tool"]


def reuse_source_numbers(facts: list[dict]) -> dict[tuple[str, str], int]:
    """(source model, tool) of the reused stages -> 1, 2, ... in stage order: how the table cites each source."""
    numbers: dict[tuple[str, str], int] = {}
    for f in facts:
        if f["reused"]:
            numbers.setdefault(_reuse_key(f), len(numbers) + 1)
    return numbers


def instruct_renders_phrase(config: dict) -> str:
    """How often stage 3 renders each training prompt: data.instruct_renders, and each instruct stage's
    colourless-pair and counting counts (absent before sessions 30 and 34)."""
    config = migrate_saved_config(config)
    phrase = f"{config['data']['instruct_renders']} renders each"
    kinds = {
        "colourless_pair_renders": "those naming two kinds of object and no colour",
        "counting_renders": "counting prompts",
    }
    for key, which in kinds.items():
        counts: dict[int, list[str]] = {}
        for stage in config["stages"]:
            count = stage.get(key, 0)
            if count:
                counts.setdefault(count, []).append(f"`{stage['name']}`")
        for count, names in counts.items():
            where = f"stage{'s' if len(names) > 1 else ''} {', '.join(names)}"
            phrase += f"; {count} in {where} for {which}"
    return phrase


# Stage settings that add a loss to a stage's own: the card names each with its weight (absent keys: configs
# saved before the field, when the loss did not exist).
EXTRA_LOSSES = {
    "slot_label_weight": "slot-label",
    "slot_position_weight": "slot-position",
    "slot_relation_weight": "slot-relation",
    "slot_binding_weight": "slot-binding",
    "count_weight": "count",
    "separation_weight": "separation (on its own samples)",
    "own_count_weight": "count by shape (on its own samples)",
    "cell_position_weight": "cell-position",
    "scene_embedding_weight": "scene-embedding",
}


def stage_objectives_sentence(config: dict) -> str:
    """What each stage trains beyond its kind's own loss: the extra losses with their weights, and for a decoder
    stage drawing the DiT's renditions, how many and from which start levels. Empty when no stage has any."""
    parts = []
    for stage in config["stages"]:
        extras = [f"{name} loss {stage[key]:g}" for key, name in EXTRA_LOSSES.items() if stage.get(key, 0)]
        if stage.get("count_weight", 0) and stage.get("count_by", "objects") == "shape":
            extras = [e.replace("count loss", "count loss by shape") for e in extras]
        if stage.get("own_count_weight", 0) and stage.get("own_count_target", "estimate") == "outcome":
            extras = [
                e.replace(
                    "count by shape (on its own samples)",
                    "count by shape (on its own samples, by their finished count)",
                )
                for e in extras
            ]
        if stage.get("own_min_sigma", 0) and (
            stage.get("separation_weight", 0) or stage.get("own_count_weight", 0)
        ):
            level = f"on its own samples at noise >= {stage['own_min_sigma']:g}"
            extras = [e.replace("on its own samples", level) for e in extras]
        if stage.get("generated_share", 0):
            pairs = stage.get("generated_pairs", "image")
            drawn = "the render of what CLIP reads in it" if pairs == "reading" else "the batch's image"
            extras.append(
                f"{stage['generated_share']:.0%} of conditions the DiT's renditions (start levels up to "
                f"{stage.get('generated_max_sigma', 0.6):g}), each drawn as {drawn}"
            )
        if stage.get("prompt_scenes", False):
            extras.append("on stage 3's prompt renders, not the shards")
        if copies := stage.get("deepen_dit_after", ()):
            layers = ", ".join(map(str, copies))
            extras.insert(0, f"first the DiT it receives deepened by gated-off copies of layers {layers}")
        if extras:
            parts.append(f"`{stage['name']}`: {', '.join(extras)}")
    return f"Beyond each kind's own loss: {'; '.join(parts)}." if parts else ""


def final_model_dict(config: dict) -> dict:
    """The run config's model as its last stage exports it: the DiT deeper by every stage's `deepen_dit_after`."""
    added = sum(len(stage.get("deepen_dit_after", ())) for stage in config["stages"])
    dit = config["model"]["dit"]
    return {**config["model"], "dit": {**dit, "n_layers": dit["n_layers"] + added}}


def recipe_command(config: dict, run: Path) -> str:
    """The command that trains this run's config with this code: its preset plus the overrides that differ."""
    command = f"blip3o train --preset {config['preset']} --out {run}"
    try:
        overrides = overrides_from_preset(RunConfig.from_dict(config))
    except (ConfigError, KeyError, TypeError, ValueError):
        overrides = None  # a config this code cannot read back: say so rather than guess
    if overrides is None:
        return f"`{command}` (with the differences in the run's config.json, which overrides cannot express)"
    return f"`{' '.join([command, *map(shlex.quote, overrides)])}`"


def wall_time_sentence(trained_s: float, sources: list[str]) -> str:
    """The card's total: seconds of the stages this run trained, and where those times come from."""
    if not sources:
        return "Training wall time: none; every stage was filled from another model (see below)."
    return (
        f"Training wall time: {trained_s / 60:.1f} min in all (from {', '.join(sources)}; shard writing before the "
        "first stage not included)."
    )


def provenance_sentences(facts: list[dict]) -> list[str]:
    """What the card says about stages this run did not train itself: one numbered sentence per (source model,
    tool) that filled stages, so stages reused from different models each name theirs; and one for resumed
    stages."""
    numbers = reuse_source_numbers(facts)
    by_source: dict[tuple[str, str], list[dict]] = {key: [] for key in numbers}
    for f in facts:
        if f["reused"]:
            by_source[_reuse_key(f)].append(f)
    sentences = []
    for (source, tool), group in by_source.items():
        logs = sorted({f["reused"].get("log", "") for f in group} - {""})
        sentences.append(
            f"({numbers[source, tool]}) Stage(s) {', '.join(f['name'] for f in group)} were not trained by this "
            "run: their weights "
            f"were copied from `{source}` by `{tool}`"
            + (f"; their curves are that model's training logs ({'; '.join(logs)})." if logs else ".")
        )
    resumed = [f for f in facts if f["resumed_at"]]
    if resumed:
        sentences.append(
            "Resumed stages report the wall time of their last session only: "
            + ", ".join(f"{f['name']} from step {f['resumed_at']}" for f in resumed)
            + "."
        )
    return sentences


def build_model_card(
    run_dir: str | Path,
    out_dir: str | Path,
    title: str = "blip3o ShapesWorld model",
    other_geneval: tuple[str | Path, ...] = (),
) -> Path:
    """Write <out>/MODEL_CARD.md with curves (PNG + CSV), sample grids and pass/fail examples; returns its path.

    other_geneval: folders of `blip3o eval geneval` runs of the same model with other samplers (such as
    --self-check), each tabled next to the run's own evaluation."""
    run, out = Path(run_dir), Path(out_dir)
    config = _read_json(run / "config.json")
    out.mkdir(parents=True, exist_ok=True)
    facts = stage_facts(run, config)
    curves = read_run(run)
    write_csv(curves, out / "curves.csv")
    plot(curves, out / "curves.png", title=f"{config['preset']} reference curves")
    grids = []
    for stage in config["stages"]:
        for png in sorted((run / stage["name"] / "samples").glob("*.png")):
            target = out / "samples" / f"{stage['name']}_{png.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, target)
            grids.append(target)
    seed0 = run / "eval" / "geneval" / "seed_0"
    results = seed0 / "geneval_results.jsonl"
    passed = _examples(results, seed0, True, out / "passes.png", "judged correct (seed 0)")
    failed = _examples(
        results, seed0, False, out / "failures.png", "judged wrong (seed 0), with the judge's reason"
    )

    trained = sum(f["wall_s"] or 0 for f in facts)
    sources = sorted({f["wall_source"] for f in facts} - {"reused"})
    reused = [f for f in facts if f["reused"]]
    provenance = provenance_sentences(facts)
    source_numbers = reuse_source_numbers(facts)
    lines = [
        f"# {title}",
        "",
        f"Card generated {datetime.now(UTC):%Y-%m-%d} by `blip3o card {run} --out {out}"
        + "".join(f" --other-geneval {f}" for f in other_geneval)
        + "` from the run folder.",
        "",
        "## Recipe",
        "",
        f"{recipe_command(config, run)}: "
        f"{'stages' if reused else 'every stage'} from scratch on ShapesWorld{' (see below)' if reused else ''}, "
        f"{config['data']['num_samples']:,} samples (world seed {config['data']['seed']}); stage 3 uses the "
        f"GenEval-style training prompts ({instruct_renders_phrase(config)}), disjoint from the evaluation "
        "prompts.",
        "",
        "| stage | kind | steps | batch | lr | first loss | last loss | samples/s (median) | wall |",
        "|---|---|---|---|---|---|---|---|---|",
        *[_stage_row(f, source_numbers) for f in facts],
        "",
        *([objectives, ""] if (objectives := stage_objectives_sentence(config)) else []),
        wall_time_sentence(trained, sources),
        "",
        *[line for p in provenance for line in (p, "")],
        *_model_section(final_model_dict(config)),
        "## Compute",
        "",
        f"{platform.machine()} CPU, {os.cpu_count()} cores visible, torch {torch.__version__}, fp32, one process. "
        "Throughput depends on what else runs on the machine; the figures above are as measured in this run.",
        "",
        *_scores_section(run, tuple(Path(f) for f in other_geneval)),
        "## Reference curves",
        "",
        "Loss per logged step for every stage: `curves.png`, data in `curves.csv`. Compare a run of your own "
        f"with `blip3o curves runs/mine --reference {out}/curves.csv`.",
        "",
        "![curves](curves.png)",
        "",
        "## Sample grids during training",
        "",
        "Fixed prompts, sampled at fixed steps of the generation stages (EMA weights):",
        "",
        *[f"![{g.stem}](samples/{g.name})" for g in grids],
        "",
        "## Known failure modes",
        "",
    ]
    if failed:
        lines += [
            "Images the judge failed, up to four per category, spread through the category, with its reason:",
            "",
            "![failures](failures.png)",
            "",
        ]
    if passed:
        lines += ["And images it passed, for comparison:", "", "![passes](passes.png)", ""]
    path = out / CARD_NAME
    path.write_text("\n".join(lines) + "\n")
    return path
