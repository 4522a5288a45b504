"""A `refine` stage of the miniature (a decoder stage whose conditions are partly the trained DiT's own renditions,
sampled inside the stage's forward, drawn as what CLIP reads in them), on 1 process or many:

    torchrun --nproc_per_node 2 tests/dist_refine_train.py OUT [none|ddp|fsdp] [GRAD_ACCUM]

tiny-test with CLIP's object label head, plus the refine stage of the `shapes-object` recipe at 3 steps. No CLI
preset has such a stage on the tiny model, so tests/test_engine.py runs this script to compare world sizes.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from blip3o.train.config import StageConfig
from blip3o.train.loop import run
from blip3o.train.presets import preset
from conftest import object_label_model_config  # tests/ is the script's folder, so on sys.path


def main(out: Path, strategy: str, grad_accum: int) -> None:
    base = preset("tiny-test")
    refine = StageConfig(
        "refine", "decoder", steps=3, batch_size=4, lr=1e-3, log_every=1, ckpt_every=3, grad_accum=grad_accum,
        generated_share=0.5, generated_max_sigma=1.0, generated_pairs="reading",
    )  # fmt: skip
    config = replace(
        base,
        model=object_label_model_config(base.model),
        stages=(*base.stages, refine),
        distributed=strategy,
        deterministic=True,
    )
    run(config, out, progress=False)


if __name__ == "__main__":
    main(
        Path(sys.argv[1]),
        sys.argv[2] if len(sys.argv) > 2 else "none",
        int(sys.argv[3]) if len(sys.argv) > 3 else 1,
    )
