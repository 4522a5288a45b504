"""Skip a run's CLIP and decoder stages by reusing a trained model's CLIP and pixel decoder (a recipe surgery).

    python tools/reuse_target.py SOURCE_MODEL RUN_DIR [--stages clip decoder] [--source-note TEXT]
        [--curves SOURCE_CURVES.csv]

Why: the `shapes` recipe spends its first 36 minutes on CLIP (the DiT's target encoder) and the pixel decoder.
A change to the backbone's side (the vision or understanding stages, their data or the language model's
training) leaves those two untouched, since neither sees the backbone. So a rebundle after such a change can
take them from a model trained by the same preset, e.g. the bundled one, and train only the rest.

What it does: builds the model the run's first stage starts from (`Blip3o.from_config` with RUN_DIR's
config.json and seed: fresh backbone, queries and DiT, the preset's tokenizer), puts SOURCE_MODEL's CLIP (with
its fitted feature statistics and auxiliary heads) and decoder into it, and exports the result as each of
RUN_DIR/<stage>/model, so `blip3o train` resumes at the next stage. It refuses a source whose CLIP, decoder or
tokenizer differ from the run's. A float16 source (the bundle) gives float16-rounded CLIP and decoder weights.

Provenance, as the other reuse tools write it (tools/stage_fill.py): each filled stage gets a `reused.json` (the
source, with `--source-note`, this tool, and which weights), so `blip3o card` reports the stage as reused rather
than trained; `--curves` copies each stage's rows of the source's curves (e.g. the previous model card's
curves.csv) as its log.jsonl, which the card needs for every stage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stage_fill import (  # tools/ is on sys.path when this script runs
    fill_stage,
    read_run_config,
    read_stage_curves,
    reused_record,
)

from blip3o.models.blip3o import Blip3o


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="trained model folder whose CLIP and decoder are reused")
    parser.add_argument("run", type=Path, help="the run folder (its config.json is read)")
    parser.add_argument("--stages", nargs="+", default=["clip", "decoder"], help="stages to fill")
    parser.add_argument("--source-note", default="", help="where the source came from, for reused.json")
    parser.add_argument("--curves", type=Path, help="the source's training curves (CSV), copied per stage")
    args = parser.parse_args(argv)

    run_config = read_run_config(args.run, "start the run once (or write its config) first")
    if run_config is None:
        return 1
    curves = read_stage_curves(args.curves, args.stages)
    if curves is None:
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
    reused = reused_record(args.source, args.source_note, "tools/reuse_target.py", "clip, decoder")
    for stage in args.stages:
        fill_stage(model, args.run, stage, reused, args.curves, curves)
        print(f"wrote {args.run / stage / 'model'} (CLIP and decoder of {args.source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
