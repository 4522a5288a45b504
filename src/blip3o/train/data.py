"""Training data: ShapesWorld shards held in memory, deterministic batches, per-stage batch contents.

Determinism is what makes resume exact and distributed runs equal to single-process ones: the samples of
global step s are a pure function of (seed, s), independent of the number of ranks. Each rank takes its
contiguous slice of every micro-batch, and per-sample choices (short or long caption, which question) are
drawn from a generator seeded by the sample's global position.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from blip3o.data.shards import ShardReadStats, iter_samples, write_shards
from blip3o.world.conditioned import scene_for_prompt
from blip3o.world.language import axis_questions as axis_questions_of
from blip3o.world.language import location_questions as location_questions_of
from blip3o.world.language import swap_shape_word
from blip3o.world.prompts import load_train_prompts
from blip3o.world.reasoning import relation_questions, spelled_relation
from blip3o.world.render import render
from blip3o.world.scene import Scene

log = logging.getLogger(__name__)

# Understanding prompts for the caption tasks (QA uses the sample's own questions).
SHORT_CAPTION_PROMPT = "Describe the image briefly."
LONG_CAPTION_PROMPT = "Describe the image in detail."


class DataError(RuntimeError):
    """Training data missing or unusable."""


@dataclass
class Example:
    image: Image.Image
    short_caption: str
    long_caption: str
    qa: list[tuple[str, str]]  # (question, answer)
    scene: Scene | None = None  # the scene graph it was rendered from (the "vision" stage's labels)


def load_shards(shard_dir: str | Path) -> tuple[list[Example], ShardReadStats]:
    """Read every readable shard into memory; corrupt shards are skipped and counted (see iter_samples)."""
    stats = ShardReadStats()
    examples = [
        Example(s.image, s.short_caption, s.long_caption, [(q.question, q.answer) for q in s.qa], s.scene)
        for s in iter_samples(shard_dir, stats=stats)
    ]
    if stats.shards_skipped:
        log.warning("skipped %d corrupt shard(s) in %s: %s", stats.shards_skipped, shard_dir, stats.skipped)
    if not examples:
        raise DataError(
            f"no readable ShapesWorld samples in {shard_dir} ({stats.shards_skipped} shards skipped)"
        )
    return examples, stats


def ensure_shards(
    shard_dir: Path, num_samples: int, seed: int, is_main: bool, barrier=lambda: None, progress: bool = True
) -> None:
    """Write the run's shards on first use (rank 0 only), so `blip3o train` is one command."""
    if is_main and not (shard_dir / "manifest.json").exists():
        log.info("writing %d ShapesWorld samples to %s", num_samples, shard_dir)
        write_shards(shard_dir, n=num_samples, seed=seed, progress=progress)
    barrier()


def instruct_examples(
    seed: int,
    renders_per_prompt: int,
    max_prompts: int | None = None,
    colourless_pair_renders: int = 0,
    counting_renders: int = 0,
) -> list[Example]:
    """Stage-3 data: every GenEval-style training prompt rendered `renders_per_prompt` times, with scenes that
    hold exactly what the prompt asks for (no distractors). Disjoint from the evaluation prompts. A prompt naming
    two kinds of object and no colour is rendered `colourless_pair_renders` times instead, a counting prompt
    `counting_renders` times, each when that is > 0."""
    records = load_train_prompts()[:max_prompts]
    out = []
    for i, record in enumerate(records):
        renders = renders_per_prompt
        if colourless_pair_renders and is_colourless_pair(record):
            renders = colourless_pair_renders
        if counting_renders and record["tag"] == "counting":
            renders = counting_renders
        for k in range(renders):
            scene = scene_for_prompt(record, np.random.default_rng([seed, i, k]), distractors=0)
            out.append(Example(render(scene), record["prompt"], record["prompt"], [], scene))
    return out


def is_colourless_pair(record: dict) -> bool:
    """A prompt record that names two kinds of object and no colour ("an image of a circle and a square")."""
    include = record["include"]
    return len(include) == 2 and all("color" not in q for q in include)


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    """The order of the data set in one epoch."""
    return np.random.default_rng([seed, epoch]).permutation(size)


@dataclass(frozen=True)
class BatchPlan:
    """Which dataset rows a rank uses at a given step and micro-step."""

    dataset_size: int
    global_batch: int
    grad_accum: int
    world_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.global_batch % (self.grad_accum * self.world_size):
            raise DataError(
                f"global batch {self.global_batch} must be divisible by grad_accum x world size "
                f"= {self.grad_accum} x {self.world_size}"
            )

    @property
    def micro_batch(self) -> int:
        """Rows per rank per micro-step."""
        return self.global_batch // (self.grad_accum * self.world_size)

    def positions(self, step: int, micro: int, rank: int) -> list[int]:
        """Global sample positions (a running count over epochs) of this rank's rows."""
        start = (
            step * self.global_batch
            + micro * (self.global_batch // self.grad_accum)
            + rank * self.micro_batch
        )
        return list(range(start, start + self.micro_batch))

    def rows(self, positions: list[int]) -> list[int]:
        out = []
        for pos in positions:
            epoch, offset = divmod(pos, self.dataset_size)
            out.append(int(_permutation(self.seed, epoch, self.dataset_size)[offset]))
        return out


def make_batch(
    kind: str,
    examples: list[Example],
    rows: list[int],
    positions: list[int],
    seed: int,
    short_prob: float,
    qa_share: float = 0.5,
    hard_negatives: bool = False,
    qa_turns: int = 1,
    location_questions: bool = False,
    axis_questions: bool = False,
    relation_steps: bool = False,
    relation_share: float = 0.0,
    relation_form: str = "truth",
) -> dict:
    """The contents one stage needs, for the given rows. Per-sample choices depend only on the position.

    Understanding samples are a question about the image with probability `qa_share`, else a short or long
    caption (half each). With `qa_turns` > 1 a question sample is a conversation of up to that many of the
    image's questions, in a random order (one forward pass then trains several answers). `location_questions`
    adds "where is the <object>?" to each image's questions (from its scene; `world.language.location_questions`),
    `axis_questions` the first-order twin of each of its relation questions (`world.language.axis_questions`).
    `relation_share` is the chance that a question sample keeps only its image's relation questions (where it has
    any; its twins and where-questions are added after), `relation_steps` writes each relation answer's steps out
    (`world.reasoning.relation_steps`, in `relation_form`: world.reasoning.RELATION_FORMS). `hard_negatives`
    adds, per sample, its caption with one shape swapped.
    """
    if relation_form != "truth" and not relation_steps:
        raise ValueError("relation_form is the form of the spelled-out relation answers: give relation_steps")
    images, captions, prompts, answers, negatives = [], [], [], [], []
    for row, pos in zip(rows, positions, strict=True):
        ex = examples[row]
        rng = np.random.default_rng([seed, pos, 7])
        qa = ex.qa
        # Its own generator, so a share of 0 leaves every other per-sample draw as it was.
        if relation_share and np.random.default_rng([seed, pos, 17]).random() < relation_share:
            qa = relation_questions(qa) or qa
        if location_questions:
            if ex.scene is None:
                raise DataError("location_questions needs the scene of every example (shards hold it)")
            qa = qa + [(q.question, q.answer) for q in location_questions_of(ex.scene)]
        if axis_questions:
            if ex.scene is None:
                raise DataError("axis_questions needs the scene of every example (shards hold it)")
            qa = qa + [(q.question, q.answer) for q in axis_questions_of(ex.scene, [q for q, _ in ex.qa])]
        if relation_steps:
            if ex.scene is None:
                raise DataError("relation_steps needs the scene of every example (shards hold it)")
            qa = [(q, spelled_relation(q, a, ex.scene, relation_form)) for q, a in qa]
        images.append(ex.image)
        captions.append(ex.short_caption if rng.random() < short_prob else ex.long_caption)
        task = rng.random()
        if qa and task < qa_share and qa_turns > 1:
            picked = [qa[i] for i in rng.permutation(len(qa))[:qa_turns]]
            question, answer = [q for q, _ in picked], [a for _, a in picked]
        elif qa and task < qa_share:
            question, answer = qa[int(rng.integers(len(qa)))]
        elif task < (1 + qa_share) / 2:
            question, answer = SHORT_CAPTION_PROMPT, ex.short_caption
        else:
            question, answer = LONG_CAPTION_PROMPT, ex.long_caption
        prompts.append(question)
        answers.append(answer)
        if hard_negatives:
            # Its own generator, so switching negatives on leaves every other per-sample draw unchanged.
            swapped = swap_shape_word(captions[-1], np.random.default_rng([seed, pos, 13]))
            negatives.append(swapped if swapped is not None else captions[-1])
    # One seed per sample for its diffusion draws (noise level, noise, CFG dropout): see per_sample_draws.
    batch: dict = {
        "images": images,
        "seeds": [int(np.random.SeedSequence([seed, pos, 11]).generate_state(1)[0]) for pos in positions],
    }
    # (decoder: read only when the stage conditions on the DiT's renditions, StageConfig.generated_share)
    if kind in ("clip", "decoder", "generation", "instruct", "joint"):
        batch["captions"] = captions
    if hard_negatives:
        batch["negative_captions"] = negatives
    if kind in ("understanding", "joint"):
        batch["prompts"], batch["answers"] = prompts, answers
    # Scene labels: the vision stage's, CLIP's optional patch labels, how many objects a generation caption
    # names before its relation sentences (the optional slot labels), and an understanding stage's optional
    # scene-embedding target tokens (StageConfig.target_tokens).
    if kind in ("vision", "clip", "generation", "instruct", "understanding"):
        batch["scenes"] = [examples[row].scene for row in rows]
    return batch
