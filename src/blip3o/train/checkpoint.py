"""Crash-safe training checkpoints that resume exactly, on any number of processes.

Layout of one checkpoint, `run_dir/checkpoints/step_{step:08d}/`:

    model.safetensors     full (unsharded) model state dict, or only trainable params + buffers
    ema.safetensors       EMA shadow weights (metadata: decay, warmup, num_updates), when an EMA is used
    optimizer.pt          optimizer state dict, keyed by parameter name (FQN), loaded with weights_only=True
    rng_rank{r}.pt        RNG states of rank r: python, numpy, torch CPU/CUDA, the named torch.Generators
    trainer_state.json    step, scheduler state, data state, config, time, versions (written last)

Crash safety: every file goes through `atomic_write`; the directory is assembled under a hidden temporary
name (`.tmp-step_...`) and renamed into place at the end, so a visible `step_*` directory is complete.

Distribution: model and optimizer state are gathered into full, name-keyed state dicts with
`torch.distributed.checkpoint.state_dict` (full_state_dict + cpu_offload), and rank 0 alone writes. Loading
reads on rank 0 and broadcasts (`broadcast_from_rank0`), so only rank 0 needs to see the files and a
checkpoint reloads on any world size (1 <-> N processes, plain <-> DDP <-> FSDP2). RNG states are per rank;
resuming on a different world size cannot restore them (warning) — the run then continues correctly but not
bitwise like the original.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch
import torch.distributed as torch_dist
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim.lr_scheduler import LRScheduler

import blip3o
from blip3o.train.optim import EMA
from blip3o.train.parallelize import DistInfo, reshard, unwrap

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-"
STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the objects it is loaded into."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


# ----------------------------------------------------------------------------------------- atomic files


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable: without it a power loss can forget the new directory entry.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write_fn: Callable[[Path], None]) -> Path:
    """Write a file so that `path` either keeps its old content or has the complete new one.

    `write_fn(tmp)` writes to a temporary path in the same folder (same filesystem, so the rename is
    atomic); it is then fsynced, renamed over `path`, and the folder fsynced. If `write_fn` raises, the
    temporary file is removed and the error propagates; `path` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # some writers (safetensors) create 0600 files
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors writer that accepts tied weights: a tensor that is exactly another one (same storage,
    offset, shape, stride) is stored once and recorded as an alias in the metadata; other tensors sharing
    storage are copied, since safetensors refuses shared storage."""
    unique: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    storages: dict[int, int] = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
            tensor.device,
        )
        if tensor.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        unique[name] = tensor
        storages[key[0]] = storages.get(key[0], 0) + 1
    for name, tensor in unique.items():
        shared = storages[tensor.untyped_storage().data_ptr()] > 1 and tensor.numel() > 0
        tensor = tensor.to("cpu").contiguous()
        unique[name] = tensor.clone() if shared else tensor
    meta = {"format": "pt", **(metadata or {})}
    if aliases:
        meta["aliases"] = json.dumps(aliases, sort_keys=True)
    atomic_write(path, lambda tmp: save_file(unique, tmp, metadata=meta))


def _load_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors with aliases restored, metadata); CheckpointError when missing or unreadable."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        aliases = json.loads(metadata.get("aliases", "{}"))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    for alias, target in aliases.items():
        if target not in tensors:
            raise CheckpointError(f"{path}: alias {alias!r} points to missing tensor {target!r}")
        tensors[alias] = tensors[target]
    return tensors, metadata


def _torch_save(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot be loaded with weights_only=True ({type(e).__name__}: {e})"
        ) from e


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------------------------- RNG


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """This process's RNG states as weights_only-loadable types (tensors, ints, floats, lists, None)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
        "numpy": {
            "bit_generator": str(np_kind),
            "key": torch.from_numpy(np.asarray(np_key, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": None,
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of `capture_rng_state`. Every generator passed must have a saved state."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    key = npy["key"].numpy().astype(np.uint32)
    np.random.set_state((npy["bit_generator"], key, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch_cpu"])
    if state["torch_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"], torch.cuda.current_device())
    saved = state["generators"]
    for name, generator in (generators or {}).items():
        if name not in saved:
            raise CheckpointError(f"no saved state for generator {name!r}; saved: {sorted(saved)}")
        generator.set_state(saved[name])


# ------------------------------------------------------------------------------------ rank-0 helpers


def _resolve_dist(dist: DistInfo | None) -> DistInfo:
    if dist is not None:
        return dist
    if torch_dist.is_available() and torch_dist.is_initialized():
        raise ValueError("a process group exists: pass dist=DistInfo from init_distributed()")
    return DistInfo()


def _on_main(dist: DistInfo, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 and share its (small, picklable) result with every rank.

    If it fails, every rank raises — the other ranks would otherwise wait forever in the next collective.
    """
    result, error = None, None
    if dist.is_main:
        try:
            result = fn()
        except Exception as e:
            if not dist.is_distributed:
                raise
            error = e
    if dist.is_distributed:
        box = [(None if error is None else f"{type(error).__name__}: {error}", result)]
        torch_dist.broadcast_object_list(box, src=0)
        message, result = box[0]
        if error is not None:
            raise error
        if message is not None:
            raise CheckpointError(f"rank 0 failed: {message}")
    return result


def _broadcast_tensors(tensors: dict[str, Tensor] | None, dist: DistInfo) -> dict[str, Tensor]:
    """Rank 0's tensors on every rank (CPU), sent one at a time to bound device memory."""
    if not dist.is_distributed:
        assert tensors is not None
        return tensors
    box = [{name: (t.shape, t.dtype) for name, t in tensors.items()} if dist.is_main else None]
    torch_dist.broadcast_object_list(box, src=0)
    received: dict[str, Tensor] = {}
    for name, (shape, dtype) in box[0].items():
        if dist.is_main:
            buffer = tensors[name].to(dist.device, copy=dist.device.type == "cpu")  # type: ignore[index]
        else:
            buffer = torch.empty(shape, dtype=dtype, device=dist.device)
        torch_dist.broadcast(buffer, src=0)
        received[name] = buffer.cpu()
    return received


# --------------------------------------------------------------------------------------------- save


def _complete_step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and entry.is_dir() and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The highest-step complete checkpoint of a run, or None. Temporary and incomplete directories (no
    trainer_state.json, which is written last) are ignored."""
    found = _complete_step_dirs(Path(run_dir) / CHECKPOINTS)
    return found[-1][1] if found else None


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "blip3o": blip3o.__version__}


def _publish(tmp_dir: Path, final_dir: Path) -> None:
    # os.replace cannot replace a non-empty directory: move an existing same-step checkpoint aside first.
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f"{TMP_PREFIX}old-{final_dir.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)
    if old is not None:
        shutil.rmtree(old)


def _prune(root: Path, keep_last: int | None, keep: Path) -> None:
    if keep_last is None:
        return
    complete = [path for _, path in _complete_step_dirs(root)]
    for path in complete[: max(len(complete) - keep_last, 0)]:
        if path != keep:  # never the checkpoint just written, even after resuming from an older one
            shutil.rmtree(path)


def gather_model_state_dict(model: nn.Module, trainable_only: bool = False) -> dict[str, Tensor]:
    """The model's full, unsharded CPU state dict with unwrapped names, for exports and evaluation copies.

    A collective under DDP/FSDP2: call it on every rank. Distributed, rank 0 gets the tensors and the other
    ranks an empty dict; alone, the tensors are the module's own (not copies). Touching FSDP2 parameters on
    rank 0 only (e.g. `unwrap(model).save_pretrained(...)` inside `if dist.is_main`) waits forever for the
    other ranks: gather with this first, then write on rank 0.
    """
    reshard(model)  # e.g. after sampling under no_grad, FSDP2's root unit still holds gathered parameters
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def save_training_state(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: LRScheduler | None,
    ema: EMA | None = None,
    data_state: dict[str, Any] | None = None,
    generators: dict[str, torch.Generator] | None = None,
    config: dict[str, Any] | None = None,
    keep_last: int | None = 3,
    dist: DistInfo | None = None,
    trainable_only: bool = False,
) -> Path:
    """Write `run_dir/checkpoints/step_{step:08d}/` (see the module docstring) and return its path.

    Call on every rank (it gathers sharded state). `model` may be plain, DDP or FSDP2; names in the files
    are those of the unwrapped model. `trainable_only=True` stores only parameters with requires_grad (plus
    buffers) — for stage 2, whose frozen backbone (GBs) is identical in every checkpoint and restored from
    its own weights; loading then requires the model to already hold those frozen weights. The default
    stores the whole model so that a checkpoint alone restores it. `data_state` and `config` must be JSON
    serialisable; `data_state` is rank 0's. `keep_last=None` keeps every checkpoint.
    """
    dist = _resolve_dist(dist)
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    # Everything that can fail on bad input fails here, on every rank, before any collective.
    state_json = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "unix_time": time.time(),
        "world_size": dist.world_size,
        "trainable_only": trainable_only,
        "has_ema": ema is not None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "data_state": data_state,
        "config": config,
        "versions": _versions(),
    }
    try:
        state_text = json.dumps(state_json)
    except (TypeError, ValueError) as e:
        raise TypeError(f"trainer state (scheduler, data_state, config) is not JSON serialisable: {e}") from e

    model_sd = gather_model_state_dict(model, trainable_only)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    ema_sd = ema.state_dict() if ema is not None else None
    rng_states: list[Any] = [capture_rng_state(generators)]
    if dist.is_distributed:
        gathered: list[Any] | None = [None] * dist.world_size if dist.is_main else None
        torch_dist.gather_object(rng_states[0], gathered, dst=0)
        rng_states = gathered or []

    root = Path(run_dir) / CHECKPOINTS
    final_dir = root / step_dir_name(step)

    def write() -> None:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a crash; one writer per run directory
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        tmp_dir = root / f"{TMP_PREFIX}{final_dir.name}"
        tmp_dir.mkdir()
        _save_tensors(tmp_dir / MODEL_FILE, model_sd)
        if ema_sd is not None:
            ema_meta = {k: ema_sd[k] for k in ("decay", "warmup", "num_updates")}
            _save_tensors(tmp_dir / EMA_FILE, ema_sd["shadow"], {"ema": json.dumps(ema_meta)})
        if optim_sd is not None:
            _torch_save(tmp_dir / OPTIMIZER_FILE, optim_sd)
        for rank, rng in enumerate(rng_states):
            _torch_save(tmp_dir / rng_file(rank), rng)
        _write_json(tmp_dir / STATE_FILE, json.loads(state_text))  # last: marks the directory complete
        _publish(tmp_dir, final_dir)
        _prune(root, keep_last, keep=final_dir)

    _on_main(dist, write)
    return final_dir


# --------------------------------------------------------------------------------------------- load


def _check_model_keys(saved: dict[str, Tensor], model: nn.Module, trainable_only: bool, path: Path) -> None:
    current = unwrap(model).state_dict()
    trainable = {name for name, p in unwrap(model).named_parameters() if p.requires_grad}
    required = trainable if trainable_only else set(current)
    missing = sorted(required - saved.keys())
    unexpected = sorted(saved.keys() - current.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: does not match the model: {len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    for name, tensor in saved.items():
        if tuple(tensor.shape) != tuple(current[name].shape):
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the model {tuple(current[name].shape)}"
            )


def _check_optimizer_groups(
    saved: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, path: Path
) -> None:
    names = {id(p): name for name, p in unwrap(model).named_parameters()}
    current = [[names.get(id(p), "?") for p in group["params"]] for group in optimizer.param_groups]
    stored = [list(group["params"]) for group in saved.get("param_groups", [])]
    if [sorted(g) for g in current] != [sorted(g) for g in stored]:
        raise CheckpointError(
            f"{path}: optimizer parameter groups differ from the current optimizer's "
            f"(saved {[len(g) for g in stored]} params per group, current {[len(g) for g in current]})"
        )


def load_training_state(
    ckpt_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: LRScheduler | None = None,
    ema: EMA | None = None,
    generators: dict[str, torch.Generator] | None = None,
    dist: DistInfo | None = None,
) -> dict[str, Any]:
    """Restore what `save_training_state` wrote into already-built (and already parallelized) objects.

    Call on every rank. Returns {"step", "data_state", "config", "trainer_state", "rng_restored"}. RNG
    states (global ones and `generators`) are restored for this rank when the checkpoint has a file for it;
    otherwise (world size changed) a warning is issued and they are left as they are. Raises
    CheckpointError, with the path and the problem, for missing/corrupt files or a mismatching model.
    """
    dist = _resolve_dist(dist)
    ckpt_dir = Path(ckpt_dir)
    held: dict[str, Any] = {}  # large state, rank 0 only

    def read() -> dict[str, Any]:
        if not ckpt_dir.is_dir():
            raise CheckpointError(f"{ckpt_dir}: checkpoint directory does not exist")
        state = _read_json(ckpt_dir / STATE_FILE)
        if state.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{ckpt_dir / STATE_FILE}: unsupported format_version {state.get('format_version')!r}"
            )
        if scheduler is not None and state.get("scheduler") is None:
            raise CheckpointError(
                f"{ckpt_dir}: a scheduler was given but the checkpoint has no scheduler state"
            )
        held["model"], _ = _load_tensors(ckpt_dir / MODEL_FILE)
        _check_model_keys(held["model"], model, bool(state.get("trainable_only")), ckpt_dir / MODEL_FILE)
        if optimizer is not None:
            held["optimizer"] = _torch_load(ckpt_dir / OPTIMIZER_FILE)
            _check_optimizer_groups(held["optimizer"], model, optimizer, ckpt_dir / OPTIMIZER_FILE)
        if ema is not None:
            held["ema"], metadata = _load_tensors(ckpt_dir / EMA_FILE)
            if "ema" not in metadata:
                raise CheckpointError(f"{ckpt_dir / EMA_FILE}: no EMA metadata")
            held["ema_meta"] = json.loads(metadata["ema"])
        rng = [
            _torch_load(ckpt_dir / rng_file(rank)) if (ckpt_dir / rng_file(rank)).is_file() else None
            for rank in range(dist.world_size)
        ]
        return {"state": state, "rng": rng, "ema_meta": held.get("ema_meta")}

    reshard(model)
    shared = _on_main(dist, read)
    state = shared["state"]
    trainable_only = bool(state.get("trainable_only"))

    try:
        options = StateDictOptions(
            full_state_dict=True, strict=not trainable_only, broadcast_from_rank0=dist.is_distributed
        )
        set_model_state_dict(model, held.get("model", {}), options=options)
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, held.get("optimizer", {}), options=options)
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            shadow = _broadcast_tensors(held.get("ema"), dist)
            ema.load_state_dict({**shared["ema_meta"], "shadow": shadow})
    except CheckpointError:
        raise
    except Exception as e:  # the checks above make this a bug or an incompatible object, not a bad file
        raise CheckpointError(f"{ckpt_dir}: could not restore state ({type(e).__name__}: {e})") from e

    # Per-rank streams only mean something on the same world size; otherwise keep the fresh seeding.
    same_world = state.get("world_size") == dist.world_size
    rng_state = shared["rng"][dist.rank] if same_world else None
    if rng_state is not None:
        restore_rng_state(rng_state, generators)
    else:
        warnings.warn(
            f"{ckpt_dir}: saved with world size {state.get('world_size')}, resumed with {dist.world_size} "
            f"(or rng_rank{dist.rank}.pt is missing): RNG states are not restored, so the continuation is "
            "correct but not bitwise identical to an uninterrupted run",
            stacklevel=2,
        )
    return {
        "step": int(state["step"]),
        "data_state": state.get("data_state"),
        "config": state.get("config"),
        "trainer_state": state,
        "rng_restored": rng_state is not None,
    }


# ------------------------------------------------------------------------------------------- export


def export_safetensors(state_dict: dict[str, Tensor], directory: str | Path, config: dict[str, Any]) -> Path:
    """Release layout (as `from_pretrained` expects): `directory/config.json` + `directory/model.safetensors`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _save_tensors(directory / MODEL_FILE, state_dict)
    _write_json(directory / "config.json", config)
    return directory
