"""Optimizer, learning-rate schedule and EMA of the trained weights.

All three are model-agnostic and work on plain, DDP-wrapped (pass the wrapper; `EMA` unwraps it) and FSDP2
modules (parameters are DTensors: AdamW handles them, the EMA keeps its shadow sharded the same way).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim import AdamW
from torch.optim.lr_scheduler import LambdaLR

from blip3o.train.parallelize import reshard, unwrap

# Substrings of a parameter's own name or of its owning module's name that mark it as an embedding-like
# parameter: learnable queries, position embeddings, class tokens and token-embedding tables.
NO_DECAY_NAME_PARTS: tuple[str, ...] = ("quer", "pos_embed", "cls_token", "embed_tokens", "embedding")


def uses_weight_decay(name: str, param: Tensor) -> bool:
    """The weight-decay rule: decay matrices, never vectors, scalars or embedding-like parameters.

    - `param.ndim < 2`: biases, norm scales, gates and scalars. Decaying them pulls norms towards zero
      and fights the normalisation they exist for.
    - The parameter's own name or its owning module's name (the last two dotted parts) contains one of
      `NO_DECAY_NAME_PARTS`, e.g. `latent_queries`, `feature_pos_embed`, `embed_tokens.weight`: these are
      looked-up vectors, not maps, and shrinking them only changes their scale.
    Only those two parts are looked at, so `norm1.linear.weight` (an adaLN projection matrix) and
    `patch_embedder.proj.weight` (a linear map) are decayed.
    """
    if param.ndim < 2:
        return False
    own_parts = [part.lower() for part in name.split(".")[-2:]]
    return not any(marker in part for part in own_parts for marker in NO_DECAY_NAME_PARTS)


def build_optimizer(
    named_params: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> AdamW:
    """AdamW over the trainable parameters, in two groups: decayed and not (see `uses_weight_decay`).

    Parameters without requires_grad are skipped, so `model.named_parameters()` can be passed directly.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in named_params:
        if param.requires_grad:
            (decay if uses_weight_decay(name, param) else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("build_optimizer got no trainable parameters (all have requires_grad=False?)")
    groups = [
        {"params": params, "weight_decay": wd}
        for params, wd in ((decay, weight_decay), (no_decay, 0.0))
        if params
    ]
    return AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The lr multiplier at `step`: linear 0 -> 1 over `warmup_steps`, cosine 1 -> min_lr_ratio at
    `total_steps`, then flat at min_lr_ratio. Step 0 (the first update) has factor 0 when warming up."""
    if step < warmup_steps:
        return step / warmup_steps
    if step >= total_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1
) -> LambdaLR:
    """Linear warmup from 0, cosine decay to `min_lr_ratio * lr` at `total_steps`, flat after.

    Call `scheduler.step()` once after each `optimizer.step()`. The schedule's parameters are not part of
    the scheduler's state dict (only its step count is), so a resumed run follows its *current* config.
    """
    if warmup_steps < 0 or total_steps < warmup_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps, got {warmup_steps} and {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    factor = partial(
        warmup_cosine_factor, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio
    )
    return LambdaLR(optimizer, factor)


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: writing to it writes the DTensor), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _trainable(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The trainable parameters by name; under FSDP2 the sharded ones (after a no_grad forward the root
    unit would otherwise expose its gathered copies, which the optimizer never sees)."""
    module = unwrap(module)
    reshard(module)
    return ((name, p) for name, p in module.named_parameters() if p.requires_grad)


class EMA:
    """Exponential moving average of a module's trainable parameters, kept in float32.

    After each optimizer step, `update(model)` sets shadow <- d * shadow + (1 - d) * param with
    d = decay, or with `warmup=True` d = min(decay, (1 + n) / (10 + n)) where n counts earlier updates:
    the first averages forget the random initialisation quickly (d = 0.1, 0.18, 0.25, ...) instead of
    staying near it for ~1/(1 - decay) steps, which matters for short runs with decay 0.9999.

    Under FSDP2 each shadow is a DTensor sharded like its parameter and updates touch only local shards
    (no communication); `state_dict()` gathers full tensors (a collective: call it on every rank).
    Under DDP pass the wrapper or the model, names are those of the unwrapped model.
    """

    def __init__(self, module: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        with torch.no_grad():
            self.shadow: dict[str, Tensor] = {
                name: p.detach().to(torch.float32, copy=True) for name, p in _trainable(module)
            }
        if not self.shadow:
            raise ValueError("EMA got a module with no trainable parameters")

    def current_decay(self) -> float:
        """The decay the next `update` will use."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    def _pairs(self, module: nn.Module) -> Iterator[tuple[Tensor, nn.Parameter]]:
        params = dict(_trainable(module))
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - params.keys())
            extra = sorted(params.keys() - self.shadow.keys())
            raise ValueError(
                f"EMA/module trainable parameters differ: missing {missing[:5]}, extra {extra[:5]}"
            )
        return ((self.shadow[name], params[name]) for name in self.shadow)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Move the average one step towards the module's current trainable parameters."""
        weight = 1.0 - self.current_decay()
        for shadow, param in self._pairs(module):
            _local(shadow).lerp_(_local(param).float(), weight)  # shadow + w (param - shadow)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Overwrite the module's trainable parameters with the averages (cast to each parameter's dtype)."""
        for shadow, param in self._pairs(module):
            _local(param).copy_(_local(shadow))

    @contextmanager
    def swapped_in(self, module: nn.Module) -> Iterator[nn.Module]:
        """Temporarily run the module with the averaged weights (e.g. for sampling); the trained weights
        are restored exactly on exit, also when the body raises."""
        with torch.no_grad():
            backup = {name: _local(p).clone() for name, p in _trainable(module)}
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad():
                for name, p in _trainable(module):
                    _local(p).copy_(backup[name])

    def state_dict(self) -> dict[str, Any]:
        """{"decay", "warmup", "num_updates", "shadow": {name: full float32 CPU tensor}}."""
        shadow = {}
        for name, tensor in self.shadow.items():
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            shadow[name] = full.detach().cpu().clone()
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates, "shadow": shadow}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` output; full tensors are re-sharded like the current shadow."""
        saved = state["shadow"]
        if saved.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - saved.keys())
            extra = sorted(saved.keys() - self.shadow.keys())
            raise ValueError(f"EMA state does not match: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, current in self.shadow.items():
            full = saved[name]
            if tuple(full.shape) != tuple(current.shape):
                raise ValueError(f"EMA state {name}: shape {tuple(full.shape)} != {tuple(current.shape)}")
            if isinstance(current, DTensor):
                # Every rank holds the full tensor, so each takes its own slice (no communication).
                full = distribute_tensor(
                    full.to(current.device).detach(),
                    current.device_mesh,
                    current.placements,
                    src_data_rank=None,
                )
            _local(current).copy_(_local(full))
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
