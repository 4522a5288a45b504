"""Toy data-parallel training for tests/test_train_infra.py: the same 5 steps on 1 process or many.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/dist_toy_train.py --strategy fsdp --out /tmp/toy \
        [--resume CKPT_DIR] [--bf16]

The global batch of every step is a fixed function of the step and is split evenly across ranks, so any
world size computes the same losses up to float rounding. The model mixes a frozen layer and trainable
queries in the FSDP2 root unit, like stage 2 (frozen backbone + trainable queries + trainable DiT), and a frozen
and a trainable 0-dim parameter, which FSDP2 leaves unsharded (the trainable one's gradient averaged by hand).
Rank 0 writes `OUT/result.json`; checkpoints go to `OUT/run` (after steps 3 and 5), the final model to
`OUT/export` (release layout).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from blip3o.train.checkpoint import (
    CheckpointError,
    export_safetensors,
    gather_model_state_dict,
    load_training_state,
    save_training_state,
)
from blip3o.train.optim import EMA, build_optimizer, warmup_cosine
from blip3o.train.parallelize import (
    DistInfo,
    all_reduce_mean,
    barrier,
    clip_grad_norm,
    init_distributed,
    parallelize,
    shutdown_distributed,
)

GLOBAL_BATCH = 8
STEPS = 5
SAVE_AT = (3, 5)
IN_DIM, WIDTH = 6, 16


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(IN_DIM, WIDTH)  # stands for the frozen backbone
        self.frozen.requires_grad_(False)
        self.temperature = nn.Parameter(torch.tensor(0.9), requires_grad=False)  # FSDP2 cannot shard 0-dim
        self.gain = nn.Parameter(torch.tensor(1.2))  # nor this trainable one (stands for CLIP's logit scale)
        self.latent_queries = nn.Parameter(torch.randn(4, WIDTH) * 0.1)
        self.blocks = nn.ModuleList([nn.Linear(WIDTH, WIDTH) for _ in range(2)])
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, IN_DIM) -> (B,)
        h = torch.tanh(self.frozen(x) * self.temperature) + self.latent_queries.mean(0)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h).squeeze(-1) * self.gain


def build_model() -> Toy:
    torch.manual_seed(0)  # identical on every rank and in the test process
    return Toy()


def global_batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, IN_DIM, generator=g), torch.randn(GLOBAL_BATCH, generator=g)


def probe_input() -> Tensor:
    return torch.randn(3, IN_DIM, generator=torch.Generator().manual_seed(7))


def train(
    strategy: str,
    dist: DistInfo,
    out: Path,
    resume: Path | None = None,
    mixed_precision: str = "fp32",
    save: bool = True,
) -> dict[str, Any]:
    """Train (or resume) to STEPS; return losses (mean over ranks), grad norms and probe outputs."""
    model = build_model()
    wrapped = parallelize(
        model, strategy, dist, shard_units=list(model.blocks), mixed_precision=mixed_precision
    )
    optimizer = build_optimizer(model.named_parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = warmup_cosine(optimizer, warmup_steps=2, total_steps=STEPS)
    ema = EMA(model, decay=0.8)
    start = 0
    if resume is not None:
        start = load_training_state(resume, wrapped, optimizer, scheduler, ema=ema, dist=dist)["step"]
    losses, grad_norms = [], []
    rows = GLOBAL_BATCH // dist.world_size
    for step in range(start, STEPS):
        x, y = global_batch(step)
        x, y = x[dist.rank * rows : (dist.rank + 1) * rows], y[dist.rank * rows : (dist.rank + 1) * rows]
        loss = F.mse_loss(wrapped(x.to(dist.device)).float(), y.to(dist.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norms.append(clip_grad_norm(model.parameters(), max_norm=1.0))
        optimizer.step()
        scheduler.step()
        ema.update(wrapped)
        losses.append(all_reduce_mean(loss, dist))
        if save and step + 1 in SAVE_AT:
            with torch.no_grad():  # like sampling before a save: leaves FSDP2's root unit unsharded
                wrapped(probe_input().to(dist.device))
            save_training_state(
                out / "run", step + 1, wrapped, optimizer, scheduler, ema=ema, dist=dist, keep_last=None
            )
    full_state = gather_model_state_dict(wrapped)  # every rank; rank 0 gets the tensors
    if save and dist.is_main:
        export_safetensors(full_state, out / "export", config={"toy": True})
    all_params_sharded = all(isinstance(p, DTensor) for p in model.parameters() if p.ndim > 0)
    with torch.no_grad():
        probe = wrapped(probe_input().to(dist.device)).float().cpu()
        with ema.swapped_in(model):
            ema_probe = wrapped(probe_input().to(dist.device)).float().cpu()
        after_swap = wrapped(probe_input().to(dist.device)).float().cpu()
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "probe": probe.tolist(),
        "ema_probe": ema_probe.tolist(),
        "probe_unchanged_by_swap": torch.equal(probe, after_swap),
        "all_params_sharded": all_params_sharded,  # but the scalar, see parallelize
    }


def damaged_load_raises_everywhere(strategy: str, dist: DistInfo, out: Path) -> bool:
    """Rank 0 truncates a copy of the step-5 checkpoint's optimizer file; every rank must get a
    CheckpointError (none may be left waiting in a collective)."""
    damaged = out / "damaged"
    if dist.is_main:
        shutil.copytree(out / "run" / "checkpoints" / "step_00000005", damaged)
        (damaged / "optimizer.pt").write_bytes(b"not a checkpoint")
    barrier(dist)
    model = build_model()
    wrapped = parallelize(model, strategy, dist, shard_units=list(model.blocks))
    optimizer = build_optimizer(model.named_parameters(), lr=1e-2, weight_decay=0.1)
    try:
        load_training_state(damaged, wrapped, optimizer, dist=dist)
        raised = 0.0
    except CheckpointError:
        raised = 1.0
    return all_reduce_mean(raised, dist) == 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--strategy", choices=["none", "ddp", "fsdp"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", type=Path, help="also resume this checkpoint (step 3) to step 5")
    parser.add_argument("--bf16", action="store_true", help="also train once with bf16 mixed precision")
    args = parser.parse_args()
    dist = init_distributed("cpu")
    result = {"world_size": dist.world_size, "fresh": train(args.strategy, dist, args.out)}
    if args.resume is not None:
        result["resumed"] = train(args.strategy, dist, args.out, resume=args.resume, save=False)
    if args.bf16:
        result["bf16"] = train(args.strategy, dist, args.out, mixed_precision="bf16", save=False)
    result["damaged_load_raises_everywhere"] = damaged_load_raises_everywhere(args.strategy, dist, args.out)
    if dist.is_main:
        (args.out / "result.json").write_text(json.dumps(result))
    shutdown_distributed()


if __name__ == "__main__":
    main()
