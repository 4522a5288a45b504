"""ShapesWorld webdataset shards: writing them reproducibly, and reading them back robustly.

A shard is a plain tar named `shapes-000000.tar`, ... holding, per sample (key = the sample index, 9 digits):
`png` (the render), `short.txt`, `long.txt`, `qa.json` (list of {question, answer, kind}) and `scene.json`
(`Scene.to_dict()`). Sample i depends only on (seed, i), so any shard can be (re)written on its own and the
bytes are identical across runs. `manifest.json` records what was written, with a sha256 per shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from blip3o.world.language import Annotation, QAPair, annotate
from blip3o.world.render import render
from blip3o.world.sampler import sample_scene
from blip3o.world.scene import Scene

WORLD_VERSION = "ShapesWorld v1"
MANIFEST_NAME = "manifest.json"
SAMPLE_FIELDS: tuple[str, ...] = ("png", "short.txt", "long.txt", "qa.json", "scene.json")
# Tar headers carry a time, owner and mode; fixing them is what makes the shard bytes reproducible.
_TAR_MTIME = 0.0
_TAR_OWNER = "blip3o"


def shard_name(shard_index: int) -> str:
    return f"shapes-{shard_index:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:09d}"  # no dots: webdataset splits key from field at the first dot


def generate_sample(seed: int, index: int) -> tuple[Scene, Annotation]:
    """The scene and annotation of sample `index` of the world drawn with `seed` (pure function)."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng)
    return scene, annotate(scene, rng)


def encode_sample(seed: int, index: int) -> dict[str, str | bytes]:
    """One webdataset sample: {"__key__": str, "png": bytes, "short.txt": bytes (UTF-8), ...}."""
    scene, ann = generate_sample(seed, index)
    png = io.BytesIO()
    render(scene).save(png, format="png")
    return {
        "__key__": sample_key(index),
        "png": png.getvalue(),
        "short.txt": ann.short_caption.encode(),
        "long.txt": ann.long_caption.encode(),
        "qa.json": json.dumps([q.to_dict() for q in ann.qa]).encode(),
        "scene.json": json.dumps(scene.to_dict()).encode(),
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_shard(path: str | Path, seed: int, start: int, stop: int, progress: tqdm | None = None) -> str:
    """Write samples [start, stop) to `path` (via a temporary file and a rename); returns its sha256."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as stream:
        writer = wds.TarWriter(stream, encoder=False, mtime=_TAR_MTIME, user=_TAR_OWNER, group=_TAR_OWNER)
        with writer:
            for index in range(start, stop):
                writer.write(encode_sample(seed, index))
                if progress is not None:
                    progress.update(1)
    digest = _sha256(tmp)
    os.replace(tmp, path)
    return digest


def write_shards(
    out_dir: str | Path, n: int, seed: int, samples_per_shard: int = 1000, progress: bool = True
) -> dict:
    """Write `n` samples drawn with `seed` as shards of `samples_per_shard` into `out_dir`; returns the manifest.

    Shards left over in `out_dir` from an earlier, larger run are not deleted but are not in the manifest,
    and readers given the directory follow the manifest.
    """
    if n < 1 or samples_per_shard < 1:
        raise ValueError(f"n and samples_per_shard must be positive, got {n} and {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    with tqdm(total=n, unit="sample", desc="shards", disable=not progress) as bar:
        for shard_index, start in enumerate(range(0, n, samples_per_shard)):
            stop = min(start + samples_per_shard, n)
            name = shard_name(shard_index)
            digest = write_shard(out / name, seed, start, stop, progress=bar)
            shards.append({"name": name, "first_index": start, "samples": stop - start, "sha256": digest})
    manifest = {
        "world": WORLD_VERSION,
        "n": n,
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "fields": list(SAMPLE_FIELDS),
        "shards": shards,
    }
    _atomic_write_bytes(out / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


# ---------------------------------------------------------------------------------------------- reading


class CorruptShardWarning(UserWarning):
    """A shard could not be read completely and was skipped."""


@dataclass
class ShardReadStats:
    shards_ok: int = 0
    shards_skipped: int = 0
    samples: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (shard path, reason)


@dataclass(frozen=True)
class WorldSample:
    key: str
    image: Image.Image
    short_caption: str
    long_caption: str
    qa: list[QAPair]
    scene: Scene


@dataclass(frozen=True)
class _ShardRef:
    path: Path
    sha256: str | None = None  # from a manifest, when there is one
    samples: int | None = None


def _manifest_refs(directory: Path) -> dict[str, _ShardRef]:
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        return {}
    manifest = json.loads(manifest_path.read_text())
    return {
        s["name"]: _ShardRef(directory / s["name"], s.get("sha256"), s.get("samples"))
        for s in manifest["shards"]
    }


def resolve_shards(paths_or_dir: str | Path | Iterable[str | Path]) -> list[_ShardRef]:
    """A directory (its manifest's shards, else every shapes-*.tar in it) or shard paths, with any checksums
    a manifest beside them records."""
    if isinstance(paths_or_dir, str | Path) and Path(paths_or_dir).is_dir():
        directory = Path(paths_or_dir)
        refs = _manifest_refs(directory)
        if refs:
            return list(refs.values())
        return [_ShardRef(p) for p in sorted(directory.glob("shapes-*.tar"))]
    paths = [paths_or_dir] if isinstance(paths_or_dir, str | Path) else list(paths_or_dir)
    resolved = []
    for p in map(Path, paths):
        ref = _manifest_refs(p.parent).get(p.name)
        resolved.append(_ShardRef(p, ref.sha256, ref.samples) if ref else _ShardRef(p))
    return resolved


def _decode(key: str, fields: dict[str, bytes]) -> WorldSample:
    image = Image.open(io.BytesIO(fields["png"]))
    image.load()  # decode now, so a damaged PNG fails here and not in the training loop
    return WorldSample(
        key=key,
        image=image.convert("RGB"),
        short_caption=fields["short.txt"].decode(),
        long_caption=fields["long.txt"].decode(),
        qa=[QAPair.from_dict(d) for d in json.loads(fields["qa.json"])],
        scene=Scene.from_dict(json.loads(fields["scene.json"])),
    )


def read_shard(ref: _ShardRef, verify: bool = True) -> list[WorldSample]:
    """Every sample of one shard, decoded; raises on any damage so the caller can skip the whole shard."""
    data = ref.path.read_bytes()
    if verify and ref.sha256 is not None and hashlib.sha256(data).hexdigest() != ref.sha256:
        raise ValueError("sha256 does not match the manifest")
    grouped: dict[str, dict[str, bytes]] = {}
    for member in tar_file_iterator(io.BytesIO(data)):
        key, suffix = base_plus_ext(member["fname"])
        if key is None:
            raise ValueError(f"unexpected member {member['fname']!r}")
        grouped.setdefault(key, {})[suffix] = member["data"]
    samples = []
    for key, fields in grouped.items():
        missing = [f for f in SAMPLE_FIELDS if f not in fields]
        if missing:
            raise ValueError(f"sample {key} lacks {missing}")
        samples.append(_decode(key, fields))
    if ref.samples is not None and len(samples) != ref.samples:
        raise ValueError(f"{len(samples)} samples, the manifest says {ref.samples}")
    return samples


def iter_samples(
    paths_or_dir: str | Path | Iterable[str | Path], stats: ShardReadStats | None = None, verify: bool = True
) -> Iterator[WorldSample]:
    """Stream decoded samples shard by shard, in order.

    A shard that is missing, truncated, not a tar, or fails its manifest checksum (when `verify`) is skipped
    whole, with a `CorruptShardWarning` and a count in `stats`; it never raises. Each shard is read and
    decoded completely before its first sample is yielded: a truncated tar otherwise yields its first
    samples before the damage shows, and "skipped" would mean "half read". This is why the reader uses
    webdataset's tar iterator per shard rather than the `WebDataset` pipeline, whose error handlers act per
    sample and cannot say which shard failed. A 1,000-sample shard is about 16 MB, so holding one is cheap.

    Without a manifest, a tar cut exactly between two samples cannot be told from a short one.
    """
    stats = stats if stats is not None else ShardReadStats()
    for ref in resolve_shards(paths_or_dir):
        try:
            samples = read_shard(ref, verify=verify)
        except Exception as exc:  # any damage means the shard is skipped, whatever form it takes
            reason = f"{type(exc).__name__}: {exc}"
            stats.shards_skipped += 1
            stats.skipped.append((str(ref.path), reason))
            warnings.warn(f"skipping shard {ref.path}: {reason}", CorruptShardWarning, stacklevel=2)
            continue
        stats.shards_ok += 1
        for sample in samples:
            stats.samples += 1
            yield sample
