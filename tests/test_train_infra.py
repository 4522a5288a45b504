"""Training infrastructure: optimizer grouping, schedule, EMA, atomic checkpoints, exact resume, DDP/FSDP2."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from blip3o.train.checkpoint import (
    CheckpointError,
    atomic_write,
    export_safetensors,
    latest_checkpoint,
    load_training_state,
    save_training_state,
)
from blip3o.train.config import ConfigError
from blip3o.train.loop import _check_run_config
from blip3o.train.optim import EMA, build_optimizer, uses_weight_decay, warmup_cosine
from blip3o.train.overrides import apply_overrides
from blip3o.train.parallelize import (
    DistInfo,
    all_reduce_mean,
    clip_grad_norm,
    init_distributed,
    parallelize,
    rank_seed,
    seed_everything,
    unwrap,
)
from blip3o.train.presets import preset

TESTS = Path(__file__).parent
REPO = TESTS.parent

# ----------------------------------------------------------------------------------- optimizer, schedule


def test_warmup_cosine_follows_the_formula_by_hand():
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = warmup_cosine(optimizer, warmup_steps=4, total_steps=12, min_lr_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # warmup: 0, 1/4, 2/4, 3/4 of lr; cosine over steps 4..12: factor 0.1 + 0.9 * (1 + cos(pi p)) / 2
    assert lrs[0] == 0.0
    assert lrs[2] == pytest.approx(1.0)
    assert lrs[4] == pytest.approx(2.0)
    assert lrs[6] == pytest.approx(2.0 * (0.1 + 0.45 * (1 + math.cos(math.pi / 4))))  # p = 1/4: 1.7364
    assert lrs[8] == pytest.approx(2.0 * 0.55)  # p = 1/2
    assert lrs[12] == pytest.approx(0.2)
    assert lrs[15] == pytest.approx(0.2)  # flat after total_steps
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))  # never rises after warmup


def test_warmup_cosine_rejects_bad_arguments():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError):
        warmup_cosine(optimizer, warmup_steps=10, total_steps=5)
    with pytest.raises(ValueError):
        warmup_cosine(optimizer, warmup_steps=1, total_steps=5, min_lr_ratio=1.5)


def test_no_weight_decay_for_vectors_queries_and_embeddings():
    def p(*shape: int, trainable: bool = True) -> nn.Parameter:
        return nn.Parameter(torch.zeros(shape), requires_grad=trainable)

    named = {
        "layers.0.attn.to_q.weight": p(4, 4),
        "layers.0.norm1.linear.weight": p(8, 4),  # adaLN projection: a matrix named after a norm
        "patch_embedder.proj.weight": p(4, 2),  # a linear map, despite "embedder"
        "layers.0.attn.to_q.bias": p(4),
        "norm_out.weight": p(4),
        "attn2.gate": p(2),
        "latent_queries": p(1, 3, 4),
        "feature_pos_embed": p(3, 4),
        "vlm.model.embed_tokens.weight": p(10, 4),
        "frozen.weight": p(4, 4, trainable=False),
    }
    optimizer = build_optimizer(named.items(), lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95), eps=1e-8)
    by_id = {id(param): name for name, param in named.items()}
    groups = {g["weight_decay"]: {by_id[id(q)] for q in g["params"]} for g in optimizer.param_groups}
    assert groups[0.05] == {
        "layers.0.attn.to_q.weight",
        "layers.0.norm1.linear.weight",
        "patch_embedder.proj.weight",
    }
    assert groups[0.0] == {
        "layers.0.attn.to_q.bias",
        "norm_out.weight",
        "attn2.gate",
        "latent_queries",
        "feature_pos_embed",
        "vlm.model.embed_tokens.weight",
    }
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    assert not uses_weight_decay("x.bias", torch.zeros(3))
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer([("w", p(2, 2, trainable=False))], lr=1.0, weight_decay=0.0)


# ------------------------------------------------------------------------------------------------- EMA


class FrozenAndTrainable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(3, 4)
        self.frozen.requires_grad_(False)
        self.trained = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trained(torch.relu(self.frozen(x)))


def test_ema_maths_by_hand_without_and_with_warmup():
    module = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(0.0)
    plain = EMA(module, decay=0.9, warmup=False)
    warm = EMA(module, decay=0.9, warmup=True)
    with torch.no_grad():
        module.weight.fill_(1.0)
    plain.update(module)
    warm.update(module)  # d = min(0.9, 1/10) = 0.1
    assert plain.shadow["weight"].item() == pytest.approx(0.1)
    assert warm.shadow["weight"].item() == pytest.approx(0.9)
    plain.update(module)
    warm.update(module)  # d = min(0.9, 2/11)
    assert plain.shadow["weight"].item() == pytest.approx(0.9 * 0.1 + 0.1)
    assert warm.shadow["weight"].item() == pytest.approx(2 / 11 * 0.9 + 9 / 11)
    assert warm.num_updates == 2
    for _ in range(200):
        warm.update(module)
    assert warm.current_decay() == 0.9  # the warmup only ever lowers the decay


def test_ema_tracks_only_trainable_parameters_and_roundtrips():
    model = FrozenAndTrainable()
    ema = EMA(model, decay=0.5)
    assert set(ema.shadow) == {"trained.weight", "trained.bias"}
    with torch.no_grad():
        model.trained.weight.add_(1.0)
    ema.update(model)
    other = EMA(FrozenAndTrainable(), decay=0.1, warmup=False)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.5 and other.warmup and other.num_updates == 1
    for name in ema.shadow:
        assert torch.equal(other.shadow[name], ema.shadow[name])


def test_ema_swapped_in_uses_averages_and_restores_exactly():
    torch.manual_seed(0)
    model = FrozenAndTrainable()
    ema = EMA(model, decay=0.7)
    for _ in range(3):
        with torch.no_grad():
            model.trained.weight.add_(torch.randn_like(model.trained.weight))
        ema.update(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped_in(model):
        assert torch.equal(model.trained.weight, ema.shadow["trained.weight"])
        assert not torch.equal(model.trained.weight, before["trained.weight"])
        assert torch.equal(model.frozen.weight, before["frozen.weight"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="inside"), ema.swapped_in(model):
        raise RuntimeError("inside")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------- parallelize


def test_single_process_helpers(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    dist = init_distributed("cpu")
    assert (dist.rank, dist.world_size, dist.backend, dist.is_main, dist.is_distributed) == (
        0,
        1,
        "none",
        True,
        False,
    )
    model = FrozenAndTrainable()
    assert parallelize(model, "none", dist) is model
    assert unwrap(model) is model
    with pytest.raises(RuntimeError, match="torchrun"):
        parallelize(model, "fsdp", dist)
    assert all_reduce_mean(torch.tensor([1.0, 3.0]), dist) == 2.0
    assert all_reduce_mean(0.5, dist) == 0.5


def test_seeds_differ_per_rank_and_reproduce():
    assert rank_seed(1000, 0) != rank_seed(0, 1)  # where seed + 1000 * rank would collide
    seed_everything(3, rank=0)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(3, rank=1)
    b = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(3, rank=0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    assert all(x != y for x, y in zip(a, b, strict=True))


def test_clip_grad_norm_returns_the_norm_and_clips():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    frozen = nn.Parameter(torch.zeros(1), requires_grad=False)
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    norm = clip_grad_norm([a, b, frozen], max_norm=1.0)
    assert isinstance(norm, float) and norm == pytest.approx(5.0)
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.0]), atol=1e-6)
    assert torch.allclose(b.grad, torch.tensor([0.8]), atol=1e-6)
    assert clip_grad_norm([a, b], max_norm=math.inf) == pytest.approx(1.0, abs=1e-5)  # measure only
    assert clip_grad_norm([frozen], max_norm=1.0) == 0.0


# ------------------------------------------------------------------------------------- atomic writes


def test_atomic_write_failure_leaves_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "file.bin"

    def failing(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing)
    assert list(tmp_path.iterdir()) == []
    atomic_write(target, lambda tmp: tmp.write_bytes(b"old"))
    with pytest.raises(OSError):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new"


def _toy_training_objects(seed: int = 0):
    torch.manual_seed(seed)
    model = FrozenAndTrainable()
    optimizer = build_optimizer(model.named_parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = warmup_cosine(optimizer, warmup_steps=2, total_steps=10)
    return model, optimizer, scheduler, EMA(model, decay=0.9)


def _one_step(model, optimizer, scheduler, ema) -> None:
    loss = model(torch.randn(4, 3)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    ema.update(model)


def test_keep_last_prunes_and_latest_ignores_temporary_and_incomplete(tmp_path):
    model, optimizer, scheduler, ema = _toy_training_objects()
    for step in range(1, 6):
        _one_step(model, optimizer, scheduler, ema)
        save_training_state(tmp_path, step, model, optimizer, scheduler, ema=ema, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000005"]
    (root / ".tmp-step_00000009").mkdir()  # a crash while writing step 9
    (root / ".tmp-step_00000009" / "trainer_state.json").write_text("{}")
    (root / "step_00000010").mkdir()  # copied by hand, no trainer_state.json
    assert latest_checkpoint(tmp_path) == root / "step_00000005"
    assert latest_checkpoint(tmp_path / "nowhere") is None
    # Saving the same step twice replaces it; the stale temporary directory is cleaned up.
    save_training_state(tmp_path, 5, model, optimizer, scheduler, ema=ema, keep_last=2)
    assert not (root / ".tmp-step_00000009").exists()
    assert latest_checkpoint(tmp_path) == root / "step_00000005"


def test_checkpoint_files_load_with_weights_only_and_are_name_keyed(tmp_path):
    model, optimizer, scheduler, ema = _toy_training_objects()
    _one_step(model, optimizer, scheduler, ema)
    ckpt = save_training_state(
        tmp_path, 1, model, optimizer, scheduler, ema=ema, data_state={"epoch": 0}, config={"lr": 1e-2},
        generators={"noise": torch.Generator().manual_seed(5)},
    )  # fmt: skip
    optim_state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert set(optim_state["state"]) == {"trained.weight", "trained.bias"}
    rng = torch.load(ckpt / "rng_rank0.pt", weights_only=True)
    assert set(rng) >= {"python", "numpy", "torch_cpu", "generators"} and "noise" in rng["generators"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["data_state"] == {"epoch": 0} and state["config"] == {"lr": 1e-2}
    assert state["versions"]["torch"] == torch.__version__
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(model.state_dict())  # full model, frozen part included
    with safe_open(ckpt / "ema.safetensors", "pt") as f:
        assert set(f.keys()) == {"trained.weight", "trained.bias"}
    with pytest.raises(TypeError, match="JSON"):
        save_training_state(tmp_path, 2, model, optimizer, scheduler, data_state={"x": object()})


def test_trainable_only_saves_trainable_parameters_and_checks_on_load(tmp_path):
    model, optimizer, scheduler, ema = _toy_training_objects()
    _one_step(model, optimizer, scheduler, ema)
    ckpt = save_training_state(tmp_path, 1, model, optimizer, scheduler, trainable_only=True)
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        assert set(f.keys()) == {"trained.weight", "trained.bias"}
    fresh, fresh_optimizer, fresh_scheduler, _ = _toy_training_objects(seed=0)  # same frozen weights
    with torch.no_grad():
        fresh.trained.weight.zero_()
    load_training_state(ckpt, fresh, fresh_optimizer, fresh_scheduler)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in fresh.state_dict().items())
    wider = nn.Sequential()
    wider.add_module("trained", nn.Linear(5, 2))
    with pytest.raises(CheckpointError, match="shape"):
        load_training_state(ckpt, wider)


def _corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.parametrize(
    "damage",
    [
        "model.safetensors",
        "ema.safetensors",
        "optimizer.pt",
        "rng_rank0.pt",
        "trainer_state.json",
        "missing model",
        "no dir",
    ],
)
def test_damaged_checkpoints_raise_checkpoint_error_naming_the_path(tmp_path, damage):
    model, optimizer, scheduler, ema = _toy_training_objects()
    _one_step(model, optimizer, scheduler, ema)
    ckpt = save_training_state(tmp_path, 1, model, optimizer, scheduler, ema=ema)
    expected = ckpt
    if damage == "missing model":
        (ckpt / "model.safetensors").unlink()
        expected = ckpt / "model.safetensors"
    elif damage == "no dir":
        expected = ckpt.with_name("step_00000099")
    else:
        _corrupt(ckpt / damage)
        expected = ckpt / damage
    fresh, fresh_optimizer, fresh_scheduler, fresh_ema = _toy_training_objects()
    with pytest.raises(CheckpointError) as info:
        load_training_state(
            expected if damage == "no dir" else ckpt, fresh, fresh_optimizer, fresh_scheduler, fresh_ema
        )
    assert str(expected) in str(info.value)


def test_loading_into_a_different_model_is_a_checkpoint_error(tmp_path):
    model, optimizer, scheduler, _ = _toy_training_objects()
    ckpt = save_training_state(tmp_path, 0, model, optimizer, scheduler)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_training_state(ckpt, nn.Sequential(nn.Linear(3, 3)))


def test_export_stores_tied_weights_once(tmp_path):
    embed = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = embed.weight  # tied, as in Qwen2.5-VL-3B
    state = {"embed.weight": embed.weight, "head.weight": head.weight, "scale": torch.ones(2)}
    out = export_safetensors(state, tmp_path / "release", config={"hidden": 3})
    assert json.loads((out / "config.json").read_text()) == {"hidden": 3}
    with safe_open(out / "model.safetensors", "pt") as f:
        assert set(f.keys()) == {"embed.weight", "scale"}
        assert json.loads(f.metadata()["aliases"]) == {"head.weight": "embed.weight"}


# -------------------------------------------------------------------------------------- exact resume


class NoisyToy(nn.Module):
    """Dropout (global torch RNG) plus noise from a torch.Generator, numpy and python random."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(5, 8)
        self.backbone.requires_grad_(False)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.backbone(x))


def _noisy_setup(seed: int):
    torch.manual_seed(seed)
    model = NoisyToy()
    optimizer = build_optimizer(model.named_parameters(), lr=3e-3, weight_decay=0.1)
    scheduler = warmup_cosine(optimizer, warmup_steps=3, total_steps=10)
    ema = EMA(model, decay=0.95)
    generator = torch.Generator().manual_seed(seed + 1)
    seed_everything(seed, rank=0)
    return model, optimizer, scheduler, ema, generator


def _noisy_steps(model, optimizer, scheduler, ema, generator, steps: range) -> list[float]:
    losses = []
    for _ in steps:
        x = torch.randn(6, 5, generator=generator)
        x = x + torch.from_numpy(np.random.standard_normal((6, 5)).astype(np.float32)) * 0.1
        target = x * random.uniform(0.5, 1.5)
        loss = F.mse_loss(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm(model.parameters(), 0.5)
        optimizer.step()
        scheduler.step()
        ema.update(model)
        losses.append(loss.item())
    return losses


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    straight = _noisy_setup(seed=0)
    losses_straight = _noisy_steps(*straight, steps=range(10))

    first = _noisy_setup(seed=0)
    losses_first = _noisy_steps(*first, steps=range(5))
    model, optimizer, scheduler, ema, generator = first
    ckpt = save_training_state(
        tmp_path,
        5,
        model,
        optimizer,
        scheduler,
        ema=ema,
        generators={"noise": generator},
        data_state={"step": 5},
    )
    # Fresh objects from a *different* seed: only what the checkpoint restores can make the runs agree.
    second = _noisy_setup(seed=123)
    state = load_training_state(
        ckpt, second[0], second[1], second[2], ema=second[3], generators={"noise": second[4]}
    )
    assert state["step"] == 5 and state["data_state"] == {"step": 5} and state["rng_restored"]
    losses_second = _noisy_steps(*second, steps=range(5, 10))

    assert losses_first + losses_second == losses_straight  # bitwise
    for (name, a), b in zip(straight[0].state_dict().items(), second[0].state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for name in straight[3].shadow:
        assert torch.equal(straight[3].shadow[name], second[3].shadow[name]), name
    assert straight[2].get_last_lr() == second[2].get_last_lr()


# ------------------------------------------------------------------------------- DDP / FSDP2 (torchrun)


def _import_toy() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dist_toy_train", TESTS / "dist_toy_train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy() -> ModuleType:
    return _import_toy()


@pytest.fixture(scope="module")
def single_process_run(toy, tmp_path_factory) -> tuple[dict, Path]:
    """The 1-process reference on the full global batch; its checkpoints seed the 1 -> 2 resume."""
    out = tmp_path_factory.mktemp("single")
    return toy.train("none", DistInfo(), out), out


GLOO_EXIT_ABORT = "terminate called without an active exception"


def _torchrun(strategy: str, out: Path, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(TESTS / "dist_toy_train.py"), "--strategy", strategy, "--out", str(out), *extra,
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0 and GLOO_EXIT_ABORT in proc.stderr:
        # Known upstream flake (torch 2.13, gloo; see `shutdown_distributed`): a rank can abort at exit while its
        # process group is torn down (seen once, FSDP, in a fresh clone's full suite in session 25; the test then
        # passed 3 of 3 times alone). One rerun from an empty folder; a real failure fails again.
        shutil.rmtree(out)
        out.mkdir()
        proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "result.json").read_text())


def _reload_probe(toy: ModuleType, ckpt: Path, with_optimizer: bool = True):
    """Load a checkpoint into a fresh single-process toy model; return (model, optimizer, scheduler, ema)."""
    model = toy.build_model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # nothing of the initialisation may survive the load
    optimizer = (
        build_optimizer(model.named_parameters(), lr=1e-2, weight_decay=0.1) if with_optimizer else None
    )
    scheduler = warmup_cosine(optimizer, warmup_steps=2, total_steps=toy.STEPS) if with_optimizer else None
    ema = EMA(model, decay=0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # saved with 2 ranks: RNG not restored, as documented
        load_training_state(ckpt, model, optimizer, scheduler, ema=ema)
    return model, optimizer, scheduler, ema


def _close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_and_checkpoints_cross_world_sizes(
    strategy, toy, single_process_run, tmp_path
):
    reference, reference_dir = single_process_run
    resume_from = reference_dir / "run" / "checkpoints" / "step_00000003"
    extra = ["--resume", str(resume_from)] + (["--bf16"] if strategy == "fsdp" else [])
    result = _torchrun(strategy, tmp_path, *extra)

    fresh = result["fresh"]
    assert result["world_size"] == 2
    assert result["damaged_load_raises_everywhere"]
    assert _close(fresh["losses"], reference["losses"]), (fresh["losses"], reference["losses"])
    assert _close(fresh["grad_norms"], reference["grad_norms"])
    assert _close(fresh["probe"], reference["probe"]) and _close(fresh["ema_probe"], reference["ema_probe"])
    assert fresh["probe_unchanged_by_swap"]
    assert fresh["all_params_sharded"] == (strategy == "fsdp")  # frozen layer and root params included
    # 1 process -> 2: resuming the single-process step-3 checkpoint continues the same trajectory.
    assert _close(result["resumed"]["losses"], reference["losses"][3:])

    # 2 processes -> 1: the 2-process checkpoints load into a plain model, optimizer and EMA.
    model, _, _, ema = _reload_probe(toy, tmp_path / "run" / "checkpoints" / "step_00000005")
    with torch.no_grad():
        assert _close(model(toy.probe_input()).tolist(), fresh["probe"], tol=1e-6)
        with ema.swapped_in(model):
            assert _close(model(toy.probe_input()).tolist(), fresh["ema_probe"], tol=1e-6)
        assert torch.equal(
            model.frozen.weight, toy.build_model().frozen.weight
        )  # frozen part saved, untouched
    exported = toy.build_model()  # the rank-0 export of gather_model_state_dict holds the same weights
    exported.load_state_dict(load_file(tmp_path / "export" / "model.safetensors"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in exported.state_dict().items())
    model, optimizer, scheduler, ema = _reload_probe(toy, tmp_path / "run" / "checkpoints" / "step_00000003")
    continued = []
    for step in range(3, toy.STEPS):
        x, y = toy.global_batch(step)
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        clip_grad_norm(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        continued.append(loss.item())
    assert _close(continued, fresh["losses"][3:])

    if strategy == "fsdp":  # bf16 compute with fp32 master weights and reductions: same curve, looser
        assert _close(result["bf16"]["losses"], reference["losses"], tol=2e-2)
        assert result["bf16"]["all_params_sharded"]


def test_a_run_saved_before_a_field_existed_resumes_while_the_field_keeps_its_default(tmp_path):
    config, dist = preset("tiny-test"), DistInfo()
    _check_run_config(tmp_path, config, dist)  # a new run records its configuration
    saved = json.loads((tmp_path / "config.json").read_text())
    for stage in saved["stages"]:
        del stage["colourless_pair_renders"]  # as written before the field was added
    (tmp_path / "config.json").write_text(json.dumps(saved))
    _check_run_config(tmp_path, config, dist)
    changed = apply_overrides(config, ["stages.instruct.colourless_pair_renders=3"])
    with pytest.raises(ConfigError, match="different configuration"):
        _check_run_config(tmp_path, changed, dist)
    # Sessions 30-31 saved the colourless-pair renders as a data field read by every instruct stage: it loads as
    # that stage field, with the same meaning.
    saved["data"]["instruct_colourless_pair_renders"] = 3
    (tmp_path / "config.json").write_text(json.dumps(saved))
    _check_run_config(tmp_path, changed, dist)
    with pytest.raises(ConfigError, match="different configuration"):
        _check_run_config(tmp_path, config, dist)
    del saved["data"]["instruct_colourless_pair_renders"]
    saved["data"]["renders_of_a_field_since_removed"] = 1
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="different configuration"):
        _check_run_config(tmp_path, config, dist)
