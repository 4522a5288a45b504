"""ShapesVQA: the held-out question set for image understanding, and its scorer.

The set is not stored anywhere: it is regenerated bit-exactly from `VQA_SEED`. Image i is ShapesWorld sample i
drawn with that seed (`blip3o.data.shards.generate_sample`), the same function that makes training shards,
so training shards must use any other seed (`blip3o world shards` refuses this one). Seeds are otherwise
free: 2_000_003 was picked to be far from the small seeds people type.

Questions are taken image by image, at most one per kind per image and at most `MAX_QUESTIONS_PER_IMAGE` per
image, most-needed kinds first, until every kind has its quota: the kinds end up exactly balanced
(`n_questions / 7` each, the remainder going to the first kinds of `QA_KINDS`).

Scoring is exact match after `normalize_answer` on both sides; a question without an answer counts wrong. A
reply that writes steps before its answer ("red cross bottom left, ..., so no") is scored on its final answer,
what follows the last ", so " (`world.reasoning.final_answer`); a reply without steps is its own answer.
Answer files are JSON lines, one `{"id": ..., "answer": ...}` per line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from blip3o.data.shards import generate_sample
from blip3o.world.language import QA_KINDS, QAPair, normalize_answer
from blip3o.world.reasoning import final_answer
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene
from blip3o.world.scene import Scene

VQA_SEED = 2_000_003
VQA_QUESTIONS = 2100
MAX_QUESTIONS_PER_IMAGE = 3


@dataclass(frozen=True)
class VQAItem:
    id: str
    seed: int
    image_index: int
    question: str
    answer: str
    kind: str

    def to_dict(self, with_answer: bool = True) -> dict:
        d = asdict(self)
        if not with_answer:
            del d["answer"]
        return d


def _quotas(n_questions: int) -> dict[str, int]:
    base, extra = divmod(n_questions, len(QA_KINDS))
    return {kind: base + (i < extra) for i, kind in enumerate(QA_KINDS)}


def vqa_set(n_questions: int = VQA_QUESTIONS, seed: int = VQA_SEED) -> list[VQAItem]:
    """The ShapesVQA questions, balanced across kinds; the same list on every call and every machine."""
    if n_questions < 1:
        raise ValueError(f"n_questions must be positive, got {n_questions}")
    remaining = _quotas(n_questions)
    items: list[VQAItem] = []
    image_index = 0
    while len(items) < n_questions:
        _, ann = generate_sample(seed, image_index)
        firsts: dict[str, QAPair] = {}
        for qa in ann.qa:  # the first question of each kind this image has
            firsts.setdefault(qa.kind, qa)
        # Most-needed kinds first, so that rare kinds (relation) are not starved by common ones.
        wanted = sorted(
            (qa for kind, qa in firsts.items() if remaining[kind] > 0),
            key=lambda qa: (-remaining[qa.kind], QA_KINDS.index(qa.kind)),
        )
        for qa in wanted[:MAX_QUESTIONS_PER_IMAGE]:
            remaining[qa.kind] -= 1
            items.append(
                VQAItem(f"shapesvqa-{len(items):05d}", seed, image_index, qa.question, qa.answer, qa.kind)
            )
        image_index += 1
    return items


def vqa_digest(items: Iterable[VQAItem]) -> str:
    """sha256 of the question set's canonical JSON: a fingerprint to check regeneration is bit-exact."""
    blob = json.dumps([it.to_dict() for it in items], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def vqa_scene(image_index: int, seed: int = VQA_SEED) -> Scene:
    # generate_sample draws the scene first from the same generator, so sampling it alone gives the same scene.
    return sample_scene(np.random.default_rng([seed, image_index]))


def vqa_images(items: Iterable[VQAItem]) -> dict[int, Image.Image]:
    """The rendered image of every distinct image the items ask about, by image index."""
    images: dict[int, Image.Image] = {}
    for it in items:
        if it.image_index not in images:
            images[it.image_index] = render(vqa_scene(it.image_index, it.seed))
    return images


def image_filename(image_index: int) -> str:
    return f"{image_index:06d}.png"


# ------------------------------------------------------------------------------------------------ scoring


def read_answers(path: str | Path) -> dict[str, str]:
    """Load a JSON-lines answer file; a later line for the same id replaces an earlier one."""
    answers: dict[str, str] = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            answers[str(record["id"])] = str(record["answer"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(
                f'{path}:{lineno}: expected {{"id": ..., "answer": ...}}, got {line[:80]!r}'
            ) from exc
    return answers


def score_answers(items: list[VQAItem], answers: Mapping[str, str]) -> dict:
    """Normalised exact-match accuracy per kind and overall (over all questions); missing answers are wrong.

    Returns {"overall", "per_kind": {kind: accuracy}, "n", "correct", "missing", "unexpected",
    "n_per_kind"}; "unexpected" counts answer ids that are not in the set (ignored for scoring).
    """
    total = {kind: 0 for kind in QA_KINDS}
    right = {kind: 0 for kind in QA_KINDS}
    missing = 0
    for it in items:
        total[it.kind] += 1
        given = answers.get(it.id)
        if given is None:
            missing += 1
        elif normalize_answer(final_answer(given)) == normalize_answer(it.answer):
            right[it.kind] += 1
    ids = {it.id for it in items}
    n, correct = len(items), sum(right.values())
    return {
        "overall": correct / n if n else 0.0,
        "per_kind": {k: right[k] / total[k] for k in QA_KINDS if total[k]},
        "n": n,
        "correct": correct,
        "missing": missing,
        "unexpected": sum(1 for a in answers if a not in ids),
        "n_per_kind": {k: total[k] for k in QA_KINDS if total[k]},
    }


def format_scores(scores: Mapping) -> str:
    """A plain-text table of `score_answers` output."""
    lines = [f"{'kind':<12} {'n':>5} {'accuracy':>9}"]
    for kind, acc in scores["per_kind"].items():
        lines.append(f"{kind:<12} {scores['n_per_kind'][kind]:>5} {acc:>9.3f}")
    lines.append(f"{'overall':<12} {scores['n']:>5} {scores['overall']:>9.3f}")
    if scores["missing"]:
        lines.append(f"({scores['missing']} questions had no answer and count as wrong)")
    if scores["unexpected"]:
        lines.append(f"({scores['unexpected']} answers had ids not in the set and were ignored)")
    return "\n".join(lines)
