"""`dotted.key=value` overrides of a run config (`blip3o train --preset P key=value ...`).

`apply_overrides` turns a preset plus command-line items into the run's config; its inverse for presets,
`overrides_from_preset`, is in train/presets.py.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import replace
from typing import Any

from blip3o.train.config import ConfigError, RunConfig


def _parse_value(text: str, current: Any, where: str, element: type = str) -> Any:
    """Parse `text` to the type of the field's current value; a tuple's items to `element`."""
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, tuple):
            # An empty value is the empty tuple (`eval.geneval_seeds=`: no GenEval).
            return tuple(element(v) for v in text.split(",")) if text else ()
        if current is None:
            return json.loads(text)
        return text
    except ValueError as err:
        raise ConfigError(f"{where}: cannot parse {text!r} as {type(current).__name__}") from err


def _split(item: str) -> tuple[list[str], str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, text = item.split("=", 1)
    return key.strip().split("."), text


def _insert(tree: dict, path: list[str], text: str, item: str) -> None:
    """Record one override in a nested {field: subtree or (text, item)} tree; a later one wins, as on a command
    line."""
    for key in path[:-1]:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {key!r} is also set as a value by {node[1]!r}")
        tree = node
    if isinstance(tree.get(path[-1]), dict):
        raise ConfigError(f"override {item!r}: {path[-1]!r} also has fields set")
    tree[path[-1]] = (text, item)


def _items(tree: dict) -> list[str]:
    return [
        item for node in tree.values() for item in (_items(node) if isinstance(node, dict) else [node[1]])
    ]


def _tuple_element(cls: type, name: str, current: Any) -> type:
    """The item type of a tuple field: its annotation's (`tuple[int, ...]`), so an empty default parses too."""
    if not isinstance(current, tuple):
        return str
    args = typing.get_args(typing.get_type_hints(cls).get(name))
    return args[0] if args and isinstance(args[0], type) else type(current[0]) if current else str


def _apply(obj: Any, tree: dict, updates: dict | None = None) -> Any:
    """A copy of dataclass `obj` with the override tree applied. Each dataclass is rebuilt once with all of its
    changed fields, children first, so fields that are only valid together (`model.clip.target_components` with
    `model.dit.in_channels`) can be set together: a dataclass checks itself only after all of them are in."""
    updates = dict(updates or {})
    names = {f.name for f in dataclasses.fields(obj)}
    for key, node in tree.items():
        where = ", ".join(_items(node)) if isinstance(node, dict) else node[1]
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r}; known: {sorted(names)}")
        current = getattr(obj, key)
        if not isinstance(node, dict):
            updates[key] = _parse_value(node[0], current, where, _tuple_element(type(obj), key, current))
        elif not dataclasses.is_dataclass(current):
            raise ConfigError(f"{where}: {type(current).__name__} has no fields")
        else:
            updates[key] = _apply(current, node)
    try:
        return replace(obj, **updates)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{', '.join(_items(tree))}: {err}") from err


def set_fields(obj: Any, items: list[str]) -> Any:
    """A copy of dataclass `obj` with `field=value` strings applied, parsed to each field's type (as overrides)."""
    tree: dict = {}
    for item in items:
        path, text = _split(item)
        _insert(tree, path, text, item)
    return _apply(obj, tree)


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `dotted.key=value` overrides. Stages are addressed by name: `stages.generation.steps=200`, or all
    at once with `stages.*.log_every=5`. Overrides are applied together, not one by one (see `_apply`)."""
    root: dict = {}
    per_stage: dict[str, dict] = {s.name: {} for s in config.stages}
    for item in overrides:
        path, text = _split(item)
        if path[0] != "stages":
            _insert(root, path, text, item)
            continue
        if len(path) < 3:
            raise ConfigError(f"override {item!r}: use stages.<name>.<field>=value")
        for name in per_stage if path[1] == "*" else [config.stage(path[1]).name]:
            _insert(per_stage[name], path[2:], text, item)
    stages = tuple(_apply(s, per_stage[s.name]) if per_stage[s.name] else s for s in config.stages)
    config = _apply(config, root, {"stages": stages} if stages != config.stages else None)
    # Checked once all overrides are in, not per field: `stages.x.steps=10 stages.x.warmup_steps=0` passes
    # through a state with the preset's warmup and the new steps. Caught here, before a run writes anything,
    # instead of by the optimizer's schedule once the stage starts.
    for stage in config.stages:
        if stage.warmup_steps > stage.steps:
            raise ConfigError(
                f"stage {stage.name!r}: warmup_steps {stage.warmup_steps} exceeds steps {stage.steps}; "
                f"override stages.{stage.name}.warmup_steps too"
            )
    return config
