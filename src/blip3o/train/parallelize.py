"""Process groups, seeding, and the one place where DDP / FSDP2 is applied to single-device model code.

torchtitan-style: models are written for one device and know nothing about distribution; the training
loop calls `parallelize(model, strategy, dist, shard_units=...)` once, then trains the returned module.

Launch: `torchrun --nproc_per_node N -m ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without them the process
runs alone with no process group and every helper here degrades to its single-process meaning
(`all_reduce_mean` returns the value, `barrier` does nothing).
"""

from __future__ import annotations

import gc
import hashlib
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

Strategy = Literal["none", "ddp", "fsdp"]
MixedPrecision = Literal["fp32", "bf16"]

NO_PROCESS_GROUP = "none"


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. `backend` is "gloo"/"nccl", or "none" when running alone."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = NO_PROCESS_GROUP

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """A process group exists (launched by torchrun), so collectives must be called on every rank."""
        return self.backend != NO_PROCESS_GROUP


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was requested but CUDA is not available")
        return torch.device("cuda", local_rank)
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun job described by the environment, or run alone when there is none.

    device: "auto" (CUDA when available), "cpu" or "cuda". Backend: nccl on CUDA, gloo on CPU. On CUDA each
    process uses GPU `LOCAL_RANK`. Calling it again after the group exists returns the same description.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(device=_resolve_device(device, local_rank=0))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _resolve_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not torch_dist.is_initialized():
        # device_id binds the NCCL communicator to this GPU up front (and lets barrier() know the device).
        torch_dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)


def shutdown_distributed() -> None:
    """Destroy the process group if one exists (safe to call when running alone).

    Drop your references to DDP-wrapped modules first. A DDP reducer that outlives its process group
    sporadically aborts the process at exit ("terminate called without an active exception", gloo, torch
    2.13), so unreachable wrappers still waiting in reference cycles are collected here before the group
    goes away.
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        gc.collect()
        torch_dist.destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """A 63-bit seed for (seed, rank), derived by hashing the pair.

    Hashing rather than `seed + 1000 * rank`: with an offset, (seed=1000, rank=0) and (seed=0, rank=1) get
    the same stream; hashed seeds of distinct pairs are unrelated.
    """
    digest = hashlib.sha256(f"blip3o-seed:{seed}:rank:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_everything(seed: int, rank: int) -> int:
    """Seed python `random`, numpy's global RNG and torch (CPU and all CUDA devices) for this rank.

    Every rank gets a different stream (different dropout masks and noise on different data shards). Build
    the model *before* calling this, under a rank-independent `torch.manual_seed(seed)`, when its
    initialisation must agree across ranks; `parallelize` also broadcasts rank 0's weights to be safe.
    Returns the derived seed (numpy gets it modulo 2**32, the most its legacy seeding accepts).
    """
    derived = rank_seed(seed, rank)
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)  # also seeds every CUDA device
    return derived


def _broadcast_from_rank0(module: nn.Module) -> None:
    # fully_shard keeps each rank's own slice of its *local* weights; if ranks initialised differently the
    # sharded model would be a patchwork. DDP broadcasts at construction; FSDP2 does not, so we do it here.
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            torch_dist.broadcast(tensor.data, src=0)


def parallelize(
    module: nn.Module,
    strategy: Strategy,
    dist: DistInfo,
    shard_units: Sequence[nn.Module] = (),
    mixed_precision: MixedPrecision = "fp32",
    *,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """Move `module` to `dist.device` and apply the data-parallel strategy.

    - "none": the module itself (on the device). The caller handles bf16 with `torch.autocast`.
    - "ddp": DistributedDataParallel. Only parameters with requires_grad are synchronised, so frozen
      submodules (the stage-2 backbone) are fine. `find_unused_parameters=False` by default: it costs a
      graph traversal every step and BLIP3-o's trainable parts (queries, DiT) are used by every step — CFG
      dropout zeroes the condition by multiplication, which keeps the graph intact. Pass True only for a
      model that really skips trainable parameters on some steps (DDP then tells you which). bf16 is the
      caller's `torch.autocast`; `mixed_precision` is not used by DDP.
    - "fsdp": FSDP2 `fully_shard` on each of `shard_units` (e.g. transformer blocks), then on the root, which
      takes every parameter not in a unit. Frozen and trainable parameters may share a unit (FSDP2 shards
      per parameter and reduce-scatters only gradients that exist; tested with a frozen layer in the root).
      Frozen parameters are sharded too, and gathered whenever their unit runs: put a frozen backbone's
      layers in `shard_units` as well, or the root gathers all of it at once. "bf16" sets
      `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`: compute in bf16, sharded fp32 master
      weights, gradients reduced in fp32. FSDP2 cannot shard 0-dim parameters (CLIP's logit scale): they
      are left whole on every rank (`ignored_params`, kept in their own dtype), and a trainable one has its
      gradient averaged over the ranks after each backward, as FSDP2 averages the sharded ones.
    """
    module = module.to(dist.device)
    if strategy == "none":
        return module
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be 'none', 'ddp' or 'fsdp', got {strategy!r}")
    if mixed_precision not in ("fp32", "bf16"):
        raise ValueError(f"mixed_precision must be 'fp32' or 'bf16', got {mixed_precision!r}")
    scalars = _scalar_parameters(module) if strategy == "fsdp" else {}
    if not dist.is_distributed:
        raise RuntimeError(
            f"strategy {strategy!r} needs a process group: launch with torchrun, or use strategy 'none'"
        )
    if strategy == "ddp":
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        return DistributedDataParallel(
            module, device_ids=device_ids, find_unused_parameters=find_unused_parameters
        )

    _broadcast_from_rank0(module)
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision == "bf16"
        else MixedPrecisionPolicy()
    )
    # Scalars (CLIP's logit_scale) stay whole on every rank; fully_shard refuses them. Nothing else reduces
    # a trainable one's gradient, so it is averaged here once it has accumulated (every micro-step: the mean of
    # sums is the sum of means).
    ignored = set(scalars.values()) or None
    for scalar in scalars.values():
        if scalar.requires_grad:
            scalar.register_post_accumulate_grad_hook(_average_gradient_over_ranks)
    for unit in shard_units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    fully_shard(module, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    return module


def _average_gradient_over_ranks(parameter: Tensor) -> None:
    assert parameter.grad is not None  # the hook runs after accumulating into .grad
    torch_dist.all_reduce(parameter.grad, op=torch_dist.ReduceOp.SUM)  # gloo has no AVG
    parameter.grad.div_(torch_dist.get_world_size())


def _scalar_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.ndim == 0}


def unwrap(module: nn.Module) -> nn.Module:
    """The model under DDP (and torch.compile); an FSDP2 module is the model itself, its names unchanged."""
    while True:
        if isinstance(module, DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):  # torch.compile's OptimizedModule
            module = module._orig_mod
        else:
            return module


def reshard(module: nn.Module) -> None:
    """Put every FSDP2 unit of `module` back into its sharded state (a no-op for other modules).

    FSDP2 leaves the root unit unsharded after a forward pass that has no backward (e.g. sampling under
    no_grad): its registered parameters are then the gathered full tensors, not the sharded DTensors the
    optimizer and the EMA hold. Call this before reading or writing parameters outside a training step.
    """
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def all_reduce_mean(x: float | Tensor, dist: DistInfo) -> float:
    """The mean of a scalar over all ranks (for logging losses); the value itself when running alone."""
    value = x.detach().float().mean() if isinstance(x, Tensor) else torch.tensor(float(x))
    if not dist.is_distributed:
        return float(value)
    value = value.to(dist.device, torch.float32)
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
    return float(value) / dist.world_size


def barrier(dist: DistInfo) -> None:
    """Wait for every rank; nothing to wait for when running alone."""
    if dist.is_distributed:
        torch_dist.barrier()


def _total_norm(grads: list[Tensor], norm_type: float) -> Tensor:
    norm = torch.nn.utils.get_total_norm(grads, norm_type=norm_type)
    # FSDP2 gradients are sharded DTensors: their norm is a DTensor holding partial results; full_tensor()
    # reduces it across ranks into the true global norm, identical on every rank.
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def clip_grad_norm(params: Iterable[Tensor], max_norm: float, norm_type: float = 2.0) -> float:
    """Scale gradients so their global norm is at most `max_norm`; return the norm before clipping.

    Works for plain, DDP (already averaged plain tensors) and FSDP2 (DTensor) parameters; a mix of plain
    and DTensor gradients is handled by combining the per-kind norms (||a ++ b||_p = ||(||a||_p, ||b||_p)||_p).
    Use max_norm=inf to only measure.
    """
    with_grad = [p for p in params if p.grad is not None]
    sharded = [p for p in with_grad if isinstance(p.grad, DTensor)]
    local = [p for p in with_grad if not isinstance(p.grad, DTensor)]
    groups = [group for group in (sharded, local) if group]
    if not groups:
        return 0.0
    parts = [_total_norm([p.grad for p in group], norm_type) for group in groups]
    total = parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack(parts), ord=norm_type)
    for group in groups:  # separately: one foreach kernel cannot take DTensors and plain tensors together
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return float(total)
