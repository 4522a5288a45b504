"""Self-distillation trial: fine-tune the DiT on its own samples that pass their prompt's checks.

    .venv/bin/python bench/self_distill.py MODEL --out DIR [--per-prompt counting=6,two_object=8,...]
        [--check both] [--share 0.5] [--steps 1000] [--batch-size 16] [--lr 1e-4] [--count-weight 0.1]

Why: best of 4 samples passes ShapesGenEval's rules for nearly every prompt (bench/best_of_k.py: oracle 0.98-0.995),
and the model's own check of its samples lifts the full benchmark from 0.778 to 0.888 (`--self-check`), while one
sample per image stays at 0.778. Rejection-sampling fine-tuning (RAFT, ReST) moves that choice into the weights:
sample the DiT on the GenEval-style TRAINING prompts (never the benchmark's strings), keep the samples that pass
the prompt's rules as the model itself reads them, and train the DiT towards them by flow matching, beside real
renders of the training prompts. No judge: a sample is read by the model's own CLIP label head, in its tokens
(`--check tokens`), in the pixels its decoder draws from them (`pixels`: CLIP encodes the decoded image, the label
head reads it), or both (`both`, the default: the decoder drops objects of 4-object scenes that the tokens hold,
bench/token_category.py --pixels). `score_detections` applies the prompt record's include/exclude rules.

Phase 1 writes DIR/buffer.safetensors + DIR/buffer.json (accepted targets, their prompts, acceptance per category);
`--buffer` reuses one. Phase 2 trains what an instruct stage trains (the backbone's queries and the DiT) for
`--steps` steps, each batch `--share` accepted samples and the rest real renders (instruct_examples, 2 per prompt),
flow matching plus the by-shape count loss (`--count-weight`, as the recipe's `count_shape` stage), AdamW with a
warm-up and cosine schedule, EMA 0.999; the EMA weights are saved to DIR/model (release layout, float32).
`--share 0` is the control: the same fine-tuning on real renders alone. `--guided-target` regresses the accepted
rows so that the guided velocity, not the conditional one, meets them (`guided_buffer_loss`).

Session 53 (the bundle's run model, docs/bench/object_target.txt): 2,028 of 3,010 samples kept; no arm beat the
control on bench/token_category.py --pixels (the plain target over-counts, the guided one loses position). Not part
of the recipe.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from blip3o.eval.geneval import detection_verdicts
from blip3o.models.blip3o import Blip3o
from blip3o.train.count_supervision import guided_count_loss, row_guidance_weights, scene_counts
from blip3o.train.data import instruct_examples
from blip3o.train.optim import EMA, build_optimizer, warmup_cosine_factor
from blip3o.train.scene_supervision import object_label_detections
from blip3o.train.stages import set_trainable
from blip3o.transport import flow_matching_loss
from blip3o.world.prompts import load_train_prompts
from blip3o.world.scene import SHAPES
from label_judge import read_images, read_targets  # bench/ is on sys.path when a bench script runs

DEFAULT_PER_PROMPT = "single_object=4,two_object=8,counting=6,colors=1,position=1,color_attr=1"


def parse_per_prompt(text: str) -> dict[str, int]:
    out = {}
    for item in text.split(","):
        tag, _, n = item.partition("=")
        out[tag.strip()] = int(n)
    return out


def record_shape_counts(record: dict) -> torch.Tensor:
    """(S,) objects of each shape a prompt record asks for (SHAPES order): the count loss's target."""
    counts = torch.zeros(len(SHAPES))
    for req in record["include"]:
        counts[SHAPES.index(req["class"])] += int(req["count"])
    return counts


@torch.no_grad()
def build_buffer(
    model: Blip3o,
    records: list[dict],
    per_prompt: dict[str, int],
    check: str,
    seed: int,
    batch: int,
    steps: int | None = None,
):
    """Sample every training prompt `per_prompt[tag]` times; keep the samples passing the prompt's rules."""
    jobs = [r for r in records for _ in range(per_prompt.get(r["tag"], 0))]
    kept_targets, kept_index, tried, kept = [], [], Counter(), Counter()
    index_of = {id(r): i for i, r in enumerate(records)}
    for start in tqdm(range(0, len(jobs), batch), desc="sampling"):
        part = jobs[start : start + batch]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
        target = model.generate_target(
            [r["prompt"] for r in part], steps=steps, generator=generator
        )  # (b, C, g, g)
        passed = [True] * len(part)
        if check in ("tokens", "both"):
            readings = read_targets(model, target)  # (b, N, 19)
            verdicts = detection_verdicts(part, [object_label_detections(x) for x in readings])
            passed = [p and v for p, v in zip(passed, verdicts, strict=True)]
        if check in ("pixels", "both"):
            images = model.decode_target(target, generator=torch.Generator().manual_seed(seed + start))
            readings = read_images(model, images)  # (b, N, 19)
            verdicts = detection_verdicts(part, [object_label_detections(x) for x in readings])
            passed = [p and v for p, v in zip(passed, verdicts, strict=True)]
        for r, ok, t in zip(part, passed, target, strict=True):
            tried[r["tag"]] += 1
            if ok:
                kept[r["tag"]] += 1
                kept_targets.append(t.float().cpu())
                kept_index.append(index_of[id(r)])
    rates = {tag: {"tried": tried[tag], "kept": kept[tag], "rate": kept[tag] / tried[tag]} for tag in tried}
    targets = torch.stack(kept_targets) if kept_targets else torch.zeros(0, *model.config.target_shape)
    return targets, kept_index, rates


def update(model: Blip3o, optimizer, ema: EMA, loss: torch.Tensor) -> None:
    """One optimizer step on `loss` (gradients clipped to norm 1 over the trainable parameters), then the EMA."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    ema.update(model)


def guided_buffer_loss(model: Blip3o, aux: dict, v_cond: torch.Tensor, cond, keep, n_buffer: int, flow):
    """The flow loss with the accepted samples' rows regressed so that the GUIDED velocity meets their flow target.

    The sampler moves along v_u + w (v_c - v_u); an accepted sample x* was drawn that way. Training v_c towards
    the plain target u = noise - x* makes the guided sampler overshoot it by w (session 53: too many objects in
    counting after the plain fine-tune). Regressing v_c to v_u + (u - v_u) / w instead makes v_u + w (v_c - v_u)
    = u: the guided sampler's own velocity is what meets the sample. Real rows, and rows whose condition was
    dropped, keep the plain target. Per-element mean, like flow_matching_loss."""
    target = aux["target"].float().clone()  # (B, C, g, g): noise - x0
    rows = torch.zeros(len(keep), dtype=torch.bool)
    rows[:n_buffer] = True
    rows &= keep.cpu()
    if rows.any():
        with torch.no_grad():
            v_uncond = model.dit(
                aux["x_t"][rows], aux["timestep"][rows], torch.zeros_like(cond[rows])
            ).float()
        weight = row_guidance_weights(aux["sigma"][rows], flow.cfg_scale, flow).view(-1, 1, 1, 1)  # (b,1,1,1)
        target[rows] = v_uncond + (target[rows] - v_uncond) / weight
    return ((v_cond.float() - target) ** 2).mean()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved model folder (float32 run model or the bundle)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--per-prompt", default=DEFAULT_PER_PROMPT, help="samples per training prompt, by tag"
    )
    parser.add_argument("--check", choices=("tokens", "pixels", "both"), default="both")
    parser.add_argument(
        "--buffer", type=Path, help="reuse an accepted-sample buffer (a DIR of an earlier run)"
    )
    parser.add_argument("--share", type=float, default=0.5, help="accepted samples' share of each batch")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--count-weight", type=float, default=0.1)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument(
        "--guided-target", action="store_true", help="accepted rows: the guided velocity meets their target"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--real-prompts", type=int, help="real renders of the first N training prompts only")
    parser.add_argument("--sample-steps", type=int, help="DiT sampling steps (default: the model's)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.share <= 1.0:
        parser.error("--share must be in [0, 1]")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model = Blip3o.from_pretrained(args.model).float().eval()
    records = load_train_prompts()
    report: dict = {"model": args.model, "args": {k: str(v) for k, v in vars(args).items()}}

    # ---- phase 1: the accepted-sample buffer
    if args.share > 0:
        source = args.buffer or args.out
        if (source / "buffer.safetensors").exists():
            buffer = load_file(source / "buffer.safetensors")["targets"]
            meta = json.loads((source / "buffer.json").read_text())
            buffer_index, report["buffer"] = meta["index"], meta["rates"]
        else:
            start = time.perf_counter()
            buffer, buffer_index, rates = build_buffer(
                model, records, parse_per_prompt(args.per_prompt), args.check, args.seed, args.sample_batch,
                args.sample_steps,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            save_file({"targets": buffer.contiguous()}, args.out / "buffer.safetensors")
            meta = {"index": buffer_index, "rates": rates, "check": args.check, "seconds": seconds}
            (args.out / "buffer.json").write_text(json.dumps(meta))
            report["buffer"] = rates
            print(f"buffer: {len(buffer_index)} accepted in {seconds:.0f} s")
        for tag, r in sorted(report["buffer"].items()):
            print(f"  {tag:14s} kept {r['kept']:5d} of {r['tried']:5d} ({r['rate']:.3f})")
        if not buffer_index:
            raise SystemExit("no sample passed its prompt's checks: nothing to fine-tune on (try --share 0)")

    # ---- phase 2: fine-tuning
    real = instruct_examples(args.seed, 2, args.real_prompts, colourless_pair_renders=12)
    trainable = set_trainable(model, "instruct")
    model.train()
    optimizer = build_optimizer(model.named_parameters(), args.lr, weight_decay=0.0)
    ema = EMA(model, args.ema)
    rng = random.Random(args.seed)
    n_buffer = round(args.batch_size * args.share)
    flow = model.config.flow
    log = []
    start = time.perf_counter()
    for step in tqdm(range(args.steps), desc="fine-tune"):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warmup_cosine_factor(step, args.warmup, args.steps, 0.1)
        picks = [rng.randrange(len(buffer_index)) for _ in range(n_buffer)] if n_buffer else []
        reals = [real[rng.randrange(len(real))] for _ in range(args.batch_size - n_buffer)]
        captions = [records[buffer_index[i]]["prompt"] for i in picks] + [e.short_caption for e in reals]
        with torch.no_grad():
            parts = [buffer[picks]] if picks else []
            if reals:
                parts.append(model.encode_target([e.image for e in reals]).float())
            x0 = torch.cat(parts)  # (B, C, g, g)
        count_parts = [record_shape_counts(records[buffer_index[i]])[None] for i in picks]
        if reals:
            count_parts.append(scene_counts([e.scene for e in reals], "shape"))
        counts = torch.cat(count_parts)  # (B, S) objects of each shape, in the batch's row order
        cond = model.condition(captions).float()  # (B, L, H)
        live = {}  # the conditional velocity with its graph, for the count loss

        def velocity(x, t, c, live=live):
            live["v"] = model.dit(x, t, c)
            return live["v"]

        generator = torch.Generator().manual_seed(args.seed * 7919 + step)
        loss, aux = flow_matching_loss(velocity, x0, cond, generator=generator, cfg=flow)
        keep = ~aux["drop_mask"].bool() if "drop_mask" in aux else torch.ones(len(captions), dtype=torch.bool)
        if args.guided_target and picks:
            loss = guided_buffer_loss(model, aux, live["v"], cond, keep, len(picks), flow)
        metrics = {"flow": loss.item()}
        if args.count_weight > 0:
            count_loss, _ = guided_count_loss(
                model, aux["x_t"], aux["sigma"], aux["timestep"], live["v"], cond, counts, keep,
                row_guidance_weights(aux["sigma"], flow.cfg_scale, flow),
            )  # fmt: skip
            loss = loss + args.count_weight * count_loss
            metrics["count"] = count_loss.item()
        update(model, optimizer, ema, loss)
        if step % 50 == 0 or step == args.steps - 1:
            log.append({"step": step, **metrics})
            print(json.dumps(log[-1]), flush=True)
    report["train_seconds"] = time.perf_counter() - start
    report["trainable"] = len(trainable)
    report["log"] = log
    ema.copy_to(model)
    model.eval().save_pretrained(args.out / "model")
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"fine-tuned {args.steps} steps in {report['train_seconds']:.0f} s -> {args.out / 'model'}")
    return report


if __name__ == "__main__":
    main()
