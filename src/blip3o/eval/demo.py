"""`blip3o demo`'s work: a model at both of its jobs in about a minute on a CPU, scored the project's way.

Generation: 16 ShapesGenEval prompts (`balanced_subset` of the evaluation file: 3 each of single object, two
objects, counting and colours, 2 each of position and colour attribution), one image each from a single
batched `Blip3o.generate` call, judged by the ShapesWorld detector with GenEval's rules (`score_detections`,
`summarize`). Understanding: 8 fresh ShapesWorld scenes from world seed DEMO_WORLD_SEED + seed (far from the
small world seeds the training presets use, and from ShapesVQA's), the first 2 of each scene's generated
questions (two different kinds), answered in one `understand` batch and scored by exact match after
`normalize_answer`, as ShapesVQA is.

These are samples for a person to look at, not benchmark scores: 16 images and 16 questions are too few to
rank models (`blip3o eval geneval` / `blip3o eval vqa` give those). Writes, into the output folder:
    grid.png        the generated images with their prompts, PASS in green or FAIL in red
    report.html     self-contained (images embedded as base64 PNG): both tables, totals, model, seed, time
    summary.json    the same numbers and every item, for scripts
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from blip3o.data.shards import generate_sample
from blip3o.eval.geneval import format_table, score_detections, summarize
from blip3o.eval.model_eval import balanced_subset
from blip3o.eval.self_check import generate_self_checked
from blip3o.viz import image_grid
from blip3o.world.language import normalize_answer
from blip3o.world.prompts import load_eval_prompts
from blip3o.world.reasoning import final_answer
from blip3o.world.render import render

if TYPE_CHECKING:
    from blip3o.models.blip3o import Blip3o

DEMO_PROMPTS = 16
DEMO_SCENES = 8
QUESTIONS_PER_SCENE = 2
DEMO_WORLD_SEED = 8_000_003  # far from the training seeds (small numbers) and ShapesVQA's 2_000_003
MAX_NEW_TOKENS = 48  # as `blip3o eval vqa`: room for a relation reply's steps (world/reasoning.py)
GRID_FILE, REPORT_FILE, SUMMARY_FILE = "grid.png", "report.html", "summary.json"
CELL = 160  # grid pixels per image (64 px upscaled, nearest neighbour)
NOTE = (
    f"{DEMO_PROMPTS} prompts and {DEMO_SCENES * QUESTIONS_PER_SCENE} questions: a look at the model, "
    "not a benchmark score (run blip3o eval geneval / blip3o eval vqa for those)"
)


@dataclass
class Generated:
    """One demo prompt: its line in the evaluation file, its record, the image and the judge's verdict."""

    index: int
    record: dict
    image: Image.Image
    correct: bool
    reason: str


@dataclass
class Answered:
    """One demo question about scene `scene` of the demo world."""

    scene: int
    image: Image.Image
    question: str
    kind: str
    expected: str
    answer: str
    correct: bool


def demo_prompts() -> list[tuple[int, dict]]:
    """(index in the evaluation file, record) of the demo's prompts: the same on every run and machine."""
    return balanced_subset(load_eval_prompts(), DEMO_PROMPTS)


def sampling_settings(
    model: Blip3o,
    steps: int | None,
    cfg_scale: float | None,
    decoder_steps: int | None,
    self_check: int = 1,
    self_check_accept: float | None = None,
    count_guidance: float = 0.0,
) -> dict:
    """The sampler settings the demo runs with: those given, else the model's defaults, written as numbers
    so that a report says what was run (the CLIP + MSE objective ignores steps and guidance)."""
    flow, decoder = model.config.flow, model.config.decoder
    return {
        "objective": model.config.objective,
        "steps": flow.sample_steps if steps is None else steps,
        "cfg_scale": flow.cfg_scale if cfg_scale is None else cfg_scale,
        **flow.guidance_interval(),
        "decoder_steps": decoder.sample_steps if decoder_steps is None else decoder_steps,
        "decoder_cfg_scale": decoder.cfg_scale,
        "self_check": self_check,
        "self_check_accept": self_check_accept,
        "count_guidance": count_guidance,
    }


def generate_images(
    model: Blip3o, prompts: list[tuple[int, dict]], seed: int, settings: dict
) -> list[Image.Image]:
    """One image per prompt, all in one `generate` batch: the seed alone fixes every image. With
    settings' self_check K > 1 each is the model's self-checked pick of up to K (blip3o.eval.self_check)."""
    images, _ = generate_self_checked(
        model,
        [record["prompt"] for _, record in prompts],
        settings["self_check"],
        seed=seed,
        accept=settings["self_check_accept"],
        steps=settings["steps"],
        cfg_scale=settings["cfg_scale"],
        decoder_steps=settings["decoder_steps"],
        batch_size=len(prompts),
        count_guidance=settings["count_guidance"],
    )
    return images


def judge(prompts: list[tuple[int, dict]], images: list[Image.Image]) -> list[Generated]:
    """Each image judged against its prompt record: the detector, then GenEval's rules."""
    from blip3o.world.judge import detect

    out = []
    for (index, record), image in zip(prompts, images, strict=True):
        correct, reason = score_detections(record, detect(image))
        out.append(Generated(index, record, image, correct, reason))
    return out


def ask_about_scenes(model: Blip3o, seed: int) -> list[Answered]:
    """QUESTIONS_PER_SCENE questions about each of DEMO_SCENES fresh scenes, answered in one batch."""
    world_seed = DEMO_WORLD_SEED + seed
    asked: list[tuple[int, Image.Image, str, str, str]] = []
    for i in range(DEMO_SCENES):
        scene, annotation = generate_sample(world_seed, i)  # a shard's sample i, of a world nobody trains on
        image = render(scene)
        # `questions` takes the kinds in turn, so a scene's first questions are of different kinds.
        asked += [(i, image, qa.question, qa.kind, qa.answer) for qa in annotation.qa[:QUESTIONS_PER_SCENE]]
    replies = model.understand([a[1] for a in asked], [a[2] for a in asked], MAX_NEW_TOKENS)
    return [
        Answered(
            i,
            image,
            q,
            kind,
            expected,
            reply.strip(),
            normalize_answer(final_answer(reply)) == normalize_answer(expected),
        )
        for (i, image, q, kind, expected), reply in zip(asked, replies, strict=True)
    ]


# ------------------------------------------------------------------------------------------------ outputs


def geneval_summary(generated: list[Generated]) -> dict:
    """`summarize` over the demo's images (one per prompt), plus every prompt's verdict."""
    results = [{"folder": g.index, "tag": g.record["tag"], "correct": g.correct} for g in generated]
    items = [
        {
            "index": g.index,
            "prompt": g.record["prompt"],
            "tag": g.record["tag"],
            "correct": g.correct,
            "reason": g.reason,
        }
        for g in generated
    ]
    return {**summarize(results), "items": items}


def vqa_summary(answered: list[Answered], world_seed: int) -> dict:
    correct = sum(a.correct for a in answered)
    items = [{k: v for k, v in asdict(a).items() if k != "image"} for a in answered]
    return {
        "accuracy": correct / len(answered),
        "correct": correct,
        "n": len(answered),
        "world_seed": world_seed,
        "items": items,
    }


def grid_image(generated: list[Generated], seed: int) -> Image.Image:
    labels = [
        f"{'PASS' if g.correct else 'FAIL'} {g.record['prompt'].removeprefix('a photo of ')}"
        for g in generated
    ]
    colors = ["darkgreen" if g.correct else "darkred" for g in generated]
    passed = sum(g.correct for g in generated)
    title = f"blip3o demo, seed {seed}: {passed} of {len(generated)} prompts pass the judge (GenEval rules)"
    return image_grid(
        [g.image for g in generated], labels, columns=8, cell=CELL, title=title, label_lines=3, colors=colors
    )


def timing_text(timing: dict) -> str:
    """Where the time went, in words."""
    return (
        f"model load {timing['load_s']:.1f} s, generation {timing['generate_s']:.1f} s, "
        f"judging {timing['judge_s']:.1f} s, answering {timing['answer_s']:.1f} s"
    )


def _img(image: Image.Image, alt: str) -> str:
    """An <img> with the PNG inside the page (the report is one file that can be mailed or attached)."""
    buffer = io.BytesIO()
    image.save(buffer, format="png")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" width="128" height="128">'


def _verdict(ok: bool, why: str = "") -> str:
    if ok:
        return "<span class='ok'>pass</span>"
    return f"<span class='bad'>fail{': ' + html.escape(why) if why else ''}</span>"


def html_report(generated: list[Generated], answered: list[Answered], summary: dict) -> str:
    """The self-contained report page."""
    css = (
        "body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px}"
        "img{image-rendering:pixelated;border:1px solid #ccc}table{border-collapse:collapse;margin:12px 0}"
        "td,th{padding:4px 8px;text-align:left;vertical-align:middle;border-bottom:1px solid #eee}"
        ".ok{color:#060}.bad{color:#a00}pre{background:#f6f6f6;padding:8px}"
    )
    gen, vqa, timing = summary["geneval"], summary["vqa"], summary["timing"]
    settings = ", ".join(f"{k} {v}" for k, v in summary["settings"].items())
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>blip3o demo</title><style>{css}</style>"
        "</head><body><h1>blip3o demo</h1>",
        f"<p>model <code>{e(summary['model'])}</code>, seed {summary['seed']}, {e(settings)}; "
        f"{timing['total_s']:.1f} s ({e(timing_text(timing))}).</p>",
        f"<p><i>{e(NOTE)}.</i></p>",
        f"<h2>Generation: {sum(g.correct for g in generated)} of {len(generated)} prompts pass, "
        f"GenEval overall {gen['overall']:.3f}</h2>",
        f"<pre>{e(format_table(gen))}</pre>",
        "<table><tr><th>image</th><th>prompt</th><th>category</th><th>judge</th></tr>",
    ]
    for g in generated:
        parts.append(
            f"<tr><td>{_img(g.image, g.record['prompt'])}</td><td>{e(g.record['prompt'])}</td>"
            f"<td>{e(g.record['tag'])}</td><td>{_verdict(g.correct, g.reason)}</td></tr>"
        )
    parts.append(
        f"</table><h2>Understanding: {vqa['correct']} of {vqa['n']} answers correct "
        f"(accuracy {vqa['accuracy']:.3f})</h2>"
    )
    parts.append(
        "<table><tr><th>image</th><th>question</th><th>answer</th><th>expected</th><th>correct</th></tr>"
    )
    for a in answered:
        parts.append(
            f"<tr><td>{_img(a.image, f'scene {a.scene}')}</td><td>{e(a.question)}</td><td>{e(a.answer)}</td>"
            f"<td>{e(a.expected)}</td><td>{_verdict(a.correct)}</td></tr>"
        )
    parts.append("</table></body></html>")
    return "\n".join(parts)


def run_demo(
    model: Blip3o,
    model_path: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    steps: int | None = None,
    cfg_scale: float | None = None,
    decoder_steps: int | None = None,
    load_s: float = 0.0,
    self_check: int = 1,
    self_check_accept: float | None = None,
    count_guidance: float = 0.0,
) -> dict:
    """Generate and judge, ask and score, write grid.png, report.html and summary.json; return the summary.

    load_s: how long loading the model took (the caller loaded it), counted in the total time.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    settings = sampling_settings(
        model, steps, cfg_scale, decoder_steps, self_check, self_check_accept, count_guidance
    )
    prompts = demo_prompts()
    images = generate_images(model, prompts, seed, settings)
    made = time.perf_counter()
    generated = judge(prompts, images)
    judged = time.perf_counter()
    answered = ask_about_scenes(model, seed)
    done = time.perf_counter()
    files = {"grid": out / GRID_FILE, "report": out / REPORT_FILE, "summary": out / SUMMARY_FILE}
    summary = {
        "model": str(model_path),
        "seed": seed,
        "settings": {**settings, "device": str(model.device)},
        "note": NOTE,
        "geneval": geneval_summary(generated),
        "vqa": vqa_summary(answered, DEMO_WORLD_SEED + seed),
        "timing": {
            "load_s": round(load_s, 2),
            "generate_s": round(made - start, 2),
            "judge_s": round(judged - made, 2),
            "answer_s": round(done - judged, 2),
            "total_s": round(load_s + done - start, 2),
        },
        "files": {k: str(v) for k, v in files.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    grid_image(generated, seed).save(files["grid"])
    files["report"].write_text(html_report(generated, answered, summary), encoding="utf-8")
    files["summary"].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
