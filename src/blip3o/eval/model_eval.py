"""Evaluate a model end to end: generate and score ShapesGenEval, answer and score ShapesVQA, over seeds.

GenEval (`geneval_with_model`), per sampling seed s:
    <out>/seed_<s>/<index:05d>/metadata.jsonl, samples/<k:04d>.png   GenEval's sample layout
    <out>/seed_<s>/geneval_results.jsonl, geneval_scores.json, geneval_table.txt   that seed's scores
and over all seeds:
    <out>/geneval_summary.json   per category and overall: mean, std and the per-seed values
    <out>/geneval_summary.txt    the same as a table of mean ± std
    <out>/geneval_run.json       the seeds, prompts and sampler settings, written first (`resume` checks it)

Folder <index:05d> is the prompt's line in the evaluation prompt file whether or not a subset is evaluated,
so a folder name always means the same prompt. Every prompt gets its record's `n_samples` images.

What the images depend on: the model, the seed, the sampler settings, `batch_size`, and which prompts are
evaluated (all, or a `max_prompts` subset). The prompts' images are laid out prompt-major and cut into
batches of `batch_size`; batch b is one `Blip3o.generate` call seeded from (seed, b). Each image's noise
therefore depends on its batch's seed and its place in that batch; changing `batch_size` or the subset
changes the images (not the expected score). Per-image seeds would remove that dependence, but
`Blip3o.generate` draws a whole batch's noise from one generator, and a call per prompt would give up
batching. Same settings, same images (bit for bit on one machine).

Spread: std is the sample standard deviation over seeds (ddof=1); with one seed it is 0 by definition,
which is not a measured spread (the table says so).

VQA (`vqa_with_model`): the model answers with greedy decoding, which draws no random numbers, so a
sampling seed cannot change an answer. The set is answered and scored once; the seeds asked for are
recorded and the std is 0.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from blip3o.eval.geneval import METADATA_FILE, SAMPLES_SUBDIR, score_sample_folder, write_prompt_samples
from blip3o.eval.seeds import hashed_seed
from blip3o.eval.self_check import check_accept, generate_self_checked
from blip3o.eval.vqa import VQA_QUESTIONS, format_scores, score_answers, vqa_images, vqa_set
from blip3o.world.prompts import CATEGORIES, load_eval_prompts

if TYPE_CHECKING:
    from PIL import Image

    from blip3o.models.blip3o import Blip3o

SUMMARY_FILE = "geneval_summary.json"
RUN_FILE = "geneval_run.json"  # what a run generates (prompts, settings): checked before resuming it
SUMMARY_TABLE_FILE = "geneval_summary.txt"
DEFAULT_BATCH_SIZE = 64


def seed_dir(out_dir: str | Path, seed: int) -> Path:
    return Path(out_dir) / f"seed_{seed}"


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """The seeds as a list; ValueError if empty, negative or repeated (a repeat would share a folder)."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("need at least one seed")
    negative = [s for s in seeds if s < 0]
    if negative:
        raise ValueError(f"seeds must be >= 0, got {negative[0]}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {seeds}")
    return seeds


def batch_seed(seed: int, batch_index: int) -> int:
    """The generate() seed of one batch: a hash of (seed, batch index), so no two batches of any seed share
    noise (seed + batch_index would make seed 1's batch 0 equal seed 0's batch 1)."""
    return hashed_seed(seed, batch_index)


def balanced_subset(records: Sequence[dict], max_prompts: int | None) -> list[tuple[int, dict]]:
    """(index in `records`, record) of at most `max_prompts` prompts, as evenly spread over the six
    categories as their sizes allow (the remainder goes to the first categories in GenEval's order), each
    category's picks evenly spaced through it. None, or a number >= len(records), keeps every prompt."""
    indexed = list(enumerate(records))
    if max_prompts is None or max_prompts >= len(records):
        return indexed
    if max_prompts < 1:
        raise ValueError(f"max_prompts must be >= 1, got {max_prompts}")
    by_tag: dict[str, list[tuple[int, dict]]] = {}
    for item in indexed:
        by_tag.setdefault(item[1]["tag"], []).append(item)
    tags = [t for t in CATEGORIES if t in by_tag] + sorted(t for t in by_tag if t not in CATEGORIES)
    quota = dict.fromkeys(tags, 0)
    left = max_prompts
    while left:  # round-robin: a category with no prompts left passes its turn on
        open_tags = [t for t in tags if quota[t] < len(by_tag[t])]
        for tag in open_tags[:left]:
            quota[tag] += 1
        left -= min(left, len(open_tags))
    chosen = []
    for tag in tags:
        group, k = by_tag[tag], quota[tag]
        # Evenly spaced rather than the first k: the first prompts of a category share their first shape.
        chosen += [group[(i * len(group)) // k] for i in range(k)]
    return sorted(chosen, key=lambda item: item[0])


def plan_batches(n_samples: Sequence[int], batch_size: int) -> list[list[int]]:
    """The prompt positions of each batch: every prompt repeated n_samples times, prompt-major, cut into
    batches of `batch_size` images (a prompt's images may straddle two batches)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    flat = [position for position, n in enumerate(n_samples) for _ in range(n)]
    return [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]


def _mean_std(values: Sequence[float]) -> dict:
    values = [float(v) for v in values]
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "per_seed": values}


@contextmanager
def _eval_mode(model: Blip3o) -> Iterator[None]:
    """Evaluate in eval mode and give the model back in the mode it came in (a training loop may call us)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------- GenEval


def refuse_existing_samples(out_dir: Path, seeds: Sequence[int]) -> None:
    """Fail before generating anything if a seed's folder already holds prompt folders: a second run would
    otherwise fail half-way (write_prompt_samples refuses to mix runs) after minutes of sampling."""
    for seed in seeds:
        folder = seed_dir(out_dir, seed)
        if folder.is_dir() and any(p.is_dir() and p.name.isdigit() for p in folder.iterdir()):
            raise FileExistsError(
                f"{folder} already holds samples; give another output folder, remove it, or --resume the run"
            )


def prompt_folder_complete(folder: Path, index: int, record: dict) -> bool:
    """Whether <folder>/<index:05d> holds this record's metadata and all its n_samples images."""
    prompt_dir = folder / f"{index:05d}"
    try:
        metadata = json.loads((prompt_dir / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    expected = [f"{k:04d}.png" for k in range(int(record["n_samples"]))]
    written = sorted(p.name for p in (prompt_dir / SAMPLES_SUBDIR).glob("*.png"))
    return metadata == record and written == expected


def clear_partial_prompts(folder: Path, prompts: Sequence[tuple[int, dict]]) -> list[Path]:
    """Remove the prompt folders a killed run left half-written (some images, or no metadata), so that a
    resumed run can write them whole; returns what it removed. Complete folders are kept."""
    removed = []
    for index, record in prompts:
        prompt_dir = folder / f"{index:05d}"
        if prompt_dir.is_dir() and not prompt_folder_complete(folder, index, record):
            shutil.rmtree(prompt_dir)
            removed.append(prompt_dir)
    return removed


class ResumeError(ValueError):
    """The output folder holds a run that cannot be resumed with these settings."""


def check_resumable(out_dir: Path, run: dict) -> None:
    """Resuming: the folder's recorded run (RUN_FILE) must be this one: the same prompts, images per prompt,
    sampler settings and batch size; otherwise the resumed images would differ from the ones already there."""
    path = out_dir / RUN_FILE
    if not path.is_file():
        if any(seed_dir(out_dir, s).is_dir() for s in run["seeds"]):
            raise ResumeError(f"{out_dir} has samples but no {RUN_FILE}: cannot check it is the same run")
        return
    recorded = json.loads(path.read_text(encoding="utf-8"))
    # Runs recorded before decoder candidates (count guidance) existed decoded each sample once (had none).
    recorded["settings"] = {"decoder_candidates": 1, "count_guidance": 0.0, **recorded.get("settings", {})}
    differ = sorted(k for k in ("prompts", "settings") if recorded.get(k) != run[k])
    if differ:
        raise ResumeError(f"{out_dir} holds another run ({' and '.join(differ)} differ); cannot resume it")


def generate_seed(
    model: Blip3o,
    prompts: Sequence[tuple[int, dict]],
    folder: Path,
    seed: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    bar: tqdm | None = None,
    self_check: int = 1,
    self_check_accept: float | None = None,
    **sampling: float | int | None,
) -> int:
    """Generate every prompt's n_samples images with one seed and write them in GenEval's layout; returns how
    many images it sampled.

    prompts: (folder index, record) pairs; sampling: generate()'s steps, cfg_scale, decoder_steps,
    decoder_cfg_scale. A prompt's folder is written as soon as its last image exists (memory stays flat).
    Prompts whose folder is already complete (a resumed run) are not written again, and a batch holding only
    such prompts is not sampled: batches are seeded by their index, so the others' images are unchanged.
    self_check K > 1: each image is the best of K samples by the model's own check (blip3o.eval.self_check);
    self_check_accept p: of up to K, stopping at the first the model believes with probability >= p.
    """
    counts = [int(record["n_samples"]) for _, record in prompts]
    finished = {
        p for p, (index, record) in enumerate(prompts) if prompt_folder_complete(folder, index, record)
    }
    pending: dict[int, list[Image.Image]] = {}
    sampled = 0
    for b, positions in enumerate(plan_batches(counts, batch_size)):
        if set(positions) <= finished:  # resumed: every image of this batch is already written
            if bar is not None:
                bar.update(len(positions))
            continue
        texts = [prompts[p][1]["prompt"] for p in positions]
        # One candidate (self_check 1) is generate() itself.
        images, _ = generate_self_checked(
            model,
            texts,
            self_check,
            1,
            batch_seed(seed, b),
            self_check_accept,
            batch_size=len(texts),
            **sampling,
        )
        sampled += len(images)
        for position, image in zip(positions, images, strict=True):
            pending.setdefault(position, []).append(image)
            if len(pending[position]) == counts[position]:
                index, record = prompts[position]
                images_of_prompt = pending.pop(position)
                if position not in finished:
                    write_prompt_samples(folder, index, record, images_of_prompt)
        if bar is not None:
            bar.update(len(images))
    return sampled


def geneval_with_model(
    model: Blip3o,
    out_dir: str | Path,
    seeds: Sequence[int] = (0,),
    steps: int | None = None,
    cfg_scale: float | None = None,
    decoder_steps: int | None = None,
    max_prompts: int | None = None,
    progress: bool = True,
    decoder_cfg_scale: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    images_per_prompt: int | None = None,
    self_check: int = 1,
    self_check_accept: float | None = None,
    resume: bool = False,
    count_guidance: float = 0.0,
) -> dict:
    """Generate ShapesGenEval's images with `model` for each seed, score them with the ShapesWorld judge and
    aggregate over seeds. Sampler settings left as None are the model's own. `images_per_prompt` caps each
    prompt's `n_samples` (a quick check, not the benchmark). `self_check` K > 1 keeps each image as the best of
    K samples by the model's own check (K times the sampling; the summary's settings say so);
    `self_check_accept` p draws them in rounds and stops at the first the model believes (see
    blip3o.eval.self_check.generate_self_checked). `count_guidance` > 0 steers sampling towards the counts
    the prompt names (models/count_guidance.py). `resume` continues a killed run in the same `out_dir` (the
    same prompts and settings, checked against its RUN_FILE): complete prompt folders are kept, half-written
    ones redone, and the images are the ones an uninterrupted run would have made. Returns the
    summary written to <out_dir>/geneval_summary.json (see the module docstring for the layout)."""
    from blip3o.world.judge import detect

    seeds = check_seeds(seeds)
    if self_check < 1:
        raise ValueError(f"self_check must be >= 1 (1: off), got {self_check}")
    check_accept(self_check_accept)  # before anything is written
    out = Path(out_dir)
    records = load_eval_prompts()
    prompts = balanced_subset(records, max_prompts)
    if images_per_prompt is not None:
        if images_per_prompt < 1:
            raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
        prompts = [(i, {**r, "n_samples": min(int(r["n_samples"]), images_per_prompt)}) for i, r in prompts]
    sampling = {
        "steps": steps,
        "cfg_scale": cfg_scale,
        "decoder_steps": decoder_steps,
        "decoder_cfg_scale": decoder_cfg_scale,
        "count_guidance": count_guidance,
    }
    settings = {
        **sampling,
        **model.config.flow.guidance_interval(),
        "decoder_candidates": model.config.decoder.sample_candidates,
        "batch_size": batch_size,
        "self_check": self_check,
        "self_check_accept": self_check_accept,
        "device": str(model.device),
    }
    run = {
        "seeds": seeds,
        "prompts": [[index, int(record["n_samples"])] for index, record in prompts],
        "settings": {k: v for k, v in settings.items() if k != "device"},  # a CPU run may be resumed on a GPU
    }
    if resume:
        check_resumable(out, run)
        for seed in seeds:
            clear_partial_prompts(seed_dir(out, seed), prompts)
    else:
        refuse_existing_samples(out, seeds)
        if (out / RUN_FILE).is_file():  # other seeds of another run: one folder must not mix two runs
            check_resumable(out, run)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
    n_images = sum(int(r["n_samples"]) for _, r in prompts)

    per_seed: dict[int, dict] = {}
    timing: dict[int, dict] = {}
    with (
        _eval_mode(model),
        tqdm(total=n_images * len(seeds), desc="generate", unit="img", disable=not progress) as bar,
    ):
        for seed in seeds:
            folder = seed_dir(out, seed)
            start = time.perf_counter()
            sampled = generate_seed(
                model, prompts, folder, seed, batch_size, bar, self_check, self_check_accept, **sampling
            )
            generated = time.perf_counter()
            # The per-seed scores go next to the numbered folders, which readers of the layout skip.
            results = score_sample_folder(folder, detect, out_dir=folder, progress=False)
            per_seed[seed] = results.summary
            timing[seed] = {
                "generate_s": round(generated - start, 2),
                "score_s": round(time.perf_counter() - generated, 2),
                "sampled_images": sampled,  # fewer than images_per_seed when resumed
            }

    summary = {
        "benchmark": "ShapesGenEval",
        "subset": None if len(prompts) == len(records) else {"prompts": len(prompts), "of": len(records)},
        "prompts": len(prompts),
        "images_per_seed": n_images,
        "images_per_prompt_cap": images_per_prompt,
        "settings": settings,
        **aggregate_seeds(per_seed),
        "timing": timing,
    }
    write_summary(summary, out)
    return summary


def aggregate_seeds(per_seed: dict[int, dict]) -> dict:
    """Mean and std over seeds of per-seed `summarize` outputs: overall, and per category present in any."""
    seeds = list(per_seed)
    tags = [t for t in CATEGORIES if any(t in s["categories"] for s in per_seed.values())]
    categories = {}
    for tag in tags:
        accuracies = [per_seed[s]["categories"][tag]["accuracy"] for s in seeds]
        images = per_seed[seeds[0]]["categories"][tag]["images"]  # the same prompts for every seed
        categories[tag] = {**_mean_std(accuracies), "images": images}
    return {
        "seeds": seeds,
        "std": "sample standard deviation over seeds (ddof=1); 0 with one seed",
        "overall": _mean_std([per_seed[s]["overall"] for s in seeds]),
        "categories": categories,
        "missing_categories": [t for t in CATEGORIES if t not in categories],
        "per_seed": {str(s): per_seed[s] for s in seeds},
    }


def format_summary(summary: dict) -> str:
    """The mean ± std table of a geneval_with_model summary, with each seed's accuracy."""
    seeds = summary["seeds"]
    seed_cols = "".join(f"{'seed ' + str(s):>9}" for s in seeds)
    header = f"{'category':<14}{'images':>8}{'mean ± std':>20}{seed_cols}"
    lines = [
        f"ShapesGenEval with {len(seeds)} seed(s) ({', '.join(map(str, seeds))}): mean ± std over seeds",
        header,
        "-" * len(header),
    ]

    def row(name: str, images: int, stats: dict) -> str:
        values = "".join(f"{v:>9.4f}" for v in stats["per_seed"])
        return f"{name:<14}{images:>8}{stats['mean']:>11.4f} ± {stats['std']:.4f}{values}"

    for tag, stats in summary["categories"].items():
        lines.append(row(tag, stats["images"], stats))
    lines.append("-" * len(header))
    lines.append(row("overall", summary["images_per_seed"], summary["overall"]))
    if summary["missing_categories"]:
        lines.append(f"missing categories (not in the mean): {', '.join(summary['missing_categories'])}")
    if summary["subset"]:
        sub = summary["subset"]
        lines.append(
            f"SUBSET: {sub['prompts']} of {sub['of']} prompts (--max-prompts); not the full benchmark's score"
        )
    if len(seeds) == 1:
        lines.append("one seed: the std is 0 by definition, not a measured spread")
    else:
        lines.append("std: sample standard deviation over seeds (ddof=1)")
    settings = ", ".join(f"{k}={'model default' if v is None else v}" for k, v in summary["settings"].items())
    lines.append(f"settings: {settings}")
    return "\n".join(lines)


def write_summary(summary: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out_dir / SUMMARY_FILE, "table": out_dir / SUMMARY_TABLE_FILE}
    paths["summary"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    paths["table"].write_text(format_summary(summary) + "\n", encoding="utf-8")
    return paths


# ---------------------------------------------------------------------------------------------------- VQA

VQA_SEED_NOTE = (
    "greedy decoding draws no random numbers, so the seed cannot change an answer: "
    "answered and scored once, std 0"
)


def vqa_with_model(
    model: Blip3o,
    seeds: Sequence[int] = (0,),
    n_questions: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = 48,
    progress: bool = False,
) -> dict:
    """Answer the ShapesVQA set (all VQA_QUESTIONS, or the n_questions-question set) with
    `model.understand` in batches and score it.

    Returns score_answers' counts plus "overall" and "per_kind" as {"mean", "std"}, the seeds asked for, a
    note on why they do not matter (greedy decoding), and every answer by question id.
    """
    seeds = check_seeds(seeds)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = vqa_set(VQA_QUESTIONS if n_questions is None else n_questions)
    images = vqa_images(items)
    answers: dict[str, str] = {}
    start = time.perf_counter()
    with (
        _eval_mode(model),
        tqdm(total=len(items), desc="vqa", unit="q", disable=not progress) as bar,
    ):
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            replies = model.understand(
                [images[it.image_index] for it in chunk], [it.question for it in chunk], max_new_tokens
            )
            answers.update((it.id, reply.strip()) for it, reply in zip(chunk, replies, strict=True))
            bar.update(len(chunk))
    scores = score_answers(items, answers)
    return {
        "benchmark": "ShapesVQA",
        "seeds": seeds,
        "seed_note": VQA_SEED_NOTE,
        "full_set": len(items) == VQA_QUESTIONS,
        "overall": {"mean": scores["overall"], "std": 0.0},
        "per_kind": {k: {"mean": acc, "std": 0.0} for k, acc in scores["per_kind"].items()},
        "n": scores["n"],
        "correct": scores["correct"],
        "n_per_kind": scores["n_per_kind"],
        # Batching pads questions to a common length; greedy answers should not depend on it, but record it.
        "settings": {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "device": str(model.device)},
        "answer_s": round(time.perf_counter() - start, 2),
        "answers": answers,
    }


def format_vqa_summary(result: dict) -> str:
    """The table of a vqa_with_model result: accuracy per kind, then the overall mean ± std."""
    flat = {
        "overall": result["overall"]["mean"],
        "per_kind": {k: v["mean"] for k, v in result["per_kind"].items()},
        "n": result["n"],
        "n_per_kind": result["n_per_kind"],
        "missing": 0,  # the model answers every question
        "unexpected": 0,
    }
    overall = result["overall"]
    lines = [
        format_scores(flat),
        f"overall: {overall['mean']:.4f} ± {overall['std']:.4f} ({result['seed_note']})",
    ]
    if not result["full_set"]:
        lines.append(f"NOT THE BENCHMARK: a {result['n']}-question set, not the {VQA_QUESTIONS}-question one")
    return "\n".join(lines)
