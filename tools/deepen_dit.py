"""Deepen a saved model's DiT without changing what it samples (depth up-scaling).

    python tools/deepen_dit.py SOURCE_MODEL OUT_MODEL --copy 1 3

Each layer named by --copy gets a copy inserted right after it whose two adaLN gates (attention and FFN, rows
of `norm1.linear`; dit_layers.DiTBlock adds each branch times tanh(gate)) are zero, so the copy is the identity
and the deeper model samples exactly as SOURCE_MODEL did until training opens its gates; its other weights start
as the copied layer's, not as noise. A run then trains it from a folder filled by tools/reuse_model.py, with
`model.dit.n_layers=N` in both the --print-config and the train overrides.

Why: the only way to try a larger DiT on this machine without training the generation stages again (~2.2 h).
Session 61 (docs/bench/object_target.txt): 4 -> 6 layers then `count_apart` alone, 1,000 steps: counting not
better; with `count`, `count_shape` and `count_apart` trained again on 6 layers, counting tokens 0.673 against the
bundle's 0.647 (40 seeds; the 4-layer control of that run not yet trained).
The output keeps the source's storage dtype; a float16 DiT of 6 layers does not fit the 25 MB bundle.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from blip3o.models.blip3o import CONFIG_FILE, DIT_STORAGE_KEY, STORAGE_DTYPE_KEY, STORAGE_DTYPES, Blip3o
from blip3o.models.dit import DiT

LAYER_PREFIX = "model.layers."
GATE_ROWS = (1, 3)  # of the four chunks of norm1.linear: scale_attn, gate_attn, scale_ffn, gate_ffn


def layer_plan(n_layers: int, copies: list[int]) -> list[tuple[int, bool]]:
    """(source layer, is a gated-off copy) for each layer of the deeper DiT, in order."""
    bad = [i for i in copies if not 0 <= i < n_layers]
    if bad or len(set(copies)) != len(copies):
        raise ValueError(f"--copy takes distinct layers in 0..{n_layers - 1}, got {copies}")
    plan = []
    for i in range(n_layers):
        plan.append((i, False))
        if i in copies:
            plan.append((i, True))
    return plan


def deepen(model: Blip3o, copies: list[int]) -> Blip3o:
    """A copy of `model` whose DiT has the gated-off layer copies inserted (same samples, more layers)."""
    plan = layer_plan(model.config.dit.n_layers, copies)
    dit_config = dataclasses.replace(model.config.dit, n_layers=len(plan))
    old = model.dit.state_dict()
    new = {k: v for k, v in old.items() if not k.startswith(LAYER_PREFIX)}
    for target, (source, is_copy) in enumerate(plan):
        prefix = f"{LAYER_PREFIX}{source}."
        for key, value in old.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix) :]
            value = value.clone()
            if is_copy and name in ("norm1.linear.weight", "norm1.linear.bias"):
                chunk = value.shape[0] // 4
                for row in GATE_ROWS:
                    value[row * chunk : (row + 1) * chunk] = 0
            new[f"{LAYER_PREFIX}{target}.{name}"] = value
    dit = DiT(dit_config)
    dit.load_state_dict(new, strict=True)
    config = dataclasses.replace(model.config, dit=dit_config)
    return Blip3o(config, model.backbone, model.clip, model.decoder, dit=dit, vae=model.vae).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a saved blip3o model folder")
    parser.add_argument("out", type=Path, help="where the deeper model is written (must not exist)")
    parser.add_argument(
        "--copy", type=int, nargs="+", required=True, help="layers to insert a gated-off copy after"
    )
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"{args.out} exists; give a new folder", file=sys.stderr)
        return 2
    model = Blip3o.from_pretrained(args.source)
    try:
        deeper = deepen(model, args.copy)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    source_config = json.loads((args.source / CONFIG_FILE).read_text())
    storage = source_config.get(STORAGE_DTYPE_KEY, "float32")  # stored as the source was
    deeper.save_pretrained(
        args.out, dtype=STORAGE_DTYPES[storage], dit_int8=source_config.get(DIT_STORAGE_KEY) == "int8"
    )
    count = sum(p.numel() for p in deeper.dit.parameters())
    print(f"wrote {args.out}: DiT of {deeper.config.dit.n_layers} layers, {count:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
