"""Latent extraction of image-caption data as a cluster job: one task's share of the input units,
decoded and resized in DataLoader workers, encoded in full batches in the main process (on the
task's GPU when there is one) while the workers decode the next images.

Each input unit becomes one output shard, written by a `UnitWriter`: its images are grouped by
shape and encoded a batch at a time as a group fills, so what the shard holds, in which order,
depends only on the unit itself, never on how the workers' items interleave; a rerun after a kill
writes the same bytes. Finished units are recorded in the task's part (data_pipelines.ingest.parts).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from data_pipelines.documents import build_document
from data_pipelines.encoders import latent_frames
from data_pipelines.ingest.inputs import InputUnit, ReadOptions, Record, read_unit
from data_pipelines.ingest.parts import Part, skip_summary, merge_parts, output_name, unfinished
from data_pipelines.ingest.resolution import ResolutionPolicy, Skip
from data_pipelines.ingest.video import ClipPolicy, iter_clips
from data_pipelines.shards import ShardFile
from data_pipelines.tokenizer import Tokenizer, load_tokenizer
from data_pipelines.transport.policy import ReadPolicy, RemoteError
from model.layout import LayoutSpec

log = logging.getLogger(__name__)


class ExtractError(RuntimeError):
    """Extraction cannot go on (one line: the unit and the reason); finished units stay recorded."""


@dataclass(frozen=True)
class Preparation:
    """What a DataLoader worker does to a source sample before the encoder sees it."""
    resolution: ResolutionPolicy
    read: ReadOptions
    tokenizer: str            # a tokenizer file (data_pipelines.tokenizer.load_tokenizer)
    spatial_factor: int       # pixels per latent cell, per side
    temporal_factor: int      # frames per latent frame after the first (1: frame by frame)
    spec: LayoutSpec          # how training lays a document out (for its length)
    max_tokens: int           # a longer document is skipped ("too_long")
    clips: ClipPolicy = field(default_factory=ClipPolicy)  # how videos are cut
    transport: ReadPolicy = field(default_factory=ReadPolicy)

    def document_length(self, tokens: list[int], pixels: tuple) -> int:
        """Tokens of the document as the training loader lays it out (<bos> caption latent <eos>) for an
        image (H,W,3) or a clip (T,H,W,3) of these pixels."""
        *frames, height, width, _ = pixels
        grid = (height // self.spatial_factor, width // self.spatial_factor)
        frames = [latent_frames(t, self.temporal_factor) for t in frames]
        latent = np.zeros((1, *frames, *grid), np.float32)
        return len(build_document([{"tokens": tokens}, {"latent": latent}], self.spec, "generate", False, True))

    def media(self, rec: Record, name: str) -> Iterator[tuple[str, np.ndarray]]:
        """(key, H,W,3 image or T,H,W,3 clip) of a record, at the policy's size."""
        if rec.kind == "video":
            for j, clip in enumerate(iter_clips(rec.media, self.clips, self.resolution, name)):
                yield f"{rec.key}_{j:03d}", clip
        else:
            yield rec.key, self.resolution.apply(rec.media)


class UnitSamples(IterableDataset):
    """Items of the units (index, InputUnit) a worker owns, a unit at a time and in stored order:
    ("doc", u, key, caption, tokens, H,W,3 or T,H,W,3 uint8) | ("skip", u, reason, detail) |
    ("end", u) | ("error", u, message). A video gives a doc per clip."""

    def __init__(self, units: list[tuple[int, InputUnit]], prep: Preparation):
        self.units, self.prep = units, prep

    def __iter__(self):
        info = get_worker_info()
        mine = self.units[info.id::info.num_workers] if info else self.units
        tok = load_tokenizer(self.prep.tokenizer)
        for u, unit in mine:
            try:
                for rec in read_unit(unit, self.prep.read, self.prep.transport):
                    yield from self._prepare(u, unit, rec, tok)
            except (RemoteError, OSError, ValueError) as e:
                yield ("error", u, str(e) if unit.where in str(e) else f"{unit.where}: {e}")
                return
            yield ("end", u)

    def _prepare(self, u: int, unit: InputUnit, rec, tok: Tokenizer) -> Iterator[tuple]:
        if isinstance(rec, Skip):
            yield ("skip", u, rec.reason, f"{unit.where}: {rec}")
            return
        tokens = tok.encode(rec.caption)
        try:
            for key, pixels in self.prep.media(rec, f"{unit.where}:{rec.key}"):
                n = self.prep.document_length(tokens, pixels.shape)
                if n > self.prep.max_tokens:
                    yield ("skip", u, "too_long", f"{unit.where}:{key}: too_long: {'x'.join(map(str, pixels.shape))}"
                                                  f" makes {n} tokens, more than --max-tokens {self.prep.max_tokens}")
                else:
                    yield ("doc", u, key, rec.caption, tokens, pixels)
        except Skip as s:
            yield ("skip", u, s.reason, f"{unit.where}:{rec.key}: {s}")


PENDING_BATCHES = 4  # frames a unit may hold back, waiting for others of their shape, in batches


def _frames(shape: tuple) -> int:
    """Frames of an image (H,W,3: 1) or a clip (T,H,W,3)."""
    return shape[0] if len(shape) == 4 else 1


class UnitWriter:
    """The output shard of one input unit: documents grouped by image shape, each group encoded a
    batch at a time; the shard is renamed into place when the unit ends."""

    def __init__(self, out, unit: int, encoder, batch: int):
        self.unit, self.encoder, self.batch = unit, encoder, batch
        self.shard = ShardFile(out, output_name(unit))
        self.groups: dict[tuple, list] = {}  # shape -> pending (key, caption, tokens, image), first seen first
        self.skipped, self.shapes = Counter(), Counter()

    def add(self, key: str, caption: str, tokens: list[int], image: np.ndarray) -> None:
        shape = tuple(image.shape)
        group = self.groups.setdefault(shape, [])
        group.append((key, caption, tokens, image))
        if len(group) * _frames(shape) >= self.batch:  # --batch counts frames: a clip of T is T images
            self._encode(shape)
        elif sum(len(g) * _frames(s) for s, g in self.groups.items()) > PENDING_BATCHES * self.batch:
            # many shapes, each short of a batch: memory stays bounded; the largest group goes first
            self._encode(max(self.groups, key=lambda s: len(self.groups[s]) * _frames(s)))

    def _encode(self, shape: tuple) -> None:
        group = self.groups.pop(shape)
        pixels = np.stack([g[3] for g in group]).astype(np.float32) / 255.0
        if len(shape) == 4:  # clips: N,T,H,W,3 -> N,C,t,h,w
            latents = self.encoder.encode_clips(pixels)
        else:
            latents = self.encoder.encode_images(pixels)
        kind = "video" if len(shape) == 4 else "image"
        for (key, caption, tokens, _), lat in zip(group, latents):
            doc = {"segments": [{"text": caption, "tokens": tokens},
                                {"latent": "lat0.npy", "kind": kind, "shape": list(lat.shape)}]}
            self.shard.write(key, doc, {"lat0.npy": lat})
            self.shapes[tuple(lat.shape)] += 1

    def finish(self) -> Optional[dict]:
        """Encode what is pending; the shard's manifest entry (None when every sample was skipped)."""
        for shape in list(self.groups):
            self._encode(shape)
        if not self.shard.samples:
            self.shard.abandon()
            return None
        return self.shard.finish()


def _quiet_worker(_):
    torch.set_num_threads(1)  # decoding is the workers' job; the cores' threads are the encoder's


def extract(out, units: list[InputUnit], prep: Preparation, encoder, recipe: dict, task: int, tasks: int,
            digest: str, batch: int = 32, workers: int = 2, max_bad_fraction: float = 0.01,
            progress: bool = False) -> dict:
    """Extract task `task`'s share of `units` into `out`; merge the manifest when every task is done.
    Returns {"written", "skipped", "kept", "redone", "manifest"}."""
    part = Part(out, task, tasks, len(units), digest, recipe)
    todo = part.scan()
    log.info("task %d of %d: %d input units, %d finished before, %d to do", task, tasks, len(part.mine()),
             len(part.kept), len(todo))
    for u in todo:  # what killed runs of this task left half-written
        for stale in Path(out).glob(f"{output_name(u)}.*.tmp"):
            stale.unlink(missing_ok=True)
    # items are single images: the workers run two batches ahead of the encoder, and a worker slow on a
    # download holds up no other (the output does not depend on the order items arrive in)
    ahead = dict(prefetch_factor=max(2, -(-2 * batch // workers)), worker_init_fn=_quiet_worker,
                 in_order=False) if workers else {}
    loader = DataLoader(UnitSamples([(u, units[u]) for u in todo], prep), batch_size=None, num_workers=workers,
                        **ahead)
    writers: dict[int, UnitWriter] = {}
    bar = tqdm(total=len(todo), desc=f"task {task}/{tasks}", unit="shard", disable=not progress)
    try:
        for item in loader:
            kind, u = item[0], item[1]
            if kind == "error":
                raise ExtractError(item[2])
            w = writers.get(u) or writers.setdefault(u, UnitWriter(out, u, encoder, batch))
            if kind == "doc":
                w.add(item[2], item[3], list(item[4]), np.array(item[5]))  # a copy: frees the worker's shared memory
            elif kind == "skip":
                w.skipped[item[2]] += 1
                log.warning("skipped %s", item[3])
            else:  # end of the unit
                part.record(u, writers.pop(u).finish(), w.skipped, w.shapes)
                bar.update(1)
                _check_bad_fraction(part, max_bad_fraction, final=False)
    finally:
        bar.close()
        for w in writers.values():
            w.shard.abandon()
    _check_bad_fraction(part, max_bad_fraction, final=True)
    written, skipped = part.totals()
    result = {"written": written, "skipped": dict(skipped), "kept": len(part.kept), "redone": len(todo),
              "manifest": None}
    if not unfinished(out):
        result["manifest"] = merge_parts(out, max_bad_fraction)
    return result


JUDGED_AFTER = 1000  # samples: a fraction of fewer is judged only when the task ends


def _check_bad_fraction(part: Part, limit: float, final: bool) -> None:
    written, skipped = part.totals()
    bad = sum(skipped.values())
    if (final or written + bad >= JUDGED_AFTER) and bad > limit * (written + bad):
        raise ExtractError(f"{bad} of {written + bad} samples skipped ({skip_summary(skipped)}), more than "
                           f"--max-bad-fraction {limit:g}; the finished shards are kept: check the input, or raise "
                           "the limit and rerun")
