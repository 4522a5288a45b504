"""Train one stage (CLIP, pixel decoder, understanding or generation) through the project's `train_stage`, for sweeps.

    .venv/bin/python bench/decoder_train.py --kind clip --out runs/dec/clip --steps 600 --batch 64 --lr 5e-4
    .venv/bin/python bench/decoder_train.py --kind decoder --init runs/dec/clip/clip/model --out runs/dec/a \
        --steps 300 --batch 32 --lr 5e-4 --decoder tiny --set block_out_channels=32,64

    .venv/bin/python bench/decoder_train.py --kind generation --init runs/shapes/understanding/model \
        --shards runs/shapes/data --out runs/exp4/gA --steps 1200 --batch 16 --lr 5e-4 \
        --dit dim=256 n_layers=6 n_heads=8 n_kv_heads=8 --fresh-queries --ema 0.999 --geneval 60

The decoder run starts from a saved model folder (its CLIP is used frozen) and swaps in a fresh decoder built
from a DECODER_PRESETS entry plus optional field overrides. Checkpoints every --ckpt-every steps are kept,
so bench/decoder_reconstruction.py --checkpoint can score intermediate steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from blip3o.models.backbone import LOSS_AVERAGES
from blip3o.models.blip3o import Blip3o, tiny_config
from blip3o.models.decoder import PixelDecoder, decoder_config
from blip3o.train.config import DataConfig, StageConfig
from blip3o.train.data import load_shards
from blip3o.train.loop import train_stage
from blip3o.train.overrides import set_fields
from blip3o.train.parallelize import init_distributed
from blip3o.train.presets import preset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--kind", choices=("clip", "decoder", "understanding", "generation", "instruct"), required=True
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--init", help="model folder to start from (decoder: supplies the frozen CLIP)")
    parser.add_argument("--shards", default="runs/quick1/data")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument(
        "--warmup", type=int, default=-1, help="-1: the shapes recipe's min(100, steps // 10)"
    )
    parser.add_argument("--decoder", default="tiny", help="DECODER_PRESETS name")
    parser.add_argument("--set", nargs="*", default=[], help="decoder field overrides, key=value")
    parser.add_argument("--ckpt-every", type=int, default=100)
    parser.add_argument("--hard-negatives", action="store_true", help="clip: swapped-shape negative captions")
    parser.add_argument("--short-prob", type=float, default=0.3, help="share of short captions")
    parser.add_argument("--qa-share", type=float, default=0.5, help="understanding: share of QA samples")
    parser.add_argument("--average", choices=LOSS_AVERAGES, default="token", help="understanding loss")
    parser.add_argument(
        "--backbone", nargs="*", default=[], help="backbone field overrides (fresh model only)"
    )
    parser.add_argument("--clip", nargs="*", default=[], help="ClipConfig field overrides (fresh model only)")
    parser.add_argument("--dit", nargs="*", help="generation: a fresh DiT with these DiTConfig overrides")
    parser.add_argument("--flow", nargs="*", default=[], help="FlowMatchingConfig overrides, e.g. shift=4")
    parser.add_argument("--fresh-queries", action="store_true", help="generation: re-initialise the queries")
    parser.add_argument("--ema", type=float, default=0.0, help="EMA decay (0: none)")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument(
        "--freeze-vision", action="store_true", help="understanding: keep the vision tower frozen"
    )
    parser.add_argument(
        "--geneval", type=int, default=0, help="generation: score N GenEval prompts x 2 after"
    )
    parser.add_argument("--vqa", type=int, default=0, help="understanding: score N ShapesVQA questions after")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.init:
        model = Blip3o.from_pretrained(args.init)
    else:
        base = tiny_config()
        backbone = set_fields(base.backbone, args.backbone)
        clip = set_fields(base.clip, args.clip)
        # The DiT and the decoder read the CLIP target, so their shapes follow the CLIP overrides.
        dit = replace(base.dit, in_channels=clip.target_channels, input_size=clip.target_grid)
        decoder = replace(
            base.decoder, feature_dim=clip.feature_dim, num_feature_tokens=clip.num_target_tokens
        )
        config = replace(base, backbone=backbone, clip=clip, dit=dit, decoder=decoder)
        model = Blip3o.from_config(config, seed=args.seed)
    if args.kind == "decoder":
        dec_cfg = set_fields(decoder_config(args.decoder), args.set)
        torch.manual_seed(args.seed)
        model.decoder = PixelDecoder(dec_cfg)
        model.config = replace(model.config, decoder=dec_cfg)
        print(f"decoder params: {sum(p.numel() for p in model.decoder.parameters()):,}")
    if args.dit is not None:
        from blip3o.models.dit import DiT

        dit_cfg = set_fields(model.config.dit, args.dit)
        torch.manual_seed(args.seed)
        model.dit = DiT(dit_cfg)
        model.config = replace(model.config, dit=dit_cfg)
        print(f"dit params: {model.dit.num_params():,}")
    if args.flow:
        from blip3o.transport import build_objective

        flow = set_fields(model.config.flow, args.flow)
        model.config = replace(model.config, flow=flow)
        model.objective = build_objective(model.config.objective, flow)
    if args.fresh_queries:
        with torch.no_grad():
            q = model.backbone.latent_queries
            q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(args.seed)) * q.std())
    warmup = min(100, args.steps // 10) if args.warmup < 0 else args.warmup
    stage = StageConfig(
        args.kind, args.kind, steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=warmup,
        log_every=10, ckpt_every=args.ckpt_every, short_caption_prob=args.short_prob, qa_share=args.qa_share,
        hard_negatives=args.hard_negatives, understanding_average=args.average, ema_decay=args.ema, min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay, freeze_vision=args.freeze_vision,
    )  # fmt: skip
    config = replace(
        preset("shapes-quick"), model=model.config, stages=(stage,), keep_last=100,
        data=DataConfig(shards=args.shards), seed=args.seed,
    )  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.to_json())
    examples, _ = load_shards(args.shards)
    dist = init_distributed("cpu")
    start = time.perf_counter()
    result = train_stage(model, stage, 0, config, out, examples, dist, rebuild=None, progress=False)
    summary = {
        "wall_s": time.perf_counter() - start,
        "steps": result.steps_run,
        "final_loss": float(result.final_loss),
    }
    if args.vqa:
        from blip3o.eval.model_eval import vqa_with_model

        vqa = vqa_with_model(model, n_questions=args.vqa)
        summary["vqa"] = vqa["overall"]["mean"]
        summary["vqa_per_kind"] = {k: v["mean"] for k, v in vqa["per_kind"].items()}
    if args.geneval:
        from blip3o.eval.model_eval import geneval_with_model

        ge = geneval_with_model(
            model, out / "geneval", seeds=[0], max_prompts=args.geneval, images_per_prompt=2, progress=False
        )
        summary["geneval"] = ge
    (out / "summary.json").write_text(json.dumps(summary) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
