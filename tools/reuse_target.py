"""Skip a run's CLIP and decoder stages by reusing a trained model's CLIP and pixel decoder (a recipe surgery).

    python tools/reuse_target.py SOURCE_MODEL RUN_DIR [--stages clip decoder]

Why: the `shapes` recipe spends its first 36 minutes on CLIP (the DiT's target encoder) and the pixel decoder.
A change to the backbone's side (the vision or understanding stages, their data or the language model's
training) leaves those two untouched, since neither sees the backbone. So a rebundle after such a change can
take them from a model trained by the same preset, e.g. the bundled one, and train only the rest.

What it does: builds the model the run's first stage starts from (`Blip3o.from_config` with RUN_DIR's
config.json and seed: fresh backbone, queries and DiT, the preset's tokenizer), puts SOURCE_MODEL's CLIP (with
its fitted feature statistics and auxiliary heads) and decoder into it, and exports the result as each of
RUN_DIR/<stage>/model, so `blip3o train` resumes at the next stage. It refuses a source whose CLIP, decoder or
tokenizer differ from the run's. A float16 source (the bundle) gives float16-rounded CLIP and decoder weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stage_fill import read_run_config  # tools/ is on sys.path when this script runs

from blip3o.models.blip3o import Blip3o
from blip3o.train.loop import export_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="trained model folder whose CLIP and decoder are reused")
    parser.add_argument("run", type=Path, help="the run folder (its config.json is read)")
    parser.add_argument("--stages", nargs="+", default=["clip", "decoder"], help="stages to fill")
    args = parser.parse_args(argv)

    run_config = read_run_config(args.run, "start the run once (or write its config) first")
    if run_config is None:
        return 1
    model = Blip3o.from_config(run_config.model, run_config.seed)
    source = Blip3o.from_pretrained(args.source)
    if source.tokenizer.get_vocab() != model.tokenizer.get_vocab():
        print("the source's tokenizer differs from the run's", file=sys.stderr)
        return 1
    for part in ("clip", "decoder"):
        if getattr(source.config, part) != getattr(model.config, part):
            print(f"the source's {part} config differs from the run's", file=sys.stderr)
            return 1
    model.clip, model.decoder = source.clip, source.decoder
    for stage in args.stages:
        export_model(model, args.run / stage / "model")
        print(f"wrote {args.run / stage / 'model'} (CLIP and decoder of {args.source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
