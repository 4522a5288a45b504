"""Skip a run's understanding stages by reusing a trained model's backbone (a surgery for recipe trials).

    python tools/reuse_backbone.py SOURCE_MODEL RUN_DIR [--after decoder] [--stages vision understanding]
        [--curves SOURCE_CURVES.csv]

Why: the `shapes` recipe trains CLIP and the decoder, then the backbone (stages "vision", "understanding",
36 min), then generation. A change to CLIP or the generation side leaves the backbone's training untouched:
the backbone never sees CLIP. So a trial of such a change can take the backbone from a model that was
trained by the same preset and skip those 36 minutes.

What it does: loads RUN_DIR/<after>/model (this run's own CLIP, decoder, DiT and initial queries), replaces
the backbone's weights with SOURCE_MODEL's (the language model and its vision tower; not the latent queries,
which the generation stages train from their initial values as in a full run), and exports the result as
each of RUN_DIR/<stage>/model, so `blip3o train` resumes at the next stage. The two tokenizers must be the
same (both are trained from the preset's config, deterministically); it refuses otherwise.

Provenance: each filled stage gets a `reused.json` (the source and this tool), which `blip3o card` reports
in place of a training time. `--curves` takes the source's training curves (a CSV written by `blip3o curves`
or `blip3o card`, e.g. the previous model card's curves.csv) and writes each filled stage's rows as its
log.jsonl, so the card still shows how the reused backbone was trained; reused.json records the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from stage_fill import fill_stage, read_stage_curves, reused_record  # tools/ is on sys.path when run

from blip3o.models.blip3o import Blip3o


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="trained model folder whose backbone is reused")
    parser.add_argument("run", type=Path, help="the run folder (its stage <after> must be trained)")
    parser.add_argument("--after", default="decoder", help="the last stage this run trained itself")
    parser.add_argument("--stages", nargs="+", default=["vision", "understanding"], help="stages to fill")
    parser.add_argument("--curves", type=Path, help="the source's training curves (CSV), copied per stage")
    args = parser.parse_args(argv)
    curves = read_stage_curves(args.curves, args.stages)
    if curves is None:
        return 1

    model = Blip3o.from_pretrained(args.run / args.after / "model")
    source = Blip3o.from_pretrained(args.source)
    if source.tokenizer.get_vocab() != model.tokenizer.get_vocab():
        print("the two models' tokenizers differ: their backbones cannot be swapped", file=sys.stderr)
        return 1
    if source.config.backbone != model.config.backbone:
        print("the two models' backbone configs differ", file=sys.stderr)
        return 1
    weights = {k: v for k, v in source.backbone.state_dict().items() if k != "latent_queries"}
    queries = model.backbone.latent_queries.detach().clone()
    missing, unexpected = model.backbone.load_state_dict(weights, strict=False)
    if unexpected or missing != ["latent_queries"]:
        print(f"state dicts do not match: missing {missing}, unexpected {unexpected}", file=sys.stderr)
        return 1
    assert torch.equal(model.backbone.latent_queries, queries)
    reused = reused_record(args.source, "", "tools/reuse_backbone.py", "backbone")
    for stage in args.stages:
        fill_stage(model, args.run, stage, reused, args.curves, curves)
        print(f"wrote {args.run / stage / 'model'} (backbone of {args.source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
