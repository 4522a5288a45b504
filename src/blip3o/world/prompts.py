"""ShapesGenEval prompts: GenEval's six categories over ShapesWorld, in GenEval's JSON-lines schema.

A record is `{"tag": ..., "include": [...], "exclude": [...], "prompt": ...}` where each include is
`{"class": shape, "count": n}` plus optional `"color": c` and `"position": [relation, target_index]`
(the object must stand in `relation` to the objects matched by include `target_index`; as in GenEval the
target is listed first). An exclude `{"class": shape, "count": n}` fails an image holding n or more
objects of that shape.

Evaluation records carry one extra key, `"n_samples"`: how many images to generate for the prompt. It is
chosen per category so that every category is scored on at least `MIN_IMAGES_PER_CATEGORY` images
(GenEval generates a fixed 4 per prompt; its tooling reads only the keys above and ignores extra ones).

Two prompt files ship as package data (world/data/): `geneval_eval.jsonl`, the benchmark, and
`geneval_train.jsonl`, GenEval-style training prompts for instruction tuning that share no prompt string
with the benchmark. Both are pure functions of the vocabulary in scene.py; `write_prompt_files`
regenerates them bit-exactly.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

from .scene import COLOR_NAMES, NUMBER_WORDS, RELATIONS, SHAPES, plural

CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
MIN_IMAGES_PER_CATEGORY = 320
COUNTING_NUMBERS: tuple[int, ...] = (2, 3, 4)  # "two" .. "four": a ShapesWorld scene holds at most 4 objects
EVAL_COLOR_ATTR_PROMPTS = 400
TRAIN_COLORED_POSITION_PROMPTS = 400
# Openers of training paraphrases; the benchmark only uses DEFAULT_OPENER.
DEFAULT_OPENER = "a photo of"
PARAPHRASE_OPENERS: tuple[str, ...] = ("an image of", "a picture of", "a drawing of")
# Seeds of the hash-based selections below. Changing one changes the committed files.
EVAL_SEED = "shapes-geneval-eval-v1"
TRAIN_SEED = "shapes-geneval-train-v1"

EVAL_FILE = "geneval_eval.jsonl"
TRAIN_FILE = "geneval_train.jsonl"

Record = dict


def article(word: str) -> str:
    """'a' or 'an' for the word that follows (all ShapesWorld words are pronounced as spelled)."""
    return "an" if word[0].lower() in "aeiou" else "a"


def noun_phrase(shape: str, count: int = 1, color: str | None = None) -> str:
    """'a star', 'an orange circle', 'three stars', 'two red crosses'."""
    words = ([color] if color else []) + [plural(shape, count)]
    head = " ".join(words)
    if count == 1:
        return f"{article(head)} {head}"
    return f"{NUMBER_WORDS[count]} {head}"


def _include(
    shape: str, count: int = 1, color: str | None = None, position: tuple[str, int] | None = None
) -> dict:
    inc: dict = {"class": shape, "count": count}
    if color is not None:
        inc["color"] = color
    if position is not None:
        inc["position"] = [position[0], position[1]]
    return inc


def _record(tag: str, include: list[dict], exclude: list[dict], prompt: str) -> Record:
    return {"tag": tag, "include": include, "exclude": exclude, "prompt": prompt}


def single_object_record(shape: str, opener: str = DEFAULT_OPENER) -> Record:
    return _record("single_object", [_include(shape)], [], f"{opener} {noun_phrase(shape)}")


def two_object_record(shape_a: str, shape_b: str, opener: str = DEFAULT_OPENER) -> Record:
    if shape_a == shape_b:
        raise ValueError(f"two_object needs two different shapes, got {shape_a!r} twice")
    prompt = f"{opener} {noun_phrase(shape_a)} and {noun_phrase(shape_b)}"
    return _record("two_object", [_include(shape_a), _include(shape_b)], [], prompt)


def counting_record(shape: str, count: int, color: str | None = None, opener: str = DEFAULT_OPENER) -> Record:
    # The exclude makes 'exactly N': N + 1 objects of the shape (of any colour) fail the image.
    include = [_include(shape, count, color)]
    exclude = [{"class": shape, "count": count + 1}]
    return _record("counting", include, exclude, f"{opener} {noun_phrase(shape, count, color)}")


def colors_record(shape: str, color: str, opener: str = DEFAULT_OPENER) -> Record:
    return _record(
        "colors", [_include(shape, color=color)], [], f"{opener} {noun_phrase(shape, color=color)}"
    )


def position_record(
    shape: str,
    relation: str,
    target: str,
    color: str | None = None,
    target_color: str | None = None,
    opener: str = DEFAULT_OPENER,
) -> Record:
    """'a photo of a square left of a star': the target (star) is include 0, the square refers to it."""
    if shape == target:
        raise ValueError(f"position needs two different shapes, got {shape!r} twice")
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
    include = [_include(target, color=target_color), _include(shape, color=color, position=(relation, 0))]
    prompt = (
        f"{opener} {noun_phrase(shape, color=color)} {relation} {noun_phrase(target, color=target_color)}"
    )
    return _record("position", include, [], prompt)


def color_attr_record(
    shape_a: str, color_a: str, shape_b: str, color_b: str, opener: str = DEFAULT_OPENER
) -> Record:
    if shape_a == shape_b or color_a == color_b:
        raise ValueError("color_attr needs two different shapes in two different colours")
    include = [_include(shape_a, color=color_a), _include(shape_b, color=color_b)]
    prompt = f"{opener} {noun_phrase(shape_a, color=color_a)} and {noun_phrase(shape_b, color=color_b)}"
    return _record("color_attr", include, [], prompt)


# ---- the full prompt spaces of each category (fixed, documented order) ----


def _shape_pairs() -> list[tuple[str, str]]:
    return list(itertools.permutations(SHAPES, 2))


def all_single_object(opener: str = DEFAULT_OPENER) -> list[Record]:
    return [single_object_record(s, opener) for s in SHAPES]


def all_two_object(opener: str = DEFAULT_OPENER) -> list[Record]:
    return [two_object_record(a, b, opener) for a, b in _shape_pairs()]


def all_counting(opener: str = DEFAULT_OPENER) -> list[Record]:
    return [counting_record(s, n, opener=opener) for s in SHAPES for n in COUNTING_NUMBERS]


def all_colors(opener: str = DEFAULT_OPENER) -> list[Record]:
    return [colors_record(s, c, opener) for s in SHAPES for c in COLOR_NAMES]


def all_position(opener: str = DEFAULT_OPENER) -> list[Record]:
    return [position_record(a, rel, b, opener=opener) for a, b in _shape_pairs() for rel in RELATIONS]


def all_color_attr(opener: str = DEFAULT_OPENER) -> list[Record]:
    return [
        color_attr_record(a, ca, b, cb, opener)
        for a, b in _shape_pairs()
        for ca, cb in itertools.permutations(COLOR_NAMES, 2)
    ]


def _seeded_pick(records: Sequence[Record], k: int, seed: str) -> tuple[list[Record], list[Record]]:
    """Split records into a k-sized pick and the rest, both in the input order.

    The pick is the k records whose sha256(seed + prompt) is smallest: reproducible bit-exactly on any
    platform and library version (numpy's and Python's generators make no such promise).
    """
    if k > len(records):
        raise ValueError(f"cannot pick {k} of {len(records)} records")
    rank = sorted(range(len(records)), key=lambda i: _digest(seed, records[i]["prompt"]))
    chosen = set(rank[:k])
    picked = [r for i, r in enumerate(records) if i in chosen]
    rest = [r for i, r in enumerate(records) if i not in chosen]
    return picked, rest


def _digest(seed: str, text: str) -> str:
    return hashlib.sha256(f"{seed}\n{text}".encode()).hexdigest()


def images_per_prompt(prompts_in_category: int) -> int:
    """Images to generate per prompt so the category is scored on >= MIN_IMAGES_PER_CATEGORY images."""
    return math.ceil(MIN_IMAGES_PER_CATEGORY / prompts_in_category)


def build_eval_records() -> list[Record]:
    """The benchmark: every prompt of the five small categories plus a seeded sample of color_attr."""
    eval_color_attr, _ = _seeded_pick(all_color_attr(), EVAL_COLOR_ATTR_PROMPTS, EVAL_SEED)
    by_category = {
        "single_object": all_single_object(),
        "two_object": all_two_object(),
        "counting": all_counting(),
        "colors": all_colors(),
        "position": all_position(),
        "color_attr": eval_color_attr,
    }
    records = []
    for tag in CATEGORIES:
        n_samples = images_per_prompt(len(by_category[tag]))
        records += [{**r, "n_samples": n_samples} for r in by_category[tag]]
    return records


def build_train_records() -> list[Record]:
    """GenEval-style training prompts that never repeat a benchmark prompt string.

    - the color_attr combinations left out of the benchmark sample;
    - counting with a colour ("a photo of two red stars");
    - position with colours on both objects (a seeded sample);
    - the five small categories re-worded with other openers ("an image of a star").
    """
    _, held_out_color_attr = _seeded_pick(all_color_attr(), EVAL_COLOR_ATTR_PROMPTS, EVAL_SEED)
    colored_counting = [
        counting_record(s, n, c) for s in SHAPES for n in COUNTING_NUMBERS for c in COLOR_NAMES
    ]
    all_colored_position = [
        position_record(a, rel, b, ca, cb)
        for a, b in _shape_pairs()
        for rel in RELATIONS
        for ca, cb in itertools.product(COLOR_NAMES, repeat=2)
    ]
    colored_position, _ = _seeded_pick(all_colored_position, TRAIN_COLORED_POSITION_PROMPTS, TRAIN_SEED)
    paraphrases = [
        r
        for opener in PARAPHRASE_OPENERS
        for r in (
            all_single_object(opener)
            + all_two_object(opener)
            + all_counting(opener)
            + all_colors(opener)
            + all_position(opener)
        )
    ]
    return held_out_color_attr + colored_counting + colored_position + paraphrases


# ---- files ----


def to_jsonl(records: Iterable[Record]) -> str:
    """One compact JSON object per line, keys in insertion order, '\\n' line ends (the committed format)."""
    return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records)


def parse_jsonl(text: str, source: str = "<string>") -> list[Record]:
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}:{line_no}: not valid JSON: {err}") from err
    return records


def _packaged_text(name: str) -> str:
    return resources.files("blip3o.world").joinpath("data", name).read_text(encoding="utf-8")


def load_eval_prompts() -> list[Record]:
    """The committed benchmark prompt file (package data)."""
    return parse_jsonl(_packaged_text(EVAL_FILE), EVAL_FILE)


def load_train_prompts() -> list[Record]:
    """The committed training prompt file (package data)."""
    return parse_jsonl(_packaged_text(TRAIN_FILE), TRAIN_FILE)


def write_prompt_files(data_dir: str | Path) -> dict[str, Path]:
    """Regenerate both prompt files into data_dir (the package's world/data/ to update the committed ones)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {EVAL_FILE: data_dir / EVAL_FILE, TRAIN_FILE: data_dir / TRAIN_FILE}
    paths[EVAL_FILE].write_text(to_jsonl(build_eval_records()), encoding="utf-8", newline="\n")
    paths[TRAIN_FILE].write_text(to_jsonl(build_train_records()), encoding="utf-8", newline="\n")
    return paths


if __name__ == "__main__":
    # python -m blip3o.world.prompts: rewrite the committed files next to this module.
    for path in write_prompt_files(Path(__file__).parent / "data").values():
        print(f"wrote {path}")
