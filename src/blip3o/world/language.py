"""ShapesWorld language: captions and question/answer pairs, all read off the scene graph.

Every statement is computed from the `Scene`, so it is true by construction; the random generator only picks
templates, orders and which questions to ask. Same scene + same generator state -> same annotation.

Canonical answers are single lowercase words: a colour name, a shape name (singular), "yes"/"no", or a count
written as a number word from "zero" to "four" (never digits). `normalize_answer` maps free-form answers onto
that form for scoring.

No caption starts with "a photo of": that phrase is reserved for the GenEval-style evaluation prompts, which
must not appear among training captions.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from .scene import (
    COLOR_NAMES,
    NUMBER_WORDS,
    SHAPE_PLURALS,
    SHAPES,
    Scene,
    SceneObject,
    plural,
    relations_between,
)

COUNT_WORDS: dict[int, str] = {0: "zero", **NUMBER_WORDS}
QA_KINDS: tuple[str, ...] = (
    "color",
    "shape",
    "count_total",
    "count_shape",
    "count_color",
    "exist",
    "relation",
)
MAX_SHORT_CAPTION_WORDS = 12
MIN_QA, MAX_QA = 5, 8
RESERVED_PREFIX = "a photo of"

COLUMNS: tuple[str, ...] = ("left", "centre", "right")
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
# Vertical relations read first: "above and left of" rather than "left of and above".
_RELATION_ORDER = ("above", "below", "left of", "right of")


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str
    kind: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QAPair:
        return cls(question=str(d["question"]), answer=str(d["answer"]), kind=str(d["kind"]))


@dataclass
class Annotation:
    short_caption: str
    long_caption: str
    qa: list[QAPair]


# --------------------------------------------------------------------------------------------- small words


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def count_word(n: int) -> str:
    return COUNT_WORDS[n]


# "<number> [colour] <shape>" in a prompt: "a red circle", "three stars", "an orange square".
_PHRASE_NUMBERS = {word: n for n, word in COUNT_WORDS.items() if n > 0} | {"a": 1, "an": 1}
_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{p: s for s, p in SHAPE_PLURALS.items()}}
_NOUN_PHRASE = re.compile(
    rf"\b({'|'.join(_PHRASE_NUMBERS)})\s+(?:({'|'.join(COLOR_NAMES)})\s+)?({'|'.join(_SHAPE_WORDS)})\b",
    re.IGNORECASE,
)


def noun_phrases(text: str) -> list[tuple[int, str | None, str]]:
    """The "<number> [colour] <shape>" phrases of a prompt as (count, colour or None, shape), in order:
    "a photo of a red circle and two stars" -> [(1, "red", "circle"), (2, None, "star")]."""
    return [
        (_PHRASE_NUMBERS[n.lower()], color.lower() or None, _SHAPE_WORDS[shape.lower()])
        for n, color, shape in _NOUN_PHRASE.findall(text)
    ]


def _choice(rng: np.random.Generator, options: list | tuple):
    return options[int(rng.integers(len(options)))]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def object_location(obj: SceneObject, size: int) -> tuple[str, str]:
    """(row, column) of the object's box centre in thirds of the canvas.

    The box centre, not the shape's own centre, because that is what a detector measures and what the
    relation rule uses.
    """
    cx, cy = (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2
    col = COLUMNS[min(int(cx * 3 / size), 2)]
    row = ROWS[min(int(cy * 3 / size), 2)]
    return row, col


def relation_on_axis(asked: str, holds: set[str]) -> str:
    """The relation that holds on the axis of the asked one ("left of" -> "left of" or "right of"; "above" ->
    "above" or "below"), or "level with" where neither does. Given where two objects are, this is first-order
    (one comparison decides it), where a yes / no answer to the asked relation is an XOR of it and the asked
    direction (bench/relation_text.py)."""
    if asked not in _RELATION_ORDER:
        raise ValueError(f"unknown relation {asked!r}; known: {', '.join(_RELATION_ORDER)}")
    pair = ("left of", "right of") if asked in ("left of", "right of") else ("above", "below")
    return next((r for r in pair if r in holds), "level with")


def location_phrase(row: str, col: str) -> str:
    return "in the centre" if (row, col) == ("middle", "centre") else f"in the {row} {col}"


def relation_phrase(relations: set[str]) -> str:
    return " and ".join(r for r in _RELATION_ORDER if r in relations)


# ---------------------------------------------------------------------------------------------- captions

_SHORT_TEMPLATES = (
    "{}",
    "{}",
    "a picture of {}",
    "an image of {}",
    "a drawing of {}",
    "{} on a plain background",
    "{} on a light background",
    "simple shapes: {}",
)


def _groups(scene: Scene) -> list[tuple[str, str, int]]:
    """(colour, shape, count) for each distinct coloured shape, in order of first appearance."""
    counts = Counter((o.color, o.shape) for o in scene.objects)
    return [(color, shape, n) for (color, shape), n in counts.items()]


def _group_phrase(color: str, shape: str, n: int, with_article: bool) -> str:
    if n > 1:
        return f"{count_word(n)} {color} {plural(shape, n)}"
    return f"{article(color)} {color} {shape}" if with_article else f"{color} {shape}"


def short_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A noun phrase naming every object, e.g. "two red circles and a blue star" (<= 12 words)."""
    groups = _groups(scene)
    order = int(rng.integers(3))
    if order == 1:  # most numerous first
        groups.sort(key=lambda g: -g[2])
    elif order == 2:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    template = _choice(rng, _SHORT_TEMPLATES)
    full = _join([_group_phrase(*g, with_article=True) for g in groups])
    compact = _join([_group_phrase(*g, with_article=False) for g in groups])
    # Four distinct singletons with articles and a prefix run past the limit: drop articles, then the template.
    # The bare compact list is at most 9 words (four "colour shape" pairs and one "and").
    for caption in (template.format(full), template.format(compact)):
        if len(caption.split()) <= MAX_SHORT_CAPTION_WORDS:
            return caption
    return compact


_OPENINGS = (
    "The image shows {n} {shapes} on a plain light background.",
    "There {are} {n} {shapes} on a light, plain background.",
    "A plain light background with {n} {shapes} on it.",
    "This picture contains {n} {shapes}.",
)
_OBJECT_SENTENCES = (
    "{a} {color} {shape} is {loc}.",
    "{loc}, there is {a} {color} {shape}.",
    "There is {a} {color} {shape} {loc}.",
    "{a} {color} {shape} sits {loc}.",
)
_RELATION_SENTENCES = (
    "{x} is {rel} {y}.",
    "{x} lies {rel} {y}.",
    "{x} is placed {rel} {y}.",
)


def _referring_expressions(scene: Scene) -> list[str | None]:
    """A definite description per object that picks it out uniquely, or None where none exists.

    "the red circle" when it is the only red circle, else "the red circle in the top left" when that is
    unique, else None (two identical shapes in the same ninth of the canvas).
    """
    combos = Counter((o.color, o.shape) for o in scene.objects)
    located = [(o.color, o.shape, object_location(o, scene.size)) for o in scene.objects]
    located_counts = Counter(located)
    names: list[str | None] = []
    for obj, key in zip(scene.objects, located, strict=True):
        if combos[(obj.color, obj.shape)] == 1:
            names.append(f"the {obj.color} {obj.shape}")
        elif located_counts[key] == 1:
            names.append(f"the {obj.color} {obj.shape} {location_phrase(*key[2])}")
        else:
            names.append(None)
    return names


def long_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Several sentences: how many shapes, each object with colour, shape and location, then the relations
    that hold between objects that can be named unambiguously."""
    objs = scene.objects
    n = len(objs)
    sentences = [
        _choice(rng, _OPENINGS).format(
            n=count_word(n), shapes="shape" if n == 1 else "shapes", are="is" if n == 1 else "are"
        )
    ]
    mentioned: set[tuple[str, str]] = set()
    for i in rng.permutation(n):
        obj = objs[i]
        # A second object of the same colour and shape is "another", so the text does not read as a repeat.
        a = "another" if (obj.color, obj.shape) in mentioned else article(obj.color)
        mentioned.add((obj.color, obj.shape))
        loc = location_phrase(*object_location(obj, scene.size))
        text = _choice(rng, _OBJECT_SENTENCES).format(a=a, color=obj.color, shape=obj.shape, loc=loc)
        sentences.append(_sentence(text))
    names = _referring_expressions(scene)
    referable = [i for i in rng.permutation(n) if names[i] is not None]
    for k, i in enumerate(referable):
        for j in referable[k + 1 :]:
            rels = relations_between(objs[i].box, objs[j].box)
            if not rels:
                continue
            text = _choice(rng, _RELATION_SENTENCES).format(x=names[i], rel=relation_phrase(rels), y=names[j])
            sentences.append(_sentence(text))
    return " ".join(sentences)


# ------------------------------------------------------------------------------------------------ questions


@dataclass(frozen=True)
class _Facts:
    """Counts read off the scene once, shared by the question generators."""

    scene: Scene
    shapes: Counter
    colors: Counter
    combos: Counter

    @classmethod
    def of(cls, scene: Scene) -> _Facts:
        objs = scene.objects
        return cls(
            scene,
            Counter(o.shape for o in objs),
            Counter(o.color for o in objs),
            Counter((o.color, o.shape) for o in objs),
        )


def _pick_unused(rng: np.random.Generator, keys: list, used: set):
    fresh = [k for k in keys if k not in used]
    if not fresh:
        return None
    key = _choice(rng, fresh)
    used.add(key)
    return key


def _ask_color(f: _Facts, rng: np.random.Generator, used: set) -> QAPair | None:
    key = _pick_unused(rng, [("color", s) for s in SHAPES if f.shapes[s] == 1], used)
    if key is None:
        return None
    shape = key[1]
    color = next(o.color for o in f.scene.objects if o.shape == shape)
    template = _choice(
        rng,
        (
            "what colour is the {}?",
            "what color is the {}?",
            "which colour is the {}?",
            "what is the colour of the {}?",
        ),
    )
    return QAPair(template.format(shape), color, "color")


def _ask_shape(f: _Facts, rng: np.random.Generator, used: set) -> QAPair | None:
    key = _pick_unused(rng, [("shape", c) for c in COLOR_NAMES if f.colors[c] == 1], used)
    if key is None:
        return None
    color = key[1]
    shape = next(o.shape for o in f.scene.objects if o.color == color)
    template = _choice(
        rng,
        (
            "what shape is the {} object?",
            "which shape is {}?",
            "what is the {} shape?",
            "what kind of shape is the {} one?",
        ),
    )
    return QAPair(template.format(color), shape, "shape")


def _ask_count_total(f: _Facts, rng: np.random.Generator, used: set) -> QAPair | None:
    if _pick_unused(rng, [("count_total",)], used) is None:
        return None
    template = _choice(
        rng,
        (
            "how many shapes are there?",
            "how many objects are in the image?",
            "how many shapes can you see?",
            "what is the number of shapes in the picture?",
        ),
    )
    return QAPair(template, count_word(len(f.scene.objects)), "count_total")


def _present_or_absent(rng: np.random.Generator, present: list, absent: list) -> list:
    """Half the time ask about something present, else something absent, so "zero" does not dominate."""
    if present and absent:
        return present if rng.random() < 0.5 else absent
    return present or absent


def _ask_count_shape(f: _Facts, rng: np.random.Generator, used: set) -> QAPair | None:
    present = [("count_shape", s) for s in SHAPES if f.shapes[s] > 0 and ("count_shape", s) not in used]
    absent = [("count_shape", s) for s in SHAPES if f.shapes[s] == 0 and ("count_shape", s) not in used]
    key = _pick_unused(rng, _present_or_absent(rng, present, absent), used)
    if key is None:
        return None
    shape = key[1]
    template = _choice(
        rng,
        ("how many {} are there?", "how many {} are in the picture?", "how many {} can you see?"),
    )
    return QAPair(template.format(SHAPE_PLURALS[shape]), count_word(f.shapes[shape]), "count_shape")


def _ask_count_color(f: _Facts, rng: np.random.Generator, used: set) -> QAPair | None:
    present = [("count_color", c) for c in COLOR_NAMES if f.colors[c] > 0 and ("count_color", c) not in used]
    absent = [("count_color", c) for c in COLOR_NAMES if f.colors[c] == 0 and ("count_color", c) not in used]
    key = _pick_unused(rng, _present_or_absent(rng, present, absent), used)
    if key is None:
        return None
    color = key[1]
    template = _choice(
        rng,
        (
            "how many {} shapes are there?",
            "how many {} objects can you see?",
            "how many shapes are {}?",
        ),
    )
    return QAPair(template.format(color), count_word(f.colors[color]), "count_color")


def _ask_exist(f: _Facts, rng: np.random.Generator, used: set) -> QAPair | None:
    want_yes = bool(rng.random() < 0.5)
    if rng.random() < 0.3:  # about a shape alone
        yes = [("exist", None, s) for s in SHAPES if f.shapes[s] > 0]
        no = [("exist", None, s) for s in SHAPES if f.shapes[s] == 0]
    else:
        yes = [("exist", c, s) for (c, s) in f.combos]
        # Absent combinations that share a colour or a shape with something present: the hard negatives.
        no = [
            ("exist", c, s)
            for c in COLOR_NAMES
            for s in SHAPES
            if (c, s) not in f.combos and (f.colors[c] > 0 or f.shapes[s] > 0)
        ]
    first, second = (yes, no) if want_yes else (no, yes)
    key = _pick_unused(rng, first, used) or _pick_unused(rng, second, used)
    if key is None:
        return None
    _, color, shape = key
    answer = "yes" if (f.combos[(color, shape)] if color else f.shapes[shape]) > 0 else "no"
    if color is None:
        template = _choice(
            rng, ("is there {a} {shape}?", "are there any {shapes}?", "can you see {a} {shape}?")
        )
        question = template.format(a=article(shape), shape=shape, shapes=SHAPE_PLURALS[shape])
    else:
        template = _choice(
            rng,
            (
                "is there {a} {color} {shape}?",
                "is there {a} {color} {shape} in the image?",
                "can you see {a} {color} {shape}?",
                "are there any {color} {shapes}?",
            ),
        )
        question = template.format(a=article(color), color=color, shape=shape, shapes=SHAPE_PLURALS[shape])
    return QAPair(question, answer, "exist")


def _ask_relation(f: _Facts, rng: np.random.Generator, used: set) -> QAPair | None:
    objs = f.scene.objects
    # Only objects that are the single one of their colour and shape: "the red circle" is then unambiguous.
    unique = [i for i, o in enumerate(objs) if f.combos[(o.color, o.shape)] == 1]
    yes, no = [], []
    for i in unique:
        for j in unique:
            if i == j or ("relation", frozenset((i, j))) in used:
                continue
            holds = relations_between(objs[i].box, objs[j].box)
            for rel in _RELATION_ORDER:
                (yes if rel in holds else no).append((i, j, rel))
    if not yes and not no:
        return None
    want_yes = bool(rng.random() < 0.5)
    first, second = (yes, no) if want_yes else (no, yes)
    i, j, rel = _choice(rng, first or second)
    used.add(("relation", frozenset((i, j))))
    a, b = objs[i], objs[j]
    answer = "yes" if rel in relations_between(a.box, b.box) else "no"
    template = _choice(
        rng,
        (
            "is the {x} {rel} the {y}?",
            "is the {x} positioned {rel} the {y}?",
            "would you say the {x} is {rel} the {y}?",
        ),
    )
    question = template.format(x=f"{a.color} {a.shape}", rel=rel, y=f"{b.color} {b.shape}")
    return QAPair(question, answer, "relation")


# The inverse of _ask_relation's and _ask_color's templates, for tools that rewrite or analyse those questions.
_RELATION_QUESTION = re.compile(
    r"the (\w+) (\w+) (?:positioned |is )?(left of|right of|above|below) the (\w+) (\w+)\?$"
)
_COLOR_QUESTION = re.compile(r"^(?:what|which) (?:is the )?colou?r (?:is|of) the (\w+)\?$")


def relation_question_parts(question: str) -> tuple[str, str, str, str, str] | None:
    """(colour A, shape A, relation, colour B, shape B) of a relation question; None for any other text."""
    match = _RELATION_QUESTION.search(question)
    return None if match is None else match.groups()


def named_object(scene: Scene, color: str, shape: str) -> SceneObject:
    """The scene's object of this colour and shape: the one a relation question names (it asks only about
    objects unique by both). StopIteration if there is none."""
    return next(o for o in scene.objects if (o.color, o.shape) == (color, shape))


def color_question_shape(question: str) -> str | None:
    """The shape a colour question asks about ("what colour is the star?" -> "star"); None for other text."""
    match = _COLOR_QUESTION.search(question)
    return None if match is None else match.group(1)


def location_questions(scene: Scene) -> list[QAPair]:
    """Where-questions: "where is the red circle?" -> "top left" (row, column in thirds of the canvas) for every
    object that is the only one of its colour and shape. A training-only kind: ShapesVQA (`QA_KINDS`) does not
    ask it. It is direct practice at finding a named object and reading where it is, which relation questions
    need twice."""
    combos = Counter((o.color, o.shape) for o in scene.objects)
    return [
        QAPair(f"where is the {o.color} {o.shape}?", " ".join(object_location(o, scene.size)), "location")
        for o in scene.objects
        if combos[(o.color, o.shape)] == 1
    ]


# The one-word answer of an axis question for each relation on the axis (`relation_on_axis`).
AXIS_ANSWERS = {
    "left of": "left",
    "right of": "right",
    "above": "above",
    "below": "below",
    "level with": "level",
}


def axis_questions(scene: Scene, asked: list[str]) -> list[QAPair]:
    """The first-order twin of each relation question among `asked`: "is the red circle right of the blue
    star?" -> "is the red circle left or right of the blue star?" -> "left" ("level" where neither holds; the
    axis's pair is "above or below" for above / below). A training-only kind ("axis"; ShapesVQA does not ask it).

    Why: given where both objects are, the yes / no of a relation question is an XOR of the asked direction and
    the objects' order on that axis, which gives gradient descent no first-order signal (the miniature's language
    model stays at chance on it for 3,000 text-only steps); the twin's answer is that order itself. Mixed in, it
    lets the plain yes / no be learned in text (bench/relation_text.py --task relation_mixed: 0.933 against
    0.53); with images that is not shown yet (docs/bench/understanding_position_trials.txt, session 46)."""
    twins = []
    for question in asked:
        parts = relation_question_parts(question)
        if parts is None:
            continue
        colour_a, shape_a, relation, colour_b, shape_b = parts
        a, b = named_object(scene, colour_a, shape_a), named_object(scene, colour_b, shape_b)
        pair = "left or right of" if relation in ("left of", "right of") else "above or below"
        truth = relation_on_axis(relation, relations_between(a.box, b.box))
        twin = f"is the {colour_a} {shape_a} {pair} the {colour_b} {shape_b}?"
        twins.append(QAPair(twin, AXIS_ANSWERS[truth], "axis"))
    return twins


_ASKERS = {
    "color": _ask_color,
    "shape": _ask_shape,
    "count_total": _ask_count_total,
    "count_shape": _ask_count_shape,
    "count_color": _ask_count_color,
    "exist": _ask_exist,
    "relation": _ask_relation,
}


def questions(scene: Scene, rng: np.random.Generator) -> list[QAPair]:
    """5 to 8 distinct questions, taking the kinds in turn (from a random start) so each image covers many."""
    n = int(rng.integers(MIN_QA, MAX_QA + 1))
    kinds = [QA_KINDS[i] for i in rng.permutation(len(QA_KINDS))]
    facts = _Facts.of(scene)
    used: set = set()
    qa: list[QAPair] = []
    while len(qa) < n and kinds:
        for kind in list(kinds):
            pair = _ASKERS[kind](facts, rng, used)
            if pair is None:
                kinds.remove(kind)
                continue
            qa.append(pair)
            if len(qa) == n:
                break
    return qa


def annotate(scene: Scene, rng: np.random.Generator) -> Annotation:
    return Annotation(short_caption(scene, rng), long_caption(scene, rng), questions(scene, rng))


# ---------------------------------------------------------------------------------------------- answers

_ARTICLES = frozenset(("a", "an", "the"))
_DIGITS = {str(k): w for k, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven"))}
_SINGULAR = {p: s for s, p in SHAPE_PLURALS.items()}


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation and articles removed, digits as number words, plural shapes singular.

    "Two." -> "two", "2" -> "two", "Stars" -> "star", "A red circle!" -> "red circle".
    """
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    words = [_SINGULAR.get(w, _DIGITS.get(w, w)) for w in words if w not in _ARTICLES]
    return " ".join(words)


# ------------------------------------------------------------------------------------------------ hard negatives

_SHAPE_WORD = re.compile(
    r"\b(" + "|".join(sorted([*SHAPES, *SHAPE_PLURALS.values()], key=len, reverse=True)) + r")\b"
)
_SHAPE_OF_WORD = {**{s: s for s in SHAPES}, **{p: s for s, p in SHAPE_PLURALS.items()}}


def swap_shape_word(caption: str, rng: np.random.Generator) -> str | None:
    """The caption with every mention of one of its shapes replaced by a different shape (number kept).

    Captions name every object, so the result describes a different multiset of (colour, shape) objects and is
    false of the image: a hard negative for contrastive training. None when the caption names no shape.
    """
    present = sorted({_SHAPE_OF_WORD[m.group(1)] for m in _SHAPE_WORD.finditer(caption)})
    if not present:
        return None
    old = present[int(rng.integers(len(present)))]
    new = [s for s in SHAPES if s != old][int(rng.integers(len(SHAPES) - 1))]

    def replace(match: re.Match) -> str:
        word = match.group(1)
        if _SHAPE_OF_WORD[word] != old:
            return word
        return new if word == old else SHAPE_PLURALS[new]

    return _SHAPE_WORD.sub(replace, caption)


_WORD_COUNTS = {word: n for n, word in COUNT_WORDS.items() if n > 0}


def caption_words(text: str) -> list[str]:
    """A caption's lowercase words, everything but the letters a-z dropped: "A red circle, left of..." ->
    ["a", "red", "circle", "left", "of", ...]."""
    return re.sub(r"[^a-z ]", " ", text.lower()).split()


def caption_objects(text: str) -> list[tuple[str, str | None]]:
    """Every object a caption or prompt names, in the order it names them, as (shape, colour or None).

    "two red circles and a star" -> [(circle, red), (circle, red), (star, None)]. A count word right before the
    colour (or the shape) repeats the object. Long captions name each object once in their location sentences,
    then again in the relation sentences: the first len(scene.objects) entries are the scene's objects.
    """
    words = caption_words(text)
    objects: list[tuple[str, str | None]] = []
    for i, word in enumerate(words):
        shape = _SHAPE_OF_WORD.get(word)
        if shape is None:
            continue
        before = i - 1
        color = words[before] if before >= 0 and words[before] in COLOR_NAMES else None
        if color is not None:
            before -= 1
        count = _WORD_COUNTS.get(words[before], 1) if before >= 0 else 1
        objects += [(shape, color)] * count
    return objects
