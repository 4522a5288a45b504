"""The staged training engine: stage semantics, resume after SIGKILL, distributed equivalence, bad input.

The subprocess tests launch the real CLI (`python -m blip3o.cli.train`), as a user would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from blip3o.models.blip3o import Blip3o, tiny_config
from blip3o.models.clip import grid_to_tokens
from blip3o.train.config import ConfigError
from blip3o.train.optim import build_optimizer
from blip3o.train.overrides import apply_overrides
from blip3o.train.presets import overrides_from_preset, preset
from blip3o.train.stages import (
    StageModule,
    condition_noise_draws,
    fit_feature_statistics,
    parameters_of,
    set_trainable,
)
from blip3o.world.language import annotate
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene
from conftest import object_label_model_config

# PYTHONFAULTHANDLER: a worker that dies on a signal (CI once saw rank 1 of the FSDP2 run end in SIGSEGV) prints
# its Python stack to the captured stderr, so a failure names where it happened.
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONFAULTHANDLER": "1",
}


@pytest.fixture(scope="module")
def tiny_model() -> Blip3o:
    return Blip3o.from_config(tiny_config(tokenizer_corpus_scenes=200), seed=0)


def _world_batch(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    return {
        "images": [render(s) for s in scenes],
        "captions": [annotate(s, rng).short_caption for s in scenes],
        "seeds": list(range(n)),
    }


def _train(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "blip3o.cli.train", "--no-progress", *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600, **kw)


def _log(run: Path, stage: str = "generation") -> list[dict]:
    return [json.loads(line) for line in (run / stage / "log.jsonl").read_text().splitlines()]


def _losses(run: Path, stage: str = "generation") -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _log(run, stage)]


def _stderr_tail(result: subprocess.CompletedProcess) -> str:
    """The end of a failed run's stderr, led by a crashed worker's fault-handler stack (which torchrun's own
    report would push out of the tail)."""
    crash = result.stderr.find("Fatal Python error")
    stack = result.stderr[crash : crash + 4000] + "\n...\n" if crash >= 0 else ""
    return stack + result.stderr[-3000:]


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`args` (a script, or -m and a module, and its arguments) on 2 processes, as a user would launch it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def _copy_stages(source: Path, run: Path, stages: tuple[str, ...]) -> None:
    """Fill `run`'s first stages (and its data) from `source`, so `blip3o train` resumes at the next stage."""
    for stage in ("data", *stages):
        shutil.copytree(source / stage, run / stage)


# ---------------------------------------------------------------------------------------------- config


def test_presets_overrides_and_errors() -> None:
    cfg = apply_overrides(
        preset("tiny-test"), ["stages.generation.steps=7", "precision=bf16", "stages.*.log_every=3"]
    )
    assert cfg.stage("generation").steps == 7 and cfg.precision == "bf16"
    assert {s.log_every for s in cfg.stages} == {3}
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("no-such-preset")
    with pytest.raises(ConfigError, match="unknown key"):
        apply_overrides(cfg, ["stages.generation.stepz=3"])
    with pytest.raises(ConfigError, match="cannot parse"):
        apply_overrides(cfg, ["stages.generation.steps=many"])
    with pytest.raises(ConfigError, match="hidden_size"):  # condition width no longer matches the DiT
        apply_overrides(cfg, ["model.backbone.hidden_size=64", "model.backbone.mrope_section=2,3,3"])
    with pytest.raises(ConfigError, match="n_queries"):
        apply_overrides(cfg, ["model.backbone.n_queries=0"])
    # Fewer steps than the preset's warmup: refused with the fix named, in whichever order the two are given.
    shapes = preset("shapes")
    with pytest.raises(ConfigError, match=r"override stages\.clip\.warmup_steps too"):
        apply_overrides(shapes, ["stages.clip.steps=10"])
    for order in (
        ["stages.clip.steps=10", "stages.clip.warmup_steps=0"],
        ["stages.clip.warmup_steps=0", "stages.clip.steps=10"],
    ):
        short = apply_overrides(shapes, order).stage("clip")
        assert (short.steps, short.warmup_steps) == (10, 0)
    # Fields only valid together are applied together: the object-target model is the shapes one plus overrides,
    # and one of them alone is refused.
    together = [
        "model.clip.patch_label_weight=1",
        "model.clip.patch_label_groups=6,9",
        "model.clip.patch_label_values=4",
        "model.clip.patch_label_kind=object",
        "model.clip.patch_label_balanced=true",
        "model.clip.target_basis=labels",
        "model.clip.target_components=19",
        "model.dit.in_channels=19",
        "model.dit.condition_slots=9",
        "model.dit.dim=256",
        "model.dit.n_heads=8",
        "model.dit.n_kv_heads=8",
    ]
    built = apply_overrides(shapes, together).model
    assert built.clip == preset("shapes-object").model.clip and built.dit == preset("shapes-object").model.dit
    with pytest.raises(ConfigError, match="target_components"):
        apply_overrides(shapes, ["model.clip.target_components=19"])
    with pytest.raises(ConfigError, match="also has fields set"):
        apply_overrides(shapes, ["model.clip.target_components=19", "model.clip=x"])
    with pytest.raises(ConfigError, match="also set as a value"):
        apply_overrides(shapes, ["model.clip=x", "model.clip.target_components=19"])
    # The released recipe resolves to the released DiT.
    big = preset("blip3o-8b")
    assert (big.model.dit.dim, big.model.dit.n_layers, big.model.dit.latent_embedding_size) == (
        1792,
        24,
        3584,
    )
    assert big.model.target_shape == (1792, 8, 8)
    # The resolved config round-trips through JSON (it is saved with every run and checkpoint).
    assert type(cfg).from_dict(json.loads(cfg.to_json())) == cfg


def test_overrides_from_preset_give_back_the_run_config() -> None:
    assert overrides_from_preset(preset("shapes-object")) == []
    given = [
        "data.seed=5",
        "eval.geneval_seeds=0,1",
        "precision=bf16",
        "model.backbone.query_init_std=0.5",  # None in the preset
        "stages.generation.steps=7",
        "stages.generation.warmup_steps=0",
        "stages.instruct.slot_relation_weight=0.3",
    ]
    config = apply_overrides(preset("shapes-object"), given)
    found = overrides_from_preset(config)
    assert sorted(found) == sorted(given)
    assert apply_overrides(preset("shapes-object"), found) == config
    # An empty tuple is written as an empty value, which the parser reads back as empty (GenEval off).
    no_seeds = apply_overrides(preset("shapes-quick"), ["eval.geneval_seeds="])
    assert no_seeds.eval.geneval_seeds == () and overrides_from_preset(no_seeds) == ["eval.geneval_seeds="]
    # What overrides cannot say is reported as such, not as a wrong command: other stages.
    assert overrides_from_preset(dataclasses.replace(config, stages=config.stages[:2])) is None


# ---------------------------------------------------------------------------------------------- stage 2


def test_stage2_step_leaves_backbone_bitwise_unchanged(tiny_model: Blip3o) -> None:
    model = tiny_model
    batch = _world_batch(4)
    fit_feature_statistics(model, batch["images"])
    set_trainable(model, "generation")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    questions = ["what color is the star?", "how many shapes are there?", "is there a red circle?"]
    model.eval()
    answers_before = model.understand(batch["images"][:3], questions, max_new_tokens=6)
    model.train()
    optimizer = build_optimizer(parameters_of(model), lr=1e-2, weight_decay=0.0)
    # Several steps: the DiT starts as the zero map (DiT-style init), so the first gradients reach only its
    # output layer, the next ones its modulation, and only then the condition and the queries.
    for _ in range(4):
        optimizer.zero_grad()
        loss, _ = StageModule(model, "generation")(batch)
        loss.backward()
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    backbone_vlm = {n for n in before if n.startswith("backbone.vlm.")}
    assert backbone_vlm and not changed & backbone_vlm, "a stage-2 step changed the frozen backbone"
    assert "backbone.latent_queries" in changed
    assert any(n.startswith("dit.") for n in changed)
    assert not any(n.startswith(("clip.", "decoder.")) for n in changed)
    # Understanding exactly as it was: the same greedy answers (token for token) after stage-2 steps.
    model.eval()
    assert model.understand(batch["images"][:3], questions, max_new_tokens=6) == answers_before


def test_stage2_overfits_a_fixed_batch(tiny_model: Blip3o) -> None:
    """Same images, captions and diffusion draws every step: the loss must fall at least 10x."""
    torch.manual_seed(0)
    model = Blip3o.from_config(tiny_config(tokenizer_corpus_scenes=200), seed=1)
    batch = _world_batch(4, seed=1)
    fit_feature_statistics(model, batch["images"])
    set_trainable(model, "generation")
    module = StageModule(model, "generation")
    optimizer = build_optimizer(parameters_of(model), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss, _ = module(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"stage-2 overfit: loss {losses[0]:.4f} -> {losses[-1]:.4f} ({losses[0] / losses[-1]:.1f}x)")
    assert losses[-1] < losses[0] / 10


# ---------------------------------------------------------------------------------------------- resume


def test_resume_after_sigkill_continues_with_identical_losses(tmp_path: Path) -> None:
    args = ["--preset", "tiny-gen", "stages.generation.steps=6", "stages.generation.ckpt_every=2"]
    reference = _train([*args, "--out", str(tmp_path / "straight")], tmp_path)
    assert reference.returncode == 0, _stderr_tail(reference)

    killed_run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "blip3o.cli.train", "--no-progress", *args, "--out", str(killed_run)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = killed_run / "generation" / "checkpoints" / "step_00000004"
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert target.exists(), "the run never wrote its step-4 checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_run / "generation" / "model" / "config.json").exists(), (
        "killed too late to test resume"
    )

    resumed = _train([*args, "--out", str(killed_run)], tmp_path)
    assert resumed.returncode == 0, _stderr_tail(resumed)
    assert "resumed from" in resumed.stderr
    straight, continued = _losses(tmp_path / "straight"), _losses(killed_run)
    assert [s for s, _ in continued] == [1, 2, 3, 4, 5, 6]
    assert continued == straight  # bitwise: same floats


# ------------------------------------------------------------------------------------------ distributed


@pytest.mark.parametrize(
    ("strategy", "slots"), [("ddp", False), ("fsdp", False), ("ddp", True), ("fsdp", True)]
)
def test_two_process_run_matches_one_process(tmp_path: Path, strategy: str, slots: bool) -> None:
    """slots: with the DiT's condition resampler and the slot-label head (scaffolding outside the DiT's forward,
    in FSDP2's root unit), as the `shapes-object` recipe trains them."""
    args = ["--preset", "tiny-gen", "stages.generation.steps=5", "stages.generation.ckpt_every=5"]
    if slots:
        args += ["model.dit.condition_slots=4", "stages.generation.slot_label_weight=1.0"]
    single = _train([*args, "--out", str(tmp_path / "single")], tmp_path)
    assert single.returncode == 0, _stderr_tail(single)
    train = ["-m", "blip3o.cli.train", "--no-progress", *args]
    multi = _torchrun([*train, "--out", str(tmp_path / strategy), f"distributed={strategy}"], tmp_path)
    assert multi.returncode == 0, _stderr_tail(multi)
    one, two = dict(_losses(tmp_path / "single")), dict(_losses(tmp_path / strategy))
    print(f"{strategy}: step-5 loss 1 process {one[5]:.8f}, 2 processes {two[5]:.8f}")
    assert abs(one[5] - two[5]) < 1e-5
    # The 2-process run's checkpoint and exported model load into one process and agree with each other.
    from blip3o.train.checkpoint import latest_checkpoint, load_training_state

    exported = Blip3o.from_pretrained(tmp_path / strategy / "generation" / "model")
    ckpt = latest_checkpoint(tmp_path / strategy / "generation")
    fresh = Blip3o.from_pretrained(tmp_path / strategy / "generation" / "model")
    with torch.no_grad():
        for p in fresh.dit.parameters():
            p.zero_()
    set_trainable(fresh, "generation")
    module = StageModule(fresh, "generation", slot_label_weight=1.0 if slots else 0.0)
    load_training_state(ckpt, module)  # checkpoints name the stage module's params (the slot head's too)
    for (name, a), b in zip(exported.dit.state_dict().items(), fresh.dit.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# The miniature with CLIP's object label head and the DiT's condition slots, its instruct stage with the losses of
# the `shapes-object` recipe's last instruct stage (slot label, relation and binding, and the count loss, which
# calls the DiT a second time in the stage's forward), as overrides of `tiny-test`.
OBJECT_INSTRUCT = [
    "--preset", "tiny-test", "deterministic=true", "model.clip.patch_label_weight=1.0",
    "model.clip.patch_label_groups=6,9", "model.clip.patch_label_values=4", "model.clip.patch_label_kind=object",
    "model.clip.target_basis=labels", "model.clip.target_components=19", "model.dit.in_channels=19",
    "model.dit.condition_slots=4", "stages.instruct.steps=3", "stages.instruct.slot_label_weight=1.0",
    "stages.instruct.slot_relation_weight=0.3", "stages.instruct.slot_binding_weight=0.3",
    "stages.instruct.count_weight=1.0",
]  # fmt: skip


def test_two_process_instruct_with_the_slot_and_count_losses_matches_one_process_accumulating(
    tmp_path: Path,
) -> None:
    """The masked losses (count, binding) average over each micro-batch's kept rows, so 2 ranks of 2 rows are
    one process accumulating 2 micro-batches of 2, not one batch of 4. Earlier stages are the single run's
    (copied), so only the instruct stage is compared, to float rounding. The distributed runs start at the
    instruct stage, the single one after 5 stages of draws: the slot head must start from the stage's seed, not
    the process's random state (it did, before session 37)."""
    single = tmp_path / "single"
    result = _train([*OBJECT_INSTRUCT, "stages.instruct.grad_accum=2", "--out", str(single)], tmp_path)
    assert result.returncode == 0, _stderr_tail(result)
    one = _log(single, "instruct")
    # Each loss is on: the slot losses are what the total holds beyond the flow and count terms (count weight 1).
    assert all(r["count_error"] > 0 and r["loss"] - r["gen_loss"] - r["count_error"] > 0.1 for r in one), one
    assert all("slot_binding_acc" in r and "slot_relation_acc" in r for r in one), one
    for strategy in ("ddp", "fsdp"):
        run = tmp_path / strategy
        _copy_stages(single, run, ("clip", "decoder", "vision", "understanding", "generation"))
        train = ["-m", "blip3o.cli.train", "--no-progress", *OBJECT_INSTRUCT]
        multi = _torchrun([*train, "--out", str(run), f"distributed={strategy}"], tmp_path)
        assert multi.returncode == 0, _stderr_tail(multi)
        two = _log(run, "instruct")
        assert [r["step"] for r in two] == [1, 2, 3]
        for a, b in zip(one, two, strict=True):
            for key in ("loss", "gen_loss", "count_error", "slot_binding_acc", "slot_shape_acc", "grad_norm"):
                assert abs(a[key] - b[key]) < 1e-4 * max(1.0, abs(a[key])), (strategy, a["step"], key, a, b)


def test_fsdp_trains_every_stage_kind_and_the_clip_stage_as_one_process_accumulating(tmp_path: Path) -> None:
    """CLIP's logit scale is a trainable 0-dim parameter, which FSDP2 cannot shard: it stays whole on each rank and
    its gradient is averaged by hand (parallelize). Its contrastive loss sees each micro-batch's own negatives, so
    2 ranks are one process accumulating 2 micro-batches."""
    args = ["--preset", "tiny-test", "deterministic=true", "stages.*.grad_accum=2"]
    single = _train([*args, "--out", str(tmp_path / "single")], tmp_path)
    assert single.returncode == 0, _stderr_tail(single)
    train = [
        "-m",
        "blip3o.cli.train",
        "--no-progress",
        *args[:3],
    ]  # no accumulation: 2 ranks of 1 micro-batch
    multi = _torchrun([*train, "--out", str(tmp_path / "fsdp"), "distributed=fsdp"], tmp_path)
    assert multi.returncode == 0, _stderr_tail(multi)
    assert (tmp_path / "fsdp" / "instruct" / "model").is_dir()  # every stage kind ran sharded
    one, two = _losses(tmp_path / "single", "clip"), _losses(tmp_path / "fsdp", "clip")
    assert [s for s, _ in two] == [1, 2, 3]
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(one, two, strict=True)), (one, two)
    from safetensors.torch import load_file

    one_scale, two_scale = (
        load_file(tmp_path / run / "clip" / "model" / "clip" / "clip" / "model.safetensors")["logit_scale"]
        for run in ("single", "fsdp")
    )
    start = next(
        p for n, p in Blip3o.from_config(preset("tiny-test").model).named_parameters() if "logit_scale" in n
    )
    assert one_scale.shape == start.shape == () and not torch.equal(two_scale, start.detach())  # it trained
    torch.testing.assert_close(one_scale, two_scale, rtol=1e-5, atol=1e-6)  # the same way


def test_two_process_refine_stage_matches_one_process_accumulating(tmp_path: Path) -> None:
    """A decoder stage drawing the trained DiT's renditions inside its forward (the recipe's `refine`) trains the
    same on 2 ranks, DDP or FSDP2, as on one process accumulating 2 micro-batches (tests/dist_refine_train.py)."""
    script = str(Path(__file__).parent / "dist_refine_train.py")
    single = subprocess.run(
        [sys.executable, script, str(tmp_path / "single"), "none", "2"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert single.returncode == 0, _stderr_tail(single)
    one = _losses(tmp_path / "single", "refine")
    assert [s for s, _ in one] == [1, 2, 3]
    for strategy in ("ddp", "fsdp"):
        run = tmp_path / strategy
        _copy_stages(
            tmp_path / "single", run, ("clip", "decoder", "vision", "understanding", "generation", "instruct")
        )
        multi = _torchrun([script, str(run), strategy, "1"], tmp_path)
        assert multi.returncode == 0, _stderr_tail(multi)
        two = _losses(run, "refine")
        assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(one, two, strict=True)), (strategy, one, two)


# ------------------------------------------------------------------------------------------ bad input


def test_corrupt_shard_is_skipped_and_training_continues(tmp_path: Path) -> None:
    from blip3o.data.shards import write_shards

    shards = tmp_path / "shards"
    write_shards(shards, n=24, seed=3, samples_per_shard=8, progress=False)
    victim = sorted(shards.glob("*.tar"))[1]
    victim.write_bytes(victim.read_bytes()[:5000])  # truncated
    result = _train(
        [
            "--preset",
            "tiny-gen",
            "--out",
            str(tmp_path / "run"),
            f"data.shards={shards}",
            "stages.generation.steps=2",
        ],
        tmp_path,
    )
    assert result.returncode == 0, _stderr_tail(result)
    assert "skipped 1 corrupt shard" in result.stderr
    assert [s for s, _ in _losses(tmp_path / "run")] == [1, 2]


def test_cli_errors_are_clear(tmp_path: Path) -> None:
    from blip3o.cli.train import main

    assert main(["--preset", "nope", "--out", str(tmp_path / "a")]) == 2
    assert main(["--preset", "tiny-gen", "--out", str(tmp_path / "b"), "data.shards=/does/not/exist"]) == 2
    assert main(["--preset", "tiny-gen", "--out", str(tmp_path / "c"), "stages.generation.batch_size=3",
                 "stages.generation.grad_accum=2"]) == 2  # fmt: skip


def test_a_finished_stage_of_another_model_is_refused(tmp_path: Path) -> None:
    """A stage folder copied in from a run of another model would be resumed from silently (every later stage
    would train that model): the run stops before training, naming the differing field."""
    from blip3o.train.loop import check_stage_model, run

    config = preset("tiny-gen")
    first = config.stages[0].name
    Blip3o.from_config(config.model, config.seed).save_pretrained(tmp_path / "same" / first / "model")
    check_stage_model(tmp_path / "same" / first / "model", config.model)  # its own model passes
    deeper = replace(
        config.model, backbone=replace(config.model.backbone, num_layers=config.model.backbone.num_layers + 1)
    )
    Blip3o.from_config(deeper, config.seed).save_pretrained(tmp_path / "other" / first / "model")
    with pytest.raises(ConfigError, match=r"backbone\.num_layers.*remove the stage folder"):
        run(config, tmp_path / "other", progress=False)
    assert (
        not (tmp_path / "other" / first / "checkpoints").exists()
        and not (tmp_path / "other" / "final").exists()
    )


# ------------------------------------------------------------------------------- more stage semantics


def test_joint_stage_trains_backbone_and_dit(tiny_model: Blip3o) -> None:
    batch = _world_batch(2)
    batch["prompts"], batch["answers"] = ["what shape is it?"] * 2, ["circle", "star"]
    fit_feature_statistics(tiny_model, batch["images"])
    trainable = set_trainable(tiny_model, "joint")
    assert any(n.startswith("backbone.vlm.") for n in trainable) and any(
        n.startswith("dit.") for n in trainable
    )
    loss, parts = StageModule(tiny_model, "joint", understanding_weight=0.5)(batch)
    loss.backward()
    assert torch.isclose(loss, parts["gen_loss"] + 0.5 * parts["und_loss"])
    lm_grad = tiny_model.backbone.vlm.model.language_model.layers[0].mlp.down_proj.weight.grad
    assert lm_grad is not None and lm_grad.abs().sum() > 0
    tiny_model.zero_grad(set_to_none=True)


def test_principal_component_target_trains_and_generates(tmp_path: Path) -> None:
    base = tiny_config(tokenizer_corpus_scenes=100)
    with pytest.raises(ValueError, match=r"dit\.in_channels=8"):  # the DiT must generate the kept components
        replace(base, clip=replace(base.clip, target_components=8))
    config = replace(base, clip=replace(base.clip, target_components=8), dit=replace(base.dit, in_channels=8))
    model = Blip3o.from_config(config, seed=0)
    batch = _world_batch(4)
    fit_feature_statistics(model, batch["images"])
    assert model.config.target_shape == (8, 8, 8)
    x0 = model.encode_target(batch["images"])  # (4, 8, 8, 8)
    assert x0.shape == (4, 8, 8, 8)
    # Decoding maps the components back to the 128-channel features the pixel decoder reads.
    features = model.clip.target_to_features(grid_to_tokens(x0))  # (4, 64, 128)
    assert features.shape == (4, 64, 128)
    # The decoder trains on exactly that: real tokens cut to the components, not the full tokens.
    assert torch.allclose(model.decoder_features(batch["images"]), features, atol=1e-5)
    full = model.encode_image(batch["images"])  # (4, 64, 128)
    assert (full - features).abs().max() > 0.1
    assert torch.allclose(
        model.clip.target_to_features(model.clip.features_to_target(features)), features, atol=1e-4
    )
    set_trainable(model, "generation")
    loss, _ = StageModule(model, "generation")(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.generate(["a red circle"], steps=2)[0].size == (64, 64)
    # The basis is a data statistic: float16 weight storage keeps it (and so the target) exact.
    model.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    loaded = Blip3o.from_pretrained(tmp_path / "fp16")
    assert torch.equal(loaded.clip.component_basis, model.clip.component_basis)
    assert torch.equal(loaded.clip.component_std, model.clip.component_std)


def test_condition_word_tokens_train_generate_and_reload(tmp_path: Path) -> None:
    base = tiny_config(tokenizer_corpus_scenes=100)
    config = replace(base, backbone=replace(base.backbone, condition_word_tokens=6),
                     dit=replace(base.dit, condition_slots=3))  # fmt: skip
    model = Blip3o.from_config(config, seed=0)
    batch = _world_batch(2)
    fit_feature_statistics(model, batch["images"])
    assert model.condition(batch["captions"]).shape == (
        2,
        6 + config.backbone.n_queries,
        config.backbone.hidden_size,
    )
    set_trainable(model, "generation")
    loss, _ = StageModule(model, "generation")(batch)
    loss.backward()
    assert torch.isfinite(loss)
    # The words are the frozen embedding table's rows: generation training leaves the table alone.
    assert model.backbone.vlm.model.language_model.embed_tokens.weight.grad is None
    model.zero_grad(set_to_none=True)
    images = model.generate(["a red circle left of a star"], steps=2, seed=3)
    model.save_pretrained(tmp_path / "m")
    loaded = Blip3o.from_pretrained(tmp_path / "m")
    assert loaded.config.backbone.condition_word_tokens == 6
    again = loaded.generate(["a red circle left of a star"], steps=2, seed=3)
    assert np.array_equal(np.asarray(images[0]), np.asarray(again[0]))


def test_decoder_conditioning_augmentation_is_seeded_noise_in_target_units() -> None:
    base = tiny_config(tokenizer_corpus_scenes=100)
    config = replace(base, clip=replace(base.clip, target_components=8), dit=replace(base.dit, in_channels=8))
    model = Blip3o.from_config(config, seed=0)
    batch = _world_batch(3)
    fit_feature_statistics(model, batch["images"])
    # The draws: a sample's noise depends on its own seed only, its std on [0, max_std].
    noise = condition_noise_draws((3, 64, 128), [5, 6, 7], 0.5)  # (3, 64, 128)
    assert torch.equal(condition_noise_draws((1, 64, 128), [6], 0.5)[0], noise[1])
    stds = noise.flatten(1).std(dim=1)  # (3,)
    assert stds.max() < 0.5 * 1.05 and stds.min() > 0 and len(set(stds.tolist())) == 3
    assert not condition_noise_draws((2, 4, 8), [5, 6], 0.0).any()
    # The decoder's condition: the real target plus the noise, mapped back to features.
    target_noise = condition_noise_draws((3, 64, 8), batch["seeds"], 0.5)  # (3, 64, 8)
    target = model.clip.features_to_target(model.encode_image(batch["images"]))  # (3, 64, 8)
    expected = model.clip.target_to_features(target + target_noise)  # (3, 64, 128)
    assert torch.allclose(model.decoder_features(batch["images"], target_noise), expected, atol=1e-5)
    # The decoder stage draws it when condition_noise > 0: same batch, same loss; a different loss than without.
    set_trainable(model, "decoder")
    plain = StageModule(model, "decoder")(batch)[0]
    model.decoder.config = replace(model.decoder.config, condition_noise=0.5)
    noisy = StageModule(model, "decoder")(batch)[0]
    assert torch.equal(noisy, StageModule(model, "decoder")(batch)[0])
    assert not torch.isclose(noisy, plain)
    with pytest.raises(ValueError, match="condition_noise"):
        replace(model.decoder.config, condition_noise=-0.1)


def test_vae_target_variant_trains_and_generates() -> None:
    from blip3o.models.blip3o import tiny_vae_config
    from blip3o.train.stages import fit_vae_scaling

    model = Blip3o.from_config(tiny_vae_config(tokenizer_corpus_scenes=100), seed=0)
    batch = _world_batch(2)
    fit_vae_scaling(model, batch["images"])
    set_trainable(model, "generation")
    assert model.encode_target(batch["images"]).shape == (2, 4, 16, 16)  # 256 latent tokens
    loss, _ = StageModule(model, "generation")(batch)
    loss.backward()
    assert torch.isfinite(loss)
    images = model.generate(["a red circle"], steps=2)
    assert images[0].size == (64, 64)


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    from blip3o.train.loop import run

    base = apply_overrides(preset("tiny-gen"), ["stages.generation.steps=2", "deterministic=false"])
    accumulated = apply_overrides(base, ["stages.generation.grad_accum=2"])
    run(base, tmp_path / "one", progress=False)
    run(accumulated, tmp_path / "two", progress=False)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2]
    for (_, a), (_, b) in zip(one, two, strict=True):
        assert abs(a - b) < 1e-5


def test_top_config_that_disagrees_with_a_component_config_is_a_clear_error(
    tmp_path: Path, tiny_model: Blip3o
) -> None:
    from blip3o.models.blip3o import ModelLoadError

    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["decoder"]["sample_steps"] += 5
    config["dit"]["n_layers"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"decoder\.sample_steps") as caught:
        Blip3o.from_pretrained(folder)
    assert "dit.n_layers" in str(caught.value)  # every disagreement is named, not just the first
    # Agreeing again (both sides edited) loads, and the edit takes effect.
    decoder_config = json.loads((folder / "decoder" / "config.json").read_text())
    decoder_config["sample_steps"] = config["decoder"]["sample_steps"]
    (folder / "decoder" / "config.json").write_text(json.dumps(decoder_config))
    config["dit"] = json.loads((folder / "dit" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))
    loaded = Blip3o.from_pretrained(folder)
    assert loaded.decoder.config.sample_steps == tiny_model.decoder.config.sample_steps + 5


def test_query_count_mismatch_and_corrupt_checkpoint_are_clear_errors(
    tmp_path: Path, tiny_model: Blip3o
) -> None:
    from blip3o.cli.train import main
    from blip3o.models.blip3o import ModelLoadError

    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["backbone"]["n_queries"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="query count mismatch"):
        Blip3o.from_pretrained(folder)
    # A run whose latest checkpoint is corrupt stops with a one-line error instead of a traceback.
    run_dir = tmp_path / "run"
    args = ["--preset", "tiny-gen", "--out", str(run_dir), "--no-progress", "stages.generation.steps=2"]
    assert main([*args, "stages.generation.ckpt_every=1"]) == 0
    (run_dir / "generation" / "model" / "config.json").unlink()  # pretend the stage did not finish
    ckpt = sorted((run_dir / "generation" / "checkpoints").iterdir())[-1]
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    assert main([*args, "stages.generation.ckpt_every=1"]) == 2


def test_mse_objective_trains_and_samples_deterministically() -> None:
    """The paper's CLIP + MSE baseline behind the config switch: one step, and sampling ignores the seed."""
    model = Blip3o.from_config(tiny_config(objective="mse", tokenizer_corpus_scenes=100), seed=0)
    batch = _world_batch(2)
    fit_feature_statistics(model, batch["images"])
    set_trainable(model, "generation")
    loss, _ = StageModule(model, "generation")(batch)
    loss.backward()
    grads = [p.grad for p in model.dit.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and sum(g.abs().sum() for g in grads) > 0
    a = model.generate_target(["a red circle"], generator=torch.Generator().manual_seed(1))
    b = model.generate_target(["a red circle"], generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)  # regression: one deterministic prediction per prompt


def test_make_batch_qa_share_and_hard_negatives() -> None:
    from blip3o.train.data import LONG_CAPTION_PROMPT, SHORT_CAPTION_PROMPT, DataError, Example, make_batch

    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(8)]
    anns = [annotate(s, rng) for s in scenes]
    examples = [
        Example(render(s), a.short_caption, a.long_caption, [(q.question, q.answer) for q in a.qa], s)
        for s, a in zip(scenes, anns, strict=True)
    ]
    rows, positions = list(range(8)) * 25, list(range(200))
    captioning = (SHORT_CAPTION_PROMPT, LONG_CAPTION_PROMPT)
    only_qa = make_batch("understanding", examples, rows, positions, seed=0, short_prob=0.3, qa_share=1.0)
    assert not any(p in captioning for p in only_qa["prompts"])
    no_qa = make_batch("understanding", examples, rows, positions, seed=0, short_prob=0.3, qa_share=0.0)
    assert all(p in captioning for p in no_qa["prompts"])
    single = make_batch("understanding", examples, rows, positions, seed=0, short_prob=0.3, qa_share=0.8)
    assert single == make_batch(
        "understanding", examples, rows, positions, seed=0, short_prob=0.3, qa_share=0.8, qa_turns=1
    )
    talks = make_batch(
        "understanding", examples, rows, positions, seed=0, short_prob=0.3, qa_share=0.8, qa_turns=3
    )
    conversations = [
        (p, a, r)
        for p, a, r in zip(talks["prompts"], talks["answers"], rows, strict=True)
        if isinstance(p, list)
    ]
    assert 0.7 < len(conversations) / len(rows) < 0.9  # the same question/caption split as one-turn batches
    for questions, answers, row in conversations:
        assert len(questions) == len(answers) == min(3, len(examples[row].qa)) == len(set(questions))
        assert all(pair in examples[row].qa for pair in zip(questions, answers, strict=True))
    in_stored_order = [q == [q for q, _ in examples[r].qa][: len(q)] for q, _, r in conversations]
    assert not all(in_stored_order)  # drawn in a random order, so no question is always the first one
    assert not any(isinstance(p, list) for p in single["prompts"])
    located = make_batch(
        "understanding",
        examples,
        rows,
        positions,
        seed=0,
        short_prob=0.3,
        qa_share=1.0,
        location_questions=True,
    )
    where = [
        (p, a) for p, a in zip(located["prompts"], located["answers"], strict=True) if p.startswith("where")
    ]
    assert where and all(len(a.split()) == 2 for _, a in where)
    no_scenes = [dataclasses.replace(e, scene=None) for e in examples]
    with pytest.raises(DataError, match="scene"):
        make_batch(
            "understanding", no_scenes, rows, positions, seed=0, short_prob=0.3, location_questions=True
        )
    axis_rows = [i for i, e in enumerate(examples) if any(" of the " in q or "above" in q for q, _ in e.qa)]
    twins = make_batch("understanding", examples, axis_rows * 8, list(range(8 * len(axis_rows))), seed=0,
                       short_prob=0.3, qa_share=1.0, axis_questions=True)  # fmt: skip
    asked = [(p, a) for p, a in zip(twins["prompts"], twins["answers"], strict=True) if " or " in p]
    assert asked and {a for _, a in asked} <= {"left", "right", "above", "below", "level"}
    with pytest.raises(DataError, match="axis_questions needs the scene"):
        make_batch("understanding", no_scenes, rows, positions, seed=0, short_prob=0.3, axis_questions=True)
    with pytest.raises(ConfigError, match="axis_questions"):
        apply_overrides(preset("tiny-test"), ["stages.generation.axis_questions=true"])
    plain = make_batch("clip", examples, rows, positions, seed=0, short_prob=0.3)
    hard = make_batch("clip", examples, rows, positions, seed=0, short_prob=0.3, hard_negatives=True)
    assert "negative_captions" not in plain
    assert hard["captions"] == plain["captions"]  # switching negatives on changes no other draw
    assert all(n != c for n, c in zip(hard["negative_captions"], hard["captions"], strict=True))
    with pytest.raises(ConfigError, match="hard_negatives"):
        apply_overrides(preset("tiny-test"), ["stages.generation.hard_negatives=true"])
    with pytest.raises(ConfigError, match="qa_share"):
        apply_overrides(preset("tiny-test"), ["stages.understanding.qa_share=1.5"])
    with pytest.raises(ConfigError, match="understanding_average"):
        apply_overrides(preset("tiny-test"), ["stages.understanding.understanding_average=batch"])
    with pytest.raises(ConfigError, match="qa_turns"):
        apply_overrides(preset("tiny-test"), ["stages.generation.qa_turns=4"])
    with pytest.raises(ConfigError, match="qa_turns"):
        apply_overrides(preset("tiny-test"), ["stages.understanding.qa_turns=0"])
    with pytest.raises(ConfigError, match="location_questions"):
        apply_overrides(preset("tiny-test"), ["stages.generation.location_questions=true"])
    sample = apply_overrides(preset("tiny-test"), ["stages.understanding.understanding_average=sample"])
    assert sample.stage("understanding").understanding_average == "sample"


def test_run_evaluates_its_final_model_once(tmp_path: Path) -> None:
    from blip3o.data.shards import write_shards

    shards = tmp_path / "shards"
    write_shards(shards, n=16, seed=3, samples_per_shard=8, progress=False)
    args = [
        "--preset", "tiny-gen", "--out", str(tmp_path / "run"), f"data.shards={shards}",
        "stages.generation.steps=1", "eval.geneval_seeds=0,1", "eval.geneval_max_prompts=6",
        "eval.geneval_images_per_prompt=1", "eval.vqa_questions=5",
    ]  # fmt: skip
    result = _train(args, tmp_path)
    assert result.returncode == 0, _stderr_tail(result)
    summary_path = tmp_path / "run" / "eval" / "summary.json"
    summary = json.loads(summary_path.read_text())
    assert set(summary["geneval"]["categories"]) == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"
    }  # fmt: skip
    assert 0.0 <= summary["geneval"]["overall"]["mean"] <= 1.0
    assert 0.0 <= summary["vqa"]["overall"]["mean"] <= 1.0
    assert len(list((tmp_path / "run" / "eval" / "geneval").glob("seed_*"))) == 2
    assert len(json.loads((tmp_path / "run" / "eval" / "vqa.json").read_text())["answers"]) == 5
    before = summary_path.stat().st_mtime_ns
    again = _train(args, tmp_path)  # resumed: nothing to train, nothing to evaluate again
    assert again.returncode == 0, _stderr_tail(again)
    assert "evaluation already done" in again.stderr and summary_path.stat().st_mtime_ns == before

    from blip3o.cli.card import main as card_main

    assert card_main([str(tmp_path / "run"), "--out", str(tmp_path / "card")]) == 0
    card = (tmp_path / "card" / "MODEL_CARD.md").read_text()
    stage = json.loads((tmp_path / "run" / "generation" / "stage_summary.json").read_text())
    assert stage["steps_run"] == 1 and stage["wall_s"] > 0
    assert f"{summary['geneval']['overall']['mean']:.3f} ± " in card and "| **overall** |" in card
    assert "- DiT: 4 layers of width 128, 4 heads, patch 1, 128 channels in and out" in card
    assert (tmp_path / "card" / "curves.png").exists() and (tmp_path / "card" / "curves.csv").exists()
    assert (tmp_path / "card" / "failures.png").exists() or (tmp_path / "card" / "passes.png").exists()
    assert card_main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "card2")]) == 2
    assert "reused" not in card and "+ only" not in card
    # The recipe command is the one that made this run: the preset plus the overrides it was given.
    command = " ".join(
        ["blip3o train --preset tiny-gen --out", str(tmp_path / "run"), args[4], *args[6:], args[5]]
    )
    assert f"`{command}`" in card
    # Provenance: a stage filled from another model (tools/reuse_backbone.py), or resumed, says so.
    reused = {"source": "elsewhere/model", "tool": "tools/reuse_backbone.py", "log": "copied from c.csv"}
    (tmp_path / "run" / "generation" / "reused.json").write_text(json.dumps(reused))
    assert card_main([str(tmp_path / "run"), "--out", str(tmp_path / "card")]) == 0
    card = (tmp_path / "card" / "MODEL_CARD.md").read_text()
    assert "| reused, see (1) below |" in card
    assert (
        "(1) Stage(s) generation were not trained by this run: their weights were copied from `elsewhere/model`"
        in card
    )
    assert "(copied from c.csv)" in card
    (tmp_path / "run" / "generation" / "reused.json").unlink()
    summary_file = tmp_path / "run" / "generation" / "stage_summary.json"
    summary_file.write_text(json.dumps({**stage, "resumed_at": 7}))
    assert card_main([str(tmp_path / "run"), "--out", str(tmp_path / "card")]) == 0
    card = (tmp_path / "card" / "MODEL_CARD.md").read_text()
    assert "min (steps 7+ only) |" in card and "generation from step 7" in card


def test_object_label_target_runs_clip_decoder_and_generation(tmp_path: Path) -> None:
    """The object-centric target end to end on the miniature: CLIP learns object labels, the DiT generates the
    label head's directions (19 channels), a decoder whose 3x3 projection lets a token paint its neighbours
    learns from them (the pixel head's start is skipped: it renders 1x1 patches), and the model generates."""
    from blip3o.train.loop import run

    base = preset("tiny-test")
    labelled = object_label_model_config(base.model)
    decoder = replace(
        base.model.decoder, spatial_channels=8, spatial_upsample="pixel_shuffle", spatial_kernel=3
    )
    model_config = replace(labelled, clip=replace(labelled.clip, reconstruction_weight=1.0), decoder=decoder)
    stages = tuple(s for s in base.stages if s.kind in ("clip", "decoder", "generation"))
    config = replace(base, model=model_config, stages=stages)
    run(config, tmp_path / "run", progress=False)
    model = Blip3o.from_pretrained(tmp_path / "run" / "generation" / "model")
    assert model.config.target_shape == (19, 8, 8)
    basis = model.clip.component_basis  # (128, 19): the label head's directions, orthonormal
    assert torch.allclose(basis.T @ basis, torch.eye(19), atol=1e-4)
    assert model.generate(["a red circle"], steps=2)[0].size == (64, 64)
