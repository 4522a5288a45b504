"""The ShapesWorld preview: what the world looks like, what it says about itself, and how the judge scores it.

Writes an HTML page (index.html, images beside it) and one PNG grid (grid.png) that shows the same things.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from blip3o.eval.geneval import format_table, score_detections, summarize
from blip3o.viz import image_grid
from blip3o.world.conditioned import scene_for_prompt
from blip3o.world.language import Annotation, annotate
from blip3o.world.prompts import CATEGORIES, load_eval_prompts
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene

PROMPTS_PER_CATEGORY = 4  # 6 categories x 4 = 24 judged prompts
CELL = 192  # pixels per scene in the PNG grid (64 px scenes upscaled 3x, nearest neighbour)


@dataclass
class WorldExample:
    image: Image.Image
    annotation: Annotation


@dataclass
class JudgedExample:
    record: dict
    image: Image.Image
    detections: list
    correct: bool
    reason: str


def world_examples(n: int, seed: int) -> list[WorldExample]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng)
        out.append(WorldExample(render(scene), annotate(scene, rng)))
    return out


def pick_prompts(seed: int, per_category: int = PROMPTS_PER_CATEGORY) -> list[dict]:
    """A seeded choice of evaluation prompts, `per_category` from each of the six categories."""
    rng = np.random.default_rng(seed)
    records = load_eval_prompts()
    picked = []
    for tag in CATEGORIES:
        pool = [r for r in records if r["tag"] == tag]
        idx = rng.choice(len(pool), size=min(per_category, len(pool)), replace=False)
        picked += [pool[i] for i in sorted(idx)]
    return picked


def judged_examples(records: list[dict], seed: int, detect) -> list[JudgedExample]:
    rng = np.random.default_rng(seed)
    out = []
    for record in records:
        image = render(scene_for_prompt(record, rng))
        detections = detect(image)
        correct, reason = score_detections(record, detections)
        out.append(JudgedExample(record, image, detections, correct, reason))
    return out


def grid_image(world: list[WorldExample], judged: list[JudgedExample], columns: int = 8) -> Image.Image:
    """One PNG: world scenes with their short captions, then judged prompts with the verdict."""
    labels = [w.annotation.short_caption for w in world]
    labels += [
        f"{'PASS' if j.correct else 'FAIL'} {j.record['prompt'].removeprefix('a photo of ')}" for j in judged
    ]
    colors = ["black"] * len(world) + ["darkgreen" if j.correct else "darkred" for j in judged]
    title = f"ShapesWorld v1: {len(world)} random scenes, then {len(judged)} evaluation prompts scored by the judge"
    images = [w.image for w in world] + [j.image for j in judged]
    return image_grid(images, labels, columns=columns, cell=CELL, title=title, label_lines=3, colors=colors)


def _img_tag(path: str, alt: str) -> str:
    return f'<img src="{path}" alt="{html.escape(alt)}" width="192" height="192">'


def _detections_text(detections: list) -> str:
    if not detections:
        return "nothing found"
    return ", ".join(f"{d.color or '?'} {d.shape} ({d.confidence:.2f})" for d in detections)


def html_page(world: list[WorldExample], judged: list[JudgedExample], summary: dict) -> str:
    css = (
        "body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px}"
        "img{image-rendering:pixelated;border:1px solid #ccc}"
        ".cards{display:flex;flex-wrap:wrap;gap:16px}.card{width:300px}"
        "td,th{padding:4px 8px;text-align:left;vertical-align:top}.ok{color:#060}.bad{color:#a00}"
        "pre{background:#f6f6f6;padding:8px}"
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>ShapesWorld preview</title><style>{css}</style></head><body>"
    ]
    parts.append("<h1>ShapesWorld v1 preview</h1>")
    parts.append("<h2>Random scenes, their captions and questions</h2><div class='cards'>")
    for i, w in enumerate(world):
        a = w.annotation
        qa = "".join(f"<li>{html.escape(q.question)} <b>{html.escape(q.answer)}</b></li>" for q in a.qa)
        parts.append(
            f"<div class='card'>{_img_tag(f'world_{i:02d}.png', a.short_caption)}"
            f"<p><b>{html.escape(a.short_caption)}</b></p><p>{html.escape(a.long_caption)}</p><ul>{qa}</ul></div>"
        )
    parts.append("</div><h2>The judge on evaluation prompts</h2>")
    parts.append(f"<pre>{html.escape(format_table(summary))}</pre>")
    parts.append(
        "<table><tr><th>image</th><th>category</th><th>prompt</th><th>judge found</th><th>verdict</th></tr>"
    )
    for i, j in enumerate(judged):
        verdict = (
            "<span class='ok'>correct</span>"
            if j.correct
            else f"<span class='bad'>wrong: {html.escape(j.reason)}</span>"
        )
        parts.append(
            f"<tr><td>{_img_tag(f'judged_{i:02d}.png', j.record['prompt'])}</td><td>{j.record['tag']}</td>"
            f"<td>{html.escape(j.record['prompt'])}</td><td>{html.escape(_detections_text(j.detections))}</td>"
            f"<td>{verdict}</td></tr>"
        )
    parts.append("</table></body></html>")
    return "\n".join(parts)


def write_preview(out_dir: str | Path, seed: int = 0, n_world: int = 16, detect=None) -> dict:
    """Render the preview into out_dir; returns the judge summary plus the written paths."""
    if detect is None:
        from blip3o.world.judge import detect
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = world_examples(n_world, seed)
    judged = judged_examples(pick_prompts(seed), seed + 1, detect)
    summary = summarize({"tag": j.record["tag"], "correct": j.correct} for j in judged)
    for i, w in enumerate(world):
        w.image.save(out / f"world_{i:02d}.png")
    for i, j in enumerate(judged):
        j.image.save(out / f"judged_{i:02d}.png")
    (out / "index.html").write_text(html_page(world, judged, summary), encoding="utf-8")
    grid_image(world, judged).save(out / "grid.png")
    (out / "judge_scores.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return {"summary": summary, "html": out / "index.html", "grid": out / "grid.png"}
