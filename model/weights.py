"""Weights on disk: safetensors, one file or shards with an index, in Hugging Face's layout.

    DIR/model.safetensors                                  (when it fits in one shard)
    DIR/model-00001-of-00003.safetensors, ...              (else)
    DIR/model.safetensors.index.json                       {"metadata": {"total_size"}, "weight_map": {name: file}}

`write_weights` streams: it takes the names, shapes and dtypes first, writes each file's header,
then asks for one tensor at a time and writes its bytes, so that at most one tensor is held in
memory however large the model. `load_weights` reads either layout back.
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional

import torch

WEIGHTS_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
          torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL", torch.float64: "F64"}


class WeightsError(ValueError):
    pass


class Entry(NamedTuple):
    name: str
    shape: tuple
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def state_entries(state: dict, dtype: Optional[torch.dtype] = None) -> list[Entry]:
    """Entries of a state dict, floating tensors cast to `dtype` when given."""
    return [Entry(k, tuple(v.shape), dtype if dtype is not None and v.is_floating_point() else v.dtype)
            for k, v in state.items()]


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '10KB', '1234' -> bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), re.I)
    if not m:
        raise WeightsError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 1000000")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def plan_shards(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Entries in order, cut into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def _header(entries: list[Entry], metadata: dict) -> bytes:
    header, offset = {}, 0
    for e in entries:
        header[e.name] = {"dtype": DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_weights(directory: str | Path, entries: Iterable[Entry], get_tensor: Callable[[str], torch.Tensor],
                  max_shard_bytes: int = 5 * 10**9, metadata: Optional[dict] = None,
                  progress: Optional[Callable[[Entry], None]] = None) -> list[Path]:
    """Write the weights of `entries` into `directory` (one file, or shards + index), asking
    `get_tensor(name)` for each tensor in turn (cast to the entry's dtype here). Returns the files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [directory / WEIGHTS_FILE, directory / INDEX_FILE, *directory.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)  # an earlier save's files would be read with this one's
    entries = list(entries)
    shards = plan_shards(entries, max_shard_bytes)
    names = [WEIGHTS_FILE] if len(shards) == 1 else [SHARD_NAME.format(i + 1, len(shards)) for i in range(len(shards))]
    meta = {"format": "pt", **(metadata or {})}
    for name, shard in zip(names, shards):
        with open(directory / name, "wb") as f:
            f.write(_header(shard, meta))
            for e in shard:
                t = get_tensor(e.name)
                if tuple(t.shape) != tuple(e.shape):
                    raise WeightsError(f"{e.name}: shape {tuple(t.shape)}, expected {tuple(e.shape)}")
                t = t.detach().to("cpu", e.dtype).contiguous()
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
                del t
                if progress is not None:
                    progress(e)
            f.flush()
            os.fsync(f.fileno())
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                 "weight_map": {e.name: name for name, shard in zip(names, shards) for e in shard}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [directory / n for n in names]


class ByteProgress:
    """A tqdm bar over the bytes of `entries`, for write_weights' `progress` (a context manager)."""

    def __init__(self, entries: list[Entry], desc: str, enabled: bool = True):
        from tqdm import tqdm
        self.bar = tqdm(total=sum(e.nbytes for e in entries), unit="B", unit_scale=True, desc=desc,
                        disable=not enabled)

    def __call__(self, entry: Entry) -> None:
        self.bar.update(entry.nbytes)

    def __enter__(self) -> "ByteProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def has_weights(directory: str | Path) -> bool:
    return (Path(directory) / WEIGHTS_FILE).is_file() or (Path(directory) / INDEX_FILE).is_file()


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of `directory`, checked to exist."""
    directory = Path(directory)
    if (directory / INDEX_FILE).is_file():
        index = json.loads((directory / INDEX_FILE).read_text())
        files = [directory / f for f in dict.fromkeys(index["weight_map"].values())]
    elif (directory / WEIGHTS_FILE).is_file():
        files = [directory / WEIGHTS_FILE]
    else:
        raise FileNotFoundError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE}")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (named by {directory / INDEX_FILE})")
    return files


def load_weights(directory: str | Path, device="cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a folder written by `write_weights` (or by Hugging Face: the same layout)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    state = {}
    for f in weight_files(directory):
        try:
            state.update(load_file(str(f), device=str(device)))
        except SafetensorError as e:
            raise WeightsError(f"{f}: not a readable safetensors file ({e})") from None
    return state


class LazyWeights:
    """The tensors of a folder written by `write_weights` (or Hugging Face), by name, read one at a time."""

    def __init__(self, directory: Path):
        from safetensors import safe_open
        self.directory, self.where = directory, {}
        for f in weight_files(directory):
            try:
                with safe_open(str(f), "pt") as handle:
                    for key in handle.keys():
                        self.where[key] = f
            except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
                raise WeightsError(f"{f}: not a readable safetensors file ({e})") from None
        self._open = safe_open

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple:
        if name not in self.where:
            raise WeightsError(f"{name}: missing from {self.directory}")
        with self._open(str(self.where[name]), "pt") as handle:
            return tuple(handle.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise WeightsError(f"{name}: missing from {self.directory}")
        try:
            with self._open(str(self.where[name]), "pt") as handle:
                return handle.get_tensor(name)
        except Exception as e:  # noqa: BLE001 - a truncated file fails only when its tensor is read
            raise WeightsError(f"{self.where[name]}: cannot read {name} ({e})") from None
