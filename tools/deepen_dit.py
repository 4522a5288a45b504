"""Deepen a saved model's DiT without changing what it samples (depth up-scaling; blip3o.models.dit_depth).

    python tools/deepen_dit.py SOURCE_MODEL OUT_MODEL --copy 1 3

Each layer named by --copy gets a gated-off copy inserted right after it (the identity until training opens its
gates). A run then trains it from a folder filled by tools/reuse_model.py, with `model.dit.n_layers=N` in both
the --print-config and the train overrides; a preset does the same within a run with a stage's
`deepen_dit_after`. The output keeps the source's storage (float16, int8 DiT).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from blip3o.models.blip3o import CONFIG_FILE, DIT_STORAGE_KEY, STORAGE_DTYPE_KEY, STORAGE_DTYPES, Blip3o
from blip3o.models.dit_depth import deepen


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
