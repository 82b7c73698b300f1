"""Whole fp32 tensors out of a checkpoint folder, one at a time, in bounded memory.

A ZeRO checkpoint keeps each rank's fp32 master weights as flat partitions in its optimizer
file (`*zero_pp_rank_R_*optim_states.pt`) and, in `rank_RRRRR.pt`, the EMA shadows in the same
layout. ZeRO-1/2 cut the concatenation of a group's parameters (each followed by its alignment
padding) into equal consecutive pieces, one per rank; ZeRO-3 cuts every parameter into
ceil(numel / ranks) pieces, rank r holding piece r of each, in order. A universal checkpoint
(DeepSpeed's `ds_to_universal`) holds one `zero/NAME/fp32.pt` per parameter.

Files are opened memory-mapped (`torch.load(mmap=True)`, a private mapping), so that reading a
parameter touches only its own bytes and the Adam moments in the same files are never read; the
pages of each piece are given back right after it is copied (madvise MADV_DONTNEED, Linux), or
elsewhere every mapping is dropped once `budget_bytes` were read: memory stays about one tensor.
DeepSpeed's own zero_to_fp32 holds the whole model (and for ZeRO-1/2 a second copy) instead.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import mmap
import sys
from pathlib import Path
from typing import Optional

import torch

from pretrain.checkpoint import CONFIG_FILE, EMA_FILE, rank_file


class CheckpointError(ValueError):
    pass


MAX_ABS = 1e6  # no weight of a trained model comes near; bytes of garbage read as fp32 almost all go past it or are NaN


def check_values(values: torch.Tensor, name: str, where: Path) -> None:
    """CheckpointError naming the file when `values` (of parameter `name`) hold non-finite or wildly
    out-of-range numbers: a corrupt file (torch.load checks no checksum)."""
    bad = ~torch.isfinite(values) | (values.abs() > MAX_ABS)
    if bool(bad.any()):
        first = values.reshape(-1)[bad.reshape(-1)][0].item()
        raise CheckpointError(f"{where}: corrupt: {int(bad.sum())} values of {name} are not finite or beyond "
                              f"±{MAX_ABS:g} (e.g. {first:g})")


def _drop_pages(address: int, nbytes: int) -> bool:
    """madvise(MADV_DONTNEED) over [address, address + nbytes) of a file mapping; False where unavailable."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC or not hasattr(mmap, "MADV_DONTNEED") or not sys.platform.startswith("linux"):
        return False  # elsewhere MADV_DONTNEED may keep the pages: drop whole mappings instead
    start = address - address % mmap.PAGESIZE
    return _LIBC.madvise(start, address + nbytes - start, mmap.MADV_DONTNEED) == 0


_LIBC = None


def _load(path: Path, mmap: bool = True):
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or not a torch file ({str(e).splitlines()[0]})") from None


class _Mapped:
    """One memory-mapped torch file, opened on first use and dropped on `release`."""

    def __init__(self, path: Path):
        self.path, self.obj = path, None

    def get(self):
        if self.obj is None:
            self.obj = _load(self.path)
        return self.obj

    def release(self) -> None:
        self.obj = None


class CheckpointReader:
    """`entries()` (name, shape) of the model's state dict; `tensor(name, ema)` a whole fp32 tensor."""

    def __init__(self, folder: str | Path, budget_bytes: int = 16 * 2**20):
        self.folder, self.budget, self.touched = Path(folder), budget_bytes, 0
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: no such checkpoint folder")
        states = sorted(self.folder.glob("*model_states.pt"))
        if not states:
            raise CheckpointError(f"{self.folder}: not a checkpoint folder (no *model_states.pt)")
        first = _load(states[0])  # mmap: the module weights of ZeRO-1/2 in it stay on disk
        self.client = {k: v for k, v in first.items() if k not in ("module", "optimizer", "lr_scheduler")}
        self.universal = (self.folder / "zero").is_dir()
        self.shapes: dict[str, torch.Size] = {}
        for group in first["param_shapes"]:
            self.shapes.update(group)
        self.group_shapes = [dict(g) for g in first["param_shapes"]]
        self.buffers = {k: v.float().clone() if v.is_floating_point() else v.clone()
                        for k, v in first["module"].items() if k in first.get("buffer_names", [])}
        self.shared = dict(first.get("shared_params", {}))
        if first.get("frozen_param_shapes"):
            raise CheckpointError(f"{self.folder}: frozen parameters are not supported")
        del first
        self.optim: list[_Mapped] = []
        self.world = 0
        if not self.universal:
            self._open_zero()
        self._ema_ranks: Optional[list[_Mapped]] = None

    # ---- layout ----------------------------------------------------------------------------
    def _open_zero(self) -> None:
        files = {}
        for f in self.folder.glob("*zero_pp_rank_*_optim_states.pt"):
            files[int(f.name.split("zero_pp_rank_")[1].split("_")[0])] = f
        if 0 not in files:
            raise CheckpointError(f"{self.folder}: no *zero_pp_rank_0_*optim_states.pt (not a ZeRO checkpoint)")
        osd = _load(files[0])["optimizer_state_dict"]
        count = osd.get("partition_count", len(files))
        self.world = max(count) if isinstance(count, list) else int(count)
        missing = [r for r in range(self.world) if r not in files]
        if missing:
            raise CheckpointError(f"{self.folder}: rank file of rank {missing[0]} missing "
                                  f"(*zero_pp_rank_{missing[0]}_*optim_states.pt; the checkpoint has {self.world} ranks)")
        # DeepSpeed's ZeRO-1/2 optimizer saves its partitions without their end padding (`group_paddings`);
        # BF16_Optimizer (ZeRO-1 in bf16, which writes no zero_stage) and ZeRO-3 save them whole
        trims = "zero_stage" in osd
        self.stage = int(osd.get("zero_stage", 1))
        self.key = "single_partition_of_fp32_groups" if self.stage <= 2 else "fp32_flat_groups"
        if self.key not in osd:
            raise CheckpointError(f"{files[0]}: no {self.key} (not a ZeRO-{self.stage} optimizer file)")
        paddings = osd.get("param_alignment_paddings")
        del osd
        self.optim = [_Mapped(files[r]) for r in range(self.world)]
        saved, sizes = [], None  # per rank: the values saved per group; the partitions' size in memory
        for r in range(self.world):  # each opens (a truncated file does not) and has its partitions
            osd = self.optim[r].get().get("optimizer_state_dict", {})
            if self.key not in osd:
                raise CheckpointError(f"{files[r]}: no {self.key} (rank 0's file has them)")
            saved.append([int(t.numel()) for t in osd[self.key]])
            pads = osd.get("group_paddings", [0] * len(saved[-1])) if trims and self.stage <= 2 else [0] * len(saved[-1])
            full = [n + pad for n, pad in zip(saved[-1], pads)]
            if sizes is None:
                sizes = full
            if full != sizes:
                raise CheckpointError(f"{files[r]}: partitions of {full} values, rank 0's of {sizes}")
        self.saved = saved
        self.where: dict[str, tuple[int, int]] = {}  # name -> (group, offset): ZeRO-1/2 in the group's
        if self.stage <= 2:                          # concatenation, ZeRO-3 in each rank's piece
            for g, shapes in enumerate(self.group_shapes):
                offset = 0
                for i, (name, shape) in enumerate(shapes.items()):
                    self.where[name] = (g, offset)
                    offset += shape.numel() + (paddings[g][i] if paddings else 0)
                if offset > sizes[g] * self.world:
                    raise CheckpointError(f"{self.folder}: group {g} holds {sizes[g] * self.world} values, its "
                                          f"parameters {offset}")
            self.part_sizes = sizes
        else:
            for g, shapes in enumerate(self.group_shapes):
                offset = 0
                for name, shape in shapes.items():
                    self.where[name] = (g, offset)
                    offset += math.ceil(shape.numel() / self.world)
                if offset != sizes[g]:
                    raise CheckpointError(f"{self.folder}: group {g} holds {sizes[g]} values per rank, its "
                                          f"parameters need {offset}")

    def entries(self) -> list[tuple[str, torch.Size]]:
        """(name, shape) of every tensor of the model's state dict, in the model's order."""
        out = [(k, v.shape) for k, v in self.buffers.items()] + list(self.shapes.items())
        out += [(alias, self.shapes[source]) for alias, source in self.shared.items() if source in self.shapes]
        return out

    @property
    def config(self) -> dict:
        path = self.folder / CONFIG_FILE
        return json.loads(path.read_text()) if path.is_file() else self.client.get("config", {})

    # ---- EMA -------------------------------------------------------------------------------
    def has_ema(self) -> bool:
        if self.universal:
            return (self.folder / EMA_FILE).is_file()
        return self._ema() is not None

    def _ema(self) -> Optional[list[_Mapped]]:
        """The rank files holding the EMA partitions, or None when the run kept no EMA."""
        if self._ema_ranks is None and not self.universal:
            files = [self.folder / rank_file(r) for r in range(self.world)]
            if not any(f.is_file() for f in files):
                return None  # no rank files at all: a checkpoint of another writer
            if not files[0].is_file():
                raise CheckpointError(f"{files[0]}: missing (every rank writes one; the others are there)")
            ranks = [_Mapped(f) for f in files]
            if ranks[0].get().get("ema") is None:
                return None
            for f, mapped in zip(files[1:], ranks[1:]):  # each opens (a truncated file does not) and has its partition
                if not f.is_file():
                    raise CheckpointError(f"{f}: missing (rank {files.index(f)}'s EMA; rank 0 has one)")
                if mapped.get().get("ema") is None:
                    raise CheckpointError(f"{f}: no EMA (rank 0 has one)")
            self._ema_ranks = ranks
        return self._ema_ranks

    def _flat(self, rank: int, group: int, ema: bool) -> torch.Tensor:
        if ema:
            state = self._ema()[rank].get().get("ema")
            if state is None:
                raise CheckpointError(f"{self._ema()[rank].path}: no EMA (the other ranks have one)")
            return state["shadow"][group]
        return self.optim[rank].get()["optimizer_state_dict"][self.key][group]

    # ---- tensors ---------------------------------------------------------------------------
    def tensor(self, name: str, ema: bool = False) -> torch.Tensor:
        """The whole fp32 tensor `name` (the EMA's with `ema`), a new tensor of its own."""
        name = self.shared.get(name, name)
        if name in self.buffers:
            return self.buffers[name]
        if name not in self.shapes:
            raise CheckpointError(f"{self.folder}: no parameter {name!r}")
        shape = self.shapes[name]
        n = shape.numel()
        if self.universal:
            return self._universal(name, ema).float().view(shape)
        g, start = self.where[name]
        if self.stage <= 2:  # [start, start + n) of the group's concatenation, cut into equal pieces
            size = self.part_sizes[g]
            spans = [(r, max(start, r * size) - r * size, min(start + n, (r + 1) * size) - r * size)
                     for r in range(start // size, (start + n - 1) // size + 1)] if n else []
        else:  # piece r of the parameter, at `start` in rank r's flat groups
            piece = math.ceil(n / self.world)
            spans = [(r, start, start + min(piece, n - r * piece)) for r in range(self.world) if r * piece < n]
        out, filled = torch.empty(n, dtype=torch.float32), 0
        for r, lo, hi in spans:  # copy each rank's piece, then let its pages go
            if hi > lo:
                piece = self._flat(r, g, ema)[lo:hi]
                if hi > piece.numel() + lo:
                    raise CheckpointError(f"{self.folder}: rank {r} holds too few values for {name}")
                check_values(piece, name, (self._ema() if ema else self.optim)[r].path)
                out[filled:filled + hi - lo] = piece
                filled += hi - lo
                self._touch(piece)
        if filled != n:
            raise CheckpointError(f"{self.folder}: {name} has {filled} of its {n} values in the rank files")
        return out.view(shape)

    def _touch(self, piece: torch.Tensor) -> None:
        """Give back the pages of a piece just copied (a private file mapping: they are read again
        from the file if needed). Without madvise: drop every mapping once `budget` bytes were read."""
        nbytes = piece.numel() * piece.element_size()
        if not _drop_pages(piece.data_ptr(), nbytes):
            self.touched += nbytes
            if self.touched > self.budget:
                self.release()

    def _universal(self, name: str, ema: bool) -> torch.Tensor:
        if ema:
            if not self.has_ema():
                raise CheckpointError(f"{self.folder}: no EMA ({EMA_FILE})")
            if self._ema_ranks is None:
                self._ema_ranks = [_Mapped(self.folder / EMA_FILE)]
            source = self._ema_ranks[0].get()[name]
            check_values(source, name, self.folder / EMA_FILE)
            out = source.clone()
            self._touch(source)  # one mapping holds the whole EMA: give each tensor's pages back
            return out
        path = self.folder / "zero" / name / "fp32.pt"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (universal checkpoint without parameter {name!r})")
        state = _load(path)  # its own mapping, gone with `state`
        values = state["param"] if isinstance(state, dict) else state
        check_values(values, name, path)
        return values.clone()

    def state_dict(self, ema: bool = False) -> dict[str, torch.Tensor]:
        """Every tensor at once (fp32): for models that fit in memory."""
        return {name: self.tensor(name, ema) for name, _ in self.entries()}

    def release(self) -> None:
        for m in self.optim + (self._ema_ranks or []):
            m.release()
        self.touched = 0
