"""ShapesWorld shards: reproducible bytes, a faithful round trip, damaged shards skipped and counted."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from blip3o.cli import world_shards
from blip3o.data.shards import (
    CorruptShardWarning,
    ShardReadStats,
    generate_sample,
    iter_samples,
    write_shard,
    write_shards,
)
from blip3o.world.render import render

N, PER_SHARD, SEED = 25, 10, 5


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(out, N, SEED, samples_per_shard=PER_SHARD, progress=False)
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_describes_the_shards(shard_dir):
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert manifest["world"] == "ShapesWorld v1"
    assert (manifest["n"], manifest["seed"], manifest["samples_per_shard"]) == (N, SEED, PER_SHARD)
    names = [s["name"] for s in manifest["shards"]]
    assert names == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar"]
    assert [s["samples"] for s in manifest["shards"]] == [10, 10, 5]
    for s in manifest["shards"]:
        assert s["sha256"] == sha256(shard_dir / s["name"])
    assert sorted(p.name for p in shard_dir.iterdir()) == sorted([*names, "manifest.json"])  # no temp files


def test_shard_layout_is_webdataset(shard_dir):
    with tarfile.open(shard_dir / "shapes-000000.tar") as tar:
        names = tar.getnames()
    assert len(names) == 5 * PER_SHARD
    assert names[:5] == [f"000000000.{f}" for f in ("long.txt", "png", "qa.json", "scene.json", "short.txt")]


def test_shards_are_reproducible_and_independent(shard_dir, tmp_path):
    write_shards(tmp_path / "again", N, SEED, samples_per_shard=PER_SHARD, progress=False)
    for name in ("shapes-000000.tar", "shapes-000002.tar"):
        assert (tmp_path / "again" / name).read_bytes() == (shard_dir / name).read_bytes()
    # One shard written on its own (as a parallel worker would) is the same file.
    digest = write_shard(tmp_path / "one.tar", SEED, 10, 20)
    assert digest == sha256(shard_dir / "shapes-000001.tar")
    write_shards(tmp_path / "other", 10, SEED + 1, samples_per_shard=PER_SHARD, progress=False)
    assert sha256(tmp_path / "other" / "shapes-000000.tar") != sha256(shard_dir / "shapes-000000.tar")


def test_round_trip_gives_back_each_sample(shard_dir):
    stats = ShardReadStats()
    samples = list(iter_samples(shard_dir, stats))
    assert (stats.shards_ok, stats.shards_skipped, stats.samples) == (3, 0, N)
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(N)]
    for i in (0, 13, 24):
        scene, ann = generate_sample(SEED, i)
        got = samples[i]
        assert got.scene == scene
        assert np.array_equal(np.asarray(got.image), np.asarray(render(scene)))
        assert (got.short_caption, got.long_caption, got.qa) == (ann.short_caption, ann.long_caption, ann.qa)


def damage(directory: Path) -> None:
    """Truncate shard 1 mid-file and replace shard 2 with garbage."""
    shard1 = directory / "shapes-000001.tar"
    data = shard1.read_bytes()
    shard1.write_bytes(data[: len(data) // 2 + 100])
    (directory / "shapes-000002.tar").write_bytes(b"this is not a tar file " * 64)


@pytest.mark.parametrize("verify", [True, False])
def test_damaged_shards_are_skipped_and_counted(shard_dir, tmp_path, verify):
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    damage(copy)
    stats = ShardReadStats()
    with pytest.warns(CorruptShardWarning) as caught:
        samples = list(iter_samples(copy, stats, verify=verify))
    assert (stats.shards_ok, stats.shards_skipped, stats.samples) == (1, 2, PER_SHARD)
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(PER_SHARD)]
    assert len(caught) == 2
    assert [Path(p).name for p, _ in stats.skipped] == ["shapes-000001.tar", "shapes-000002.tar"]


def test_damage_is_detected_without_a_manifest(shard_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar"):
        shutil.copy(shard_dir / name, bare / name)
    damage(bare)
    stats = ShardReadStats()
    paths = [*sorted(bare.glob("*.tar")), bare / "missing.tar"]
    with pytest.warns(CorruptShardWarning):
        samples = list(iter_samples(paths, stats))
    assert (stats.shards_ok, stats.shards_skipped, len(samples)) == (1, 3, PER_SHARD)


def test_cli_writes_shards(tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        world_shards.main(["--n", "5", "--out", str(out), "--seed", "3", "--per-shard", "2", "--no-progress"])
        == 0
    )
    assert "wrote 5 samples" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.tar")) == [f"shapes-00000{i}.tar" for i in range(3)]
    assert json.loads((out / "manifest.json").read_text())["seed"] == 3


def test_cli_refuses_the_vqa_seed(tmp_path, capsys):
    assert world_shards.main(["--n", "2", "--out", str(tmp_path / "x"), "--seed", "2000003"]) == 2
    assert "reserved" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
