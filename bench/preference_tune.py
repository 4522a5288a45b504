"""Preference trial: Diffusion-DPO on the DiT's own samples, passing against failing, for the same prompt.

    .venv/bin/python bench/preference_tune.py MODEL --out DIR [--per-prompt counting=8,two_object=4,position=1]
        [--steps 600] [--pairs 8] [--real 8] [--beta 2000] [--lr 2e-5]

Why: the DiT bounds counting (session 59: 101 of 300 counting samples already miss the count in their tokens) and
it errs both ways ("two" drawn as three, "four" as three). Self-distillation on the passing samples alone
(bench/self_distill.py, session 53) pulled every count up; its guided-target variant lost position. A preference
loss uses the failing samples too: for one prompt, the DiT's flow error on a passing sample must fall, relative
to the frozen starting model's, by more than on a failing one (Diffusion-DPO, Wallace et al. 2023, here on the
rectified-flow velocity), so "three where two was asked" is pushed away, not only "two" pulled in. The frozen
reference keeps the model near where it started; a plain flow loss on real renders (`--real` rows per step, with
the usual condition dropout) keeps the unconditional branch and the data in view.

Phase 1 samples each GenEval-style TRAINING prompt `--per-prompt[tag]` times (never the benchmark's strings) and
reads every sample's tokens with the model's own CLIP label head against the prompt record's rules (no judge):
pairs are (passing, failing) samples of one prompt, DIR/pairs.safetensors + DIR/pairs.json. Phase 2 trains what
an instruct stage trains (the queries and the DiT). Per pair, with one noise level and one noise shared by the two
samples: d = (err_w - ref_err_w) - (err_l - ref_err_l) (per-element mean squared errors of the conditional
velocity), loss = -log sigmoid(-beta / 2 * d). EMA weights go to DIR/model (release layout, float32).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from blip3o.eval.geneval import detection_verdicts
from blip3o.models.blip3o import Blip3o
from blip3o.train.count_supervision import row_guidance_weights
from blip3o.train.data import instruct_examples
from blip3o.train.optim import EMA, build_optimizer, warmup_cosine_factor
from blip3o.train.scene_supervision import object_label_detections
from blip3o.train.stages import set_trainable
from blip3o.transport import flow_matching_loss
from blip3o.transport.flow_matching import (
    draw_flow_matching,
    interpolate,
    training_sigmas,
    training_timesteps,
    velocity_target,
)
from blip3o.world.prompts import load_train_prompts
from label_judge import read_targets  # bench/ is on sys.path when a bench script runs
from self_distill import parse_per_prompt, update

DEFAULT_PER_PROMPT = "counting=8,two_object=4,position=1"


@torch.no_grad()
def sample_pairs(model: Blip3o, records: list[dict], per_prompt: dict[str, int], seed: int, batch: int):
    """Sample each record per_prompt[tag] times; pair its passing with its failing samples (each used once)."""
    jobs = [i for i, r in enumerate(records) for _ in range(per_prompt.get(r["tag"], 0))]
    passing, failing = defaultdict(list), defaultdict(list)
    tried, passed = Counter(), Counter()
    for start in tqdm(range(0, len(jobs), batch), desc="sampling"):
        part = jobs[start : start + batch]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
        target = model.generate_target(
            [records[i]["prompt"] for i in part], generator=generator
        )  # (b, C, g, g)
        readings = read_targets(model, target)  # (b, N, 19)
        verdicts = detection_verdicts(
            [records[i] for i in part], [object_label_detections(x) for x in readings]
        )
        for i, ok, t in zip(part, verdicts, target, strict=True):
            tag = records[i]["tag"]
            tried[tag] += 1
            passed[tag] += ok
            (passing if ok else failing)[i].append(t.float().cpu())
    wins, losses, index = [], [], []
    for i in sorted(passing.keys() & failing.keys()):
        for w, lo in zip(passing[i], failing[i], strict=False):  # the shorter list decides
            wins.append(w)
            losses.append(lo)
            index.append(i)
    rates = {tag: {"tried": tried[tag], "passed": passed[tag]} for tag in tried}
    pairs_by_tag = Counter(records[i]["tag"] for i in index)
    return torch.stack(wins), torch.stack(losses), index, rates, dict(pairs_by_tag)


def dpo_loss(model: Blip3o, ref: Blip3o, wins, losses, prompts, beta: float, generator, flow, guided: bool):
    """Diffusion-DPO on the conditional velocity, or with `guided` on the velocity the sampler follows
    (v_u + w (v_c - v_u), the unconditional branch held fixed); returns (loss, implicit accuracy, mean d)."""
    n = len(prompts)
    x0 = torch.cat([wins, losses])  # (2P, C, g, g)
    draws = draw_flow_matching(wins, None, generator, flow)
    index = draws.index.repeat(2)  # (2P,) one level per pair
    noise = draws.noise.repeat(2, 1, 1, 1)  # (2P, C, g, g) one noise per pair
    sigma = training_sigmas(flow)[index]  # (2P,)
    timestep = training_timesteps(flow)[index]  # (2P,)
    x_t = interpolate(x0, noise, sigma)
    target = velocity_target(x0, noise)
    weight = row_guidance_weights(sigma, flow.cfg_scale, flow).view(-1, 1, 1, 1)  # (2P, 1, 1, 1)

    def velocity(net: Blip3o, cond):
        v = net.dit(x_t, timestep, torch.cat([cond, cond])).float()  # (2P, C, g, g)
        if not guided:
            return v
        with torch.no_grad():
            v_u = net.dit(x_t, timestep, torch.zeros_like(torch.cat([cond, cond]))).float()
        return v_u + weight * (v - v_u)

    err = (velocity(model, model.condition(prompts).float()) - target).pow(2).flatten(1).mean(1)  # (2P,)
    with torch.no_grad():
        ref_err = (velocity(ref, ref.condition(prompts).float()) - target).pow(2).flatten(1).mean(1)  # (2P,)
    d = (err[:n] - ref_err[:n]) - (err[n:] - ref_err[n:])  # (P,)
    loss = -F.logsigmoid(-0.5 * beta * d).mean()
    return loss, (d < 0).float().mean().item(), d.mean().item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a saved model folder (float32 run model or the bundle)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--per-prompt", default=DEFAULT_PER_PROMPT, help="samples per training prompt, by tag"
    )
    parser.add_argument("--pairs-from", type=Path, help="reuse the pairs of an earlier run's DIR")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--real", type=int, default=8, help="real renders per step (plain flow loss)")
    parser.add_argument("--beta", type=float, default=2000.0)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--ema", type=float, default=0.99)
    parser.add_argument("--guided", action="store_true", help="the preference on the guided velocity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--real-prompts", type=int, help="real renders of the first N training prompts only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model = Blip3o.from_pretrained(args.model).float().eval()
    records = load_train_prompts()
    report: dict = {"model": args.model, "args": {k: str(v) for k, v in vars(args).items()}}

    source = args.pairs_from or args.out
    if (source / "pairs.safetensors").exists():
        tensors = load_file(source / "pairs.safetensors")
        wins, losses = tensors["wins"], tensors["losses"]
        meta = json.loads((source / "pairs.json").read_text())
    else:
        start = time.perf_counter()
        wins, losses, index, rates, by_tag = sample_pairs(
            model, records, parse_per_prompt(args.per_prompt), args.seed, args.sample_batch
        )
        meta = {"index": index, "rates": rates, "pairs": by_tag, "seconds": time.perf_counter() - start}
        save_file({"wins": wins.contiguous(), "losses": losses.contiguous()}, args.out / "pairs.safetensors")
        (args.out / "pairs.json").write_text(json.dumps(meta))
    index = meta["index"]
    report["pairs"] = meta["pairs"]
    report["rates"] = meta["rates"]
    for tag, r in sorted(meta["rates"].items()):
        print(f"  {tag:12s} passed {r['passed']:5d} of {r['tried']:5d}; pairs {meta['pairs'].get(tag, 0)}")
    if not index:
        raise SystemExit("no prompt has both a passing and a failing sample: no pairs")

    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    real = instruct_examples(args.seed, 2, args.real_prompts, colourless_pair_renders=12) if args.real else []
    set_trainable(model, "instruct")
    model.train()
    optimizer = build_optimizer(model.named_parameters(), args.lr, weight_decay=0.0)
    ema = EMA(model, args.ema)
    rng = random.Random(args.seed)
    flow = model.config.flow
    log = []
    start = time.perf_counter()
    for step in tqdm(range(args.steps), desc="preference"):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warmup_cosine_factor(step, args.warmup, args.steps, 0.1)
        picks = [rng.randrange(len(index)) for _ in range(args.pairs)]
        prompts = [records[index[i]]["prompt"] for i in picks]
        generator = torch.Generator().manual_seed(args.seed * 7919 + step)
        loss, accuracy, d = dpo_loss(
            model, ref, wins[picks], losses[picks], prompts, args.beta, generator, flow, args.guided
        )
        metrics = {"dpo": loss.item(), "acc": accuracy, "d": d}
        if real:
            examples = [real[rng.randrange(len(real))] for _ in range(args.real)]
            with torch.no_grad():
                x0 = model.encode_target([e.image for e in examples]).float()  # (R, C, g, g)
            cond = model.condition([e.short_caption for e in examples]).float()
            flow_loss, _ = flow_matching_loss(model.dit, x0, cond, generator=generator, cfg=flow)
            loss = loss + flow_loss
            metrics["flow"] = flow_loss.item()
        update(model, optimizer, ema, loss)
        if step % 25 == 0 or step == args.steps - 1:
            log.append({"step": step, **metrics})
            print(json.dumps(log[-1]), flush=True)
    report["train_seconds"] = time.perf_counter() - start
    report["log"] = log
    ema.copy_to(model)
    model.eval().save_pretrained(args.out / "model")
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"preference-tuned {args.steps} steps in {report['train_seconds']:.0f} s -> {args.out / 'model'}")
    return report


if __name__ == "__main__":
    main()
