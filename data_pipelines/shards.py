"""WebDataset tar shards of interleaved documents, and their manifest.

A sample is `KEY.json` = {"segments": [{"text": str, "tokens": [ids]} | {"latent": "lat0.npy",
"kind": "image"|"video", "shape": [C,(T,)h,w]}, ...]} plus one `KEY.latN.npy` per latent.
`DIR/manifest.json` lists the shards with their sample counts and sha256, `num_samples`,
the encoder and tokenizer, and a `fingerprint` of all of it but the `LOCATIONS`. Shards are written under a
temporary name and renamed when complete; the manifest is written last. This module is the one
owner of that format: others read a manifest as a `Manifest` (`load_manifest`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import webdataset as wds

from data_pipelines.tar_index import TarShard
from data_pipelines.transport.fetch import download, download_bytes, spill_file
from data_pipelines.transport.locations import is_remote, location
from data_pipelines.transport.policy import ReadPolicy, ReadStats, RemoteError
from model.config_system import InputMissing

MANIFEST = "manifest.json"
FORMAT = "monofusion-shards/1"


@dataclass(frozen=True)
class ShardInfo:
    name: str      # file name in the shard folder
    samples: int
    sha256: str = ""


@dataclass(frozen=True)
class Manifest:
    """A shard set: where it is (a folder, URL prefix or pipe: template), its shards, and how its
    samples were encoded and tokenized."""
    root: str
    shards: tuple[ShardInfo, ...]
    num_samples: int
    fingerprint: str
    encoder: Optional[dict] = None       # data_pipelines.encoders describe(): load_encoder rebuilds it
    latent_channels: int = 0
    latent_shapes: dict = field(default_factory=dict)  # kind -> the most common [C,(T,)H,W]
    tokenizer: dict = field(default_factory=dict)      # {fingerprint, vocab_size, path}
    source: dict = field(default_factory=dict)         # the source's name and options
    resolution: dict = field(default_factory=dict)     # data_pipelines.ingest.resolution: how images were sized
    skipped: dict = field(default_factory=dict)        # reason -> samples of the source not written
    shape_counts: dict = field(default_factory=dict)   # kind -> {"Cx(T)xHxW": documents} (ingest sources)
    video: dict = field(default_factory=dict)          # data_pipelines.ingest.video: how videos were cut

    @classmethod
    def from_json(cls, root: str | Path, raw: dict) -> "Manifest":
        return cls(str(root), tuple(ShardInfo(**s) for s in raw["shards"]), raw["num_samples"], raw["fingerprint"],
                   raw.get("encoder"), raw.get("latent_channels", 0), dict(raw.get("latent_shapes", {})),
                   dict(raw.get("tokenizer", {})), dict(raw.get("source", {})), dict(raw.get("resolution", {})),
                   dict(raw.get("skipped", {})), dict(raw.get("shape_counts", {})), dict(raw.get("video", {})))

    @property
    def tokenizer_path(self) -> Optional[str]:
        return self.tokenizer.get("path")

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get("vocab_size", 0))

    @property
    def shard_sizes(self) -> list[int]:
        return [s.samples for s in self.shards]

    def shard_path(self, index: int) -> str:
        """Where shard `index` is: a local path, a URL or a pipe: command (data_pipelines.transport)."""
        return location(self.root, self.shards[index].name)


class BadSample(ValueError):
    """A sample that cannot be decoded; the message names the shard and key."""


class ShardFile:
    """One tar shard being written: under a temporary name of this process until `finish()` hashes
    it and renames it, so a killed writer never leaves a shard that looks complete, and two writers
    of the same shard never write into one file."""

    def __init__(self, out_dir: str | Path, name: str):
        self.out, self.name = Path(out_dir), name
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = temporary_path(self.out / name)
        self._file = open(self.tmp, "wb")
        self._tar = wds.TarWriter(self._file, mtime=0.0)
        self.samples = 0

    def write(self, key: str, doc: dict, arrays: dict[str, np.ndarray]) -> None:
        """Add sample `key`: its JSON document and one `.npy` entry per array."""
        sample = {"__key__": key, "json": json.dumps(doc, separators=(",", ":")).encode()}
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            sample[name] = buf.getvalue()
        self._tar.write(sample)
        self.samples += 1

    def finish(self) -> dict:
        """Close, hash and rename the shard; its manifest entry {name, samples, sha256}."""
        self._tar.close()
        self._file.close()
        entry = {"name": self.name, "samples": self.samples, "sha256": file_sha256(self.tmp)}
        os.replace(self.tmp, self.out / self.name)
        return entry

    def abandon(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)


def temporary_path(path: Path) -> Path:
    """Where this process writes `path` before renaming it into place (host and pid in the name: tasks
    on several nodes may write the same file at once)."""
    return path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class ShardSetWriter:
    """Write samples into numbered tar shards of `samples_per_shard` samples each."""

    def __init__(self, out_dir: str | Path, samples_per_shard: int, prefix: str = "shard"):
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard: must be positive, got {samples_per_shard}")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.per_shard, self.prefix = samples_per_shard, prefix
        self.shards: list[dict] = []
        self._shard: Optional[ShardFile] = None

    def write(self, key: str, doc: dict, arrays: dict[str, np.ndarray]) -> None:
        if self._shard is None:
            self._shard = ShardFile(self.out, shard_name(len(self.shards), self.prefix))
        self._shard.write(key, doc, arrays)
        if self._shard.samples == self.per_shard:
            self.shards.append(self._shard.finish())
            self._shard = None

    def close(self, **info) -> Manifest:
        """Finish the last shard and write the manifest (with `info`: encoder, tokenizer, ...)."""
        if self._shard is not None:
            self.shards.append(self._shard.finish())
            self._shard = None
        return write_manifest(self.out, self.shards, **info)


def shard_name(index: int, prefix: str = "shard") -> str:
    return f"{prefix}-{index:06d}.tar"


def write_manifest(out_dir: str | Path, shards: list[dict], **info) -> Manifest:
    """Write `out_dir/manifest.json` (atomically) for `shards` ({name, samples, sha256}, in order),
    with `info` (encoder, tokenizer, source, skipped, ...); returns it as a Manifest."""
    out = Path(out_dir)
    manifest = {"format": FORMAT, "shards": shards, "num_samples": sum(s["samples"] for s in shards), **info}
    manifest["fingerprint"] = fingerprint(manifest)
    tmp = temporary_path(out / MANIFEST)  # tasks that finish together may both write it
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)
    return Manifest.from_json(out, manifest)


# Where the tokenizer, the VAE and the source files were when the shards were written: recorded, but
# not fingerprinted (the same shards written from another checkout are the same data; their content
# is covered by the shards' sha256 and the tokenizer's own fingerprint).
LOCATIONS = (("tokenizer", "path"), ("encoder", "path"), ("source", "input"))


def fingerprint(manifest: dict, with_locations: bool = False) -> str:
    """A hash of the manifest without its fingerprint (and, unless `with_locations`, the LOCATIONS;
    manifests written before 2026-11-30 hashed those too)."""
    body = {k: v for k, v in manifest.items() if k != "fingerprint"}
    if not with_locations:
        for part, key in LOCATIONS:
            if isinstance(body.get(part), dict):
                body[part] = {k: v for k, v in body[part].items() if k != key}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


MANIFEST_MAX_BYTES = 1 << 30


def load_manifest(directory: str | Path, policy: Optional[ReadPolicy] = None) -> Manifest:
    """The manifest of a shard set (a folder, URL prefix or pipe: template, data_pipelines.transport),
    checked (format, fingerprint); one-line errors naming the file."""
    path = location(str(directory), MANIFEST)
    if not is_remote(str(directory)) and not Path(path).is_file():
        raise InputMissing(f"{path}: no shard manifest (write shards with data_pipelines.write_shards)")
    policy = dataclasses.replace(policy or ReadPolicy(), max_bytes=MANIFEST_MAX_BYTES)
    try:
        raw = download_bytes(path, policy) if is_remote(str(directory)) else Path(path).read_bytes()
        manifest = json.loads(raw)
    except RemoteError as e:
        raise InputMissing(str(e)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {FORMAT}")
    if manifest.get("fingerprint") not in (fingerprint(manifest), fingerprint(manifest, with_locations=True)):
        raise ValueError(f"{path}: fingerprint does not match its contents (edited by hand?)")
    return Manifest.from_json(directory, manifest)


def open_shard(manifest: Manifest, index: int, policy: Optional[ReadPolicy] = None,
               stats: Optional[ReadStats] = None) -> TarShard:
    """Shard `index` of a shard set, indexed (close it when done). A local shard is read in place; a
    remote one is downloaded once into a spill file (data_pipelines.transport.fetch: retried, resumed,
    checked against the manifest's sha256 — a mismatch is a ChecksumError, never a shard to read).
    FileNotFoundError for a missing local shard, RemoteError, TooLarge."""
    where = manifest.shard_path(index)
    if not is_remote(manifest.root):
        file = open(where, "rb")
        try:
            return TarShard(file, where)
        except BaseException:
            file.close()
            raise
    policy = policy or ReadPolicy()
    spill = spill_file(policy)
    try:
        download(where, spill, policy, stats, sha256=manifest.shards[index].sha256 or None)
        return TarShard(spill, where)
    except BaseException:
        spill.close()
        raise


def decode_sample(key: str, files: dict, where: str) -> list[dict]:
    """Sample files -> segments [{"tokens": [...]} | {"latent": array, "kind": str}]; BadSample names it."""
    if "json" not in files:
        raise BadSample(f"{where}:{key}: no .json entry")
    try:
        doc = json.loads(files["json"])
        segments = doc["segments"]
    except (ValueError, KeyError, TypeError) as e:
        raise BadSample(f"{where}:{key}: invalid JSON ({e})") from None
    out = []
    for seg in segments:
        if "tokens" in seg:
            out.append({"tokens": seg["tokens"]})
            continue
        name = seg.get("latent")
        if name not in files:
            raise BadSample(f"{where}:{key}: missing {name}")
        try:
            arr = np.load(io.BytesIO(files[name]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise BadSample(f"{where}:{key}: unreadable {name} ({e})") from None
        if list(arr.shape) != list(seg.get("shape", [])):
            raise BadSample(f"{where}:{key}: {name} has shape {list(arr.shape)}, the JSON says {seg.get('shape')}")
        out.append({"latent": arr, "kind": seg.get("kind", "image")})
    return out


def iter_shard_documents(directory: str | Path) -> Iterator[tuple[str, list[dict]]]:
    """(key, segments) of every sample of a shard set in stored order (for inspection/tests)."""
    manifest = load_manifest(directory)
    for i in range(len(manifest.shards)):
        shard = open_shard(manifest, i)
        try:
            if shard.error:
                raise BadSample(f"{shard.name}: {shard.error}")
            for j in range(len(shard)):
                key, files = shard.sample(j)
                yield key, decode_sample(key, files, shard.name)
        finally:
            shard.close()
