"""WebDataset tar shards of interleaved documents, and their manifest.

A sample is `KEY.json` = {"segments": [{"text": str, "tokens": [ids]} | {"latent": "lat0.npy",
"kind": "image"|"video", "shape": [C,(T,)h,w]}, ...]} plus one `KEY.latN.npy` per latent.
`DIR/manifest.json` lists the shards with their sample counts and sha256, `num_samples`,
the encoder and tokenizer, and a `fingerprint` of all of it but the `LOCATIONS`. Shards are written under a
temporary name and renamed when complete; the manifest is written last. This module is the one
owner of that format: others read a manifest as a `Manifest` (`load_manifest`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from data_pipelines import remote

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

    @classmethod
    def from_json(cls, root: str | Path, raw: dict) -> "Manifest":
        return cls(str(root), tuple(ShardInfo(**s) for s in raw["shards"]), raw["num_samples"], raw["fingerprint"],
                   raw.get("encoder"), raw.get("latent_channels", 0), dict(raw.get("latent_shapes", {})),
                   dict(raw.get("tokenizer", {})), dict(raw.get("source", {})))

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
        """Where shard `index` is: a local path, a URL or a pipe: command (data_pipelines.remote)."""
        return remote.location(self.root, self.shards[index].name)


class BadSample(ValueError):
    """A sample that cannot be decoded; the message names the shard and key."""


class ShardSetWriter:
    """Write samples into numbered tar shards of `samples_per_shard` samples each."""

    def __init__(self, out_dir: str | Path, samples_per_shard: int, prefix: str = "shard"):
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard: must be positive, got {samples_per_shard}")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.per_shard, self.prefix = samples_per_shard, prefix
        self.shards: list[dict] = []
        self._tar: Optional[wds.TarWriter] = None
        self._file = None
        self._count = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._file = open(self.out / (name + ".tmp"), "wb")
        self._tar = wds.TarWriter(self._file, mtime=0.0)
        self.shards.append({"name": name, "samples": 0})

    def _finish(self) -> None:
        self._tar.close()
        self._file.close()
        entry = self.shards[-1]
        tmp = self.out / (entry["name"] + ".tmp")
        entry["sha256"] = hashlib.sha256(tmp.read_bytes()).hexdigest()
        os.replace(tmp, self.out / entry["name"])
        self._tar = None

    def write(self, key: str, doc: dict, arrays: dict[str, np.ndarray]) -> None:
        if self._tar is None:
            self._open()
        sample = {"__key__": key, "json": json.dumps(doc, separators=(",", ":")).encode()}
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            sample[name] = buf.getvalue()
        self._tar.write(sample)
        self.shards[-1]["samples"] += 1
        if self.shards[-1]["samples"] == self.per_shard:
            self._finish()

    def close(self, **info) -> Manifest:
        """Finish the last shard and write the manifest (with `info`: encoder, tokenizer, ...)."""
        if self._tar is not None:
            self._finish()
        manifest = {"format": FORMAT, "shards": self.shards,
                    "num_samples": sum(s["samples"] for s in self.shards), **info}
        manifest["fingerprint"] = fingerprint(manifest)
        tmp = self.out / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, self.out / MANIFEST)
        return Manifest.from_json(self.out, manifest)


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


def load_manifest(directory: str | Path, retries: int = 5, backoff: float = 0.5) -> Manifest:
    """The manifest of a shard set (a folder, URL prefix or pipe: template, data_pipelines.remote),
    checked (format, fingerprint); one-line errors naming the file."""
    path = remote.location(str(directory), MANIFEST)
    if not remote.is_remote(str(directory)) and not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no shard manifest (write shards with data_pipelines.write_shards)")
    try:
        manifest = json.loads(remote.read_bytes(path, retries=retries, backoff=backoff))
    except remote.RemoteError as e:
        raise FileNotFoundError(str(e)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {FORMAT}")
    if manifest.get("fingerprint") not in (fingerprint(manifest), fingerprint(manifest, with_locations=True)):
        raise ValueError(f"{path}: fingerprint does not match its contents (edited by hand?)")
    return Manifest.from_json(directory, manifest)


def read_shard(path: str | Path, data: Optional[bytes] = None) -> tuple[list[tuple[str, dict]], Optional[str]]:
    """All samples of a shard as (key, {extension: bytes}), in stored order, and the read
    error that stopped reading early (truncated or corrupt tar), if any. `data`: the shard's
    bytes, already read (remote.read_bytes), else the local file `path` is read."""
    errors: list[str] = []

    def handler(exn: Exception) -> bool:
        errors.append(f"{type(exn).__name__}: {exn}")
        return False

    samples = []
    try:
        with (io.BytesIO(data) if data is not None else open(path, "rb")) as f:
            files = (dict(item, __url__=str(path)) for item in tar_file_iterator(f, handler=handler))
            for s in group_by_keys(files, handler=handler):
                samples.append((s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")}))
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        errors.append(f"{type(e).__name__}: {e}")
    return samples, (errors[0] if errors else None)


def fetch_shard(manifest: Manifest, index: int, max_bytes: int = 0, retries: int = 5,
                backoff: float = 0.5) -> tuple[list[tuple[str, dict]], Optional[str]]:
    """read_shard of shard `index` wherever it is: a remote one is read whole (at most `max_bytes`),
    retried when a read fails or its bytes do not match the manifest's sha256 (remote.read_bytes)."""
    where = manifest.shard_path(index)
    if not remote.is_remote(manifest.root):
        return read_shard(where)
    data = remote.read_bytes(where, max_bytes, retries, backoff, sha256=manifest.shards[index].sha256 or None)
    return read_shard(where, data)


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
        where = manifest.shard_path(i)
        samples, error = fetch_shard(manifest, i)
        if error:
            raise BadSample(f"{where}: {error}")
        for key, files in samples:
            yield key, decode_sample(key, files, where)
