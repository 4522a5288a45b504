"""Scenes conditioned on a ShapesGenEval prompt record (see prompts.py for the schema).

`scene_for_prompt` samples a scene that satisfies the record; `near_miss_scene` one that fails it by a
single attribute (a colour, a count, a shape or a relation). Both are correct by construction, so this
module does not depend on the scorer in blip3o.eval (data flows world -> eval):

- the prompt's objects are placed exactly as asked (class, count, colour);
- distractors only use shapes the record does not name (in an include or an exclude), so they can
  neither add to a count nor be picked instead of a required object, whatever the detector's ranking;
- position includes become a constraint on the sampled boxes evaluated with `relations_between`, the
  same rule the scorer applies.

The test suite checks both functions against the scorer's scene-graph oracle on every benchmark prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .sampler import ObjectSpec, sample_scene
from .scene import (
    COLOR_NAMES,
    MAX_OBJECTS,
    OPPOSITE_RELATION,
    RELATIONS,
    SHAPES,
    Scene,
    SceneObject,
    relations_between,
)

NEAR_MISS_KINDS: tuple[str, ...] = ("color", "count", "shape", "relation")
Distractors = int | tuple[int, int]


@dataclass(frozen=True)
class _Slot:
    """One object to place: `group` is the include it belongs to, None for a distractor."""

    group: int | None
    spec: ObjectSpec


@dataclass(frozen=True)
class _Relation:
    """Every object of `group` must stand in `relation` to every object of `target`."""

    group: int
    relation: str
    target: int


def _validate(meta: dict) -> None:
    includes = meta.get("include", [])
    if not includes:
        raise ValueError(f"prompt record has no include: {meta!r}")
    classes = [inc["class"] for inc in includes]
    if len(set(classes)) != len(classes):
        raise ValueError(f"includes must name distinct shapes, got {classes}")
    for g, inc in enumerate(includes):
        if inc["class"] not in SHAPES:
            raise ValueError(f"unknown shape {inc['class']!r} in {meta['prompt']!r}")
        if inc.get("color") is not None and inc["color"] not in COLOR_NAMES:
            raise ValueError(f"unknown colour {inc['color']!r} in {meta['prompt']!r}")
        if "position" in inc:
            relation, target = inc["position"]
            if relation not in RELATIONS or not 0 <= target < g:
                raise ValueError(f"bad position {inc['position']!r} in {meta['prompt']!r}")
    if sum(int(inc["count"]) for inc in includes) > MAX_OBJECTS:
        raise ValueError(f"{meta['prompt']!r} asks for more than {MAX_OBJECTS} objects")
    for exc in meta.get("exclude", []):
        for inc in includes:
            if inc["class"] == exc["class"] and int(exc["count"]) <= int(inc["count"]):
                raise ValueError(f"{meta['prompt']!r}: the exclude {exc!r} contradicts the include {inc!r}")


def _named_shapes(meta: dict) -> set[str]:
    return {r["class"] for r in meta.get("include", []) + meta.get("exclude", [])}


def _required_slots(meta: dict) -> list[_Slot]:
    return [
        _Slot(g, ObjectSpec(inc["class"], inc.get("color")))
        for g, inc in enumerate(meta["include"])
        for _ in range(int(inc["count"]))
    ]


def _required_relations(meta: dict) -> list[_Relation]:
    return [
        _Relation(g, inc["position"][0], int(inc["position"][1]))
        for g, inc in enumerate(meta["include"])
        if "position" in inc
    ]


def _distractor_slots(
    rng: np.random.Generator, meta: dict, distractors: Distractors, n_placed: int, at_least: int = 0
) -> list[_Slot]:
    lo, hi = (distractors, distractors) if isinstance(distractors, int) else distractors
    if not 0 <= lo <= hi:
        raise ValueError(
            f"distractors must be a count or an inclusive (low, high) range, got {distractors!r}"
        )
    free_shapes = [s for s in SHAPES if s not in _named_shapes(meta)]
    n = max(int(rng.integers(lo, hi + 1)), at_least)
    n = min(n, MAX_OBJECTS - n_placed) if free_shapes else 0
    return [_Slot(None, ObjectSpec(free_shapes[int(rng.integers(len(free_shapes)))])) for _ in range(n)]


def _sample(rng: np.random.Generator, slots: Sequence[_Slot], relations: Sequence[_Relation]) -> Scene:
    # Shuffle so that the required objects are not always placed first (placement order skews positions).
    order = [slots[i] for i in rng.permutation(len(slots))]
    groups = [slot.group for slot in order]

    def satisfied(objects: Sequence[SceneObject]) -> bool:
        for rel in relations:
            members = [o for o, g in zip(objects, groups, strict=True) if g == rel.group]
            targets = [o for o, g in zip(objects, groups, strict=True) if g == rel.target]
            if not all(rel.relation in relations_between(a.box, b.box) for a in members for b in targets):
                return False
        return True

    return sample_scene(rng, [slot.spec for slot in order], constraint=satisfied if relations else None)


def scene_for_prompt(meta: dict, rng: np.random.Generator, distractors: Distractors = (0, 2)) -> Scene:
    """A scene that satisfies the prompt record; `distractors` (a count or an inclusive range) adds objects
    of shapes the prompt does not name, as room allows (a scene holds at most MAX_OBJECTS)."""
    _validate(meta)
    required = _required_slots(meta)
    slots = required + _distractor_slots(rng, meta, distractors, len(required))
    scene = _sample(rng, slots, _required_relations(meta))
    return dataclasses.replace(scene, meta={"prompt": meta["prompt"], "tag": meta["tag"]})


def near_miss_kinds(meta: dict) -> tuple[str, ...]:
    """The near-miss kinds that apply to a prompt record."""
    includes = meta.get("include", [])
    applies = {
        "color": any(inc.get("color") is not None for inc in includes),
        "count": True,
        "shape": bool(set(SHAPES) - _named_shapes(meta)),
        "relation": any("position" in inc for inc in includes),
    }
    return tuple(k for k in NEAR_MISS_KINDS if applies[k])


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _wrong_color(rng: np.random.Generator, slots: list[_Slot]) -> list[_Slot]:
    colored = [i for i, s in enumerate(slots) if s.spec.color is not None]
    # Swapping the colours of two objects of different groups is the classic attribute-binding failure.
    swappable = [
        (i, j) for i in colored for j in colored if slots[i].group < slots[j].group
        and slots[i].spec.color != slots[j].spec.color
    ]  # fmt: skip
    slots = list(slots)
    if swappable and rng.random() < 0.5:
        i, j = _pick(rng, swappable)
        a, b = slots[i], slots[j]
        slots[i] = _Slot(a.group, ObjectSpec(a.spec.shape, b.spec.color))
        slots[j] = _Slot(b.group, ObjectSpec(b.spec.shape, a.spec.color))
        return slots
    i = _pick(rng, colored)
    old = slots[i]
    new_color = _pick(rng, [c for c in COLOR_NAMES if c != old.spec.color])
    slots[i] = _Slot(old.group, ObjectSpec(old.spec.shape, new_color))
    return slots


def _wrong_count(rng: np.random.Generator, meta: dict, slots: list[_Slot]) -> list[_Slot]:
    # One fewer of some include always fails it; one more fails only where an exclude caps the count.
    options: list[tuple[int, int]] = []
    for g, inc in enumerate(meta["include"]):
        options.append((g, -1))
        capped = any(
            e["class"] == inc["class"] and int(e["count"]) == int(inc["count"]) + 1
            for e in meta.get("exclude", [])
        )
        if capped and len(slots) < MAX_OBJECTS:
            options.append((g, +1))
    group, delta = _pick(rng, options)
    members = [i for i, s in enumerate(slots) if s.group == group]
    if delta < 0:
        drop = _pick(rng, members)
        return [s for i, s in enumerate(slots) if i != drop]
    return [*slots, slots[members[0]]]


def _wrong_shape(rng: np.random.Generator, meta: dict, slots: list[_Slot]) -> list[_Slot]:
    # The changed object takes a shape the prompt does not name, so it counts for nothing: a distractor.
    i = int(rng.integers(len(slots)))
    free_shapes = [s for s in SHAPES if s not in _named_shapes(meta)]
    slots = list(slots)
    slots[i] = _Slot(None, ObjectSpec(_pick(rng, free_shapes), slots[i].spec.color))
    return slots


def near_miss_scene(
    meta: dict, rng: np.random.Generator, kind: str | None = None, distractors: Distractors = (0, 2)
) -> tuple[Scene, str]:
    """A scene that fails the prompt record by one attribute, and the kind of miss.

    kind: 'color' (a required object's colour changed, or two objects' colours swapped), 'count' (one
    required object dropped, or for an exact count one added), 'shape' (a required object's shape changed
    to a shape the prompt does not name), 'relation' (the opposite relation holds). None picks one of the
    kinds that apply (`near_miss_kinds`) at random.
    """
    _validate(meta)
    kinds = near_miss_kinds(meta)
    if kind is None:
        kind = _pick(rng, kinds)
    elif kind not in kinds:
        raise ValueError(f"near miss {kind!r} does not apply to {meta['prompt']!r}; choose from {kinds}")
    slots = _required_slots(meta)
    relations = _required_relations(meta)
    if kind == "color":
        slots = _wrong_color(rng, slots)
    elif kind == "count":
        slots = _wrong_count(rng, meta, slots)
    elif kind == "shape":
        slots = _wrong_shape(rng, meta, slots)
    else:
        rel = _pick(rng, relations)
        relations = [
            r if r != rel else _Relation(r.group, OPPOSITE_RELATION[r.relation], r.target) for r in relations
        ]
    # A scene holds at least one object: a dropped single object leaves room for (at least) one distractor.
    slots += _distractor_slots(rng, meta, distractors, len(slots), at_least=1 if not slots else 0)
    scene = _sample(rng, slots, relations)
    return dataclasses.replace(
        scene, meta={"prompt": meta["prompt"], "tag": meta["tag"], "near_miss": kind}
    ), kind
