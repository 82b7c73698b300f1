"""Encode a source's documents once, offline, into WebDataset tar shards plus a manifest.

    python -m data_pipelines.write_shards --source digits --encoder pixels \\
        --tokenizer tok.model --out shards/digits --samples-per-shard 256
    python -m data_pipelines.write_shards --source jsonl --input docs.jsonl --encoder vae --vae my_vae/ ...
    python -m data_pipelines.write_shards --source webdataset --input laion/ --encoder vae --vae my_vae/ \
        --tokenizer tok.model --out shards/laion --max-pixels 65536 --seq-len 1024 --tasks 64 --task 3

Text is stored as token ids, images and videos as latents (`.npy`, float16). The webdataset and
parquet sources (data_pipelines.ingest) are split over tasks (--tasks/--task, or Slurm's or
torchrun's rank variables), write one output shard per input unit, resume after a kill, and merge
the manifest when the last task finishes (or by `python -m data_pipelines.merge_shards OUT`).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Iterator, Optional

import numpy as np
from tqdm import tqdm

from data_pipelines.encoders import ENCODERS, build_encoder, frames_at_least
from data_pipelines.ingest.extract import ExtractError, Preparation, extract
from data_pipelines.ingest.inputs import INGEST_SOURCES, ReadOptions, list_units
from data_pipelines.ingest.parts import units_digest
from data_pipelines.ingest.resolution import ResolutionPolicy
from data_pipelines.ingest.tasks import task_device, task_split
from data_pipelines.ingest.video import ClipPolicy
from data_pipelines.shards import Manifest, ShardSetWriter
from data_pipelines.sources import DIGIT_SPLITS, SOURCES, digit_split, get_source
from data_pipelines.tokenizer import Tokenizer, load_tokenizer
from model.layout import LayoutSpec


def _chunks(it: Iterable, n: int) -> Iterator[list]:
    it = iter(it)
    while chunk := list(islice(it, n)):
        yield chunk


def encode_documents(docs: list[list[dict]], tokenizer: Tokenizer, encoder) -> list[tuple[dict, dict]]:
    """Raw documents -> (sample JSON, {name: latent array}); images of one shape are encoded together."""
    groups: dict[tuple, list] = defaultdict(list)  # image shape -> [(doc index, segment index)]
    for d, doc in enumerate(docs):
        for s, seg in enumerate(doc):
            if "image" in seg:
                groups[seg["image"].shape].append((d, s))
    latents: dict[tuple[int, int], np.ndarray] = {}
    for where in groups.values():
        encoded = encoder.encode_images(np.stack([docs[d][s]["image"] for d, s in where]))
        latents.update(zip(where, encoded))
    out = []
    for d, doc in enumerate(docs):
        segments, arrays = [], {}
        for s, seg in enumerate(doc):
            if "text" in seg:
                segments.append({"text": seg["text"], "tokens": tokenizer.encode(seg["text"])})
                continue
            kind = "image" if "image" in seg else "video"
            lat = latents[(d, s)] if kind == "image" else encoder.encode_clips(seg["video"][None])[0]
            name = f"lat{len(arrays)}.npy"
            arrays[name] = lat
            segments.append({"latent": name, "kind": kind, "shape": list(lat.shape)})
        out.append(({"segments": segments}, arrays))
    return out


def write_shards(source: str, out: str, tokenizer: str, encoder: str = "pixels", vae: str | None = None,
                 channels: int = 3, samples_per_shard: int = 256, batch: int = 64, progress: bool = True,
                 **source_options) -> Manifest:
    """Write `source`'s documents as shards under `out`; returns the manifest."""
    tok = load_tokenizer(tokenizer)
    enc = build_encoder(encoder, vae, channels)
    for key in ("frames", "clip_frames"):  # a clip length the encoder cannot take: refused before any work
        if source_options.get(key) is not None:
            try:
                enc.latent_frames(source_options[key])
            except ValueError as e:
                raise ValueError(f"--{key.replace('_', '-')}: {e}") from None
    docs = get_source(source)(**source_options)
    writer = ShardSetWriter(out, samples_per_shard)
    total = source_options.get("num_samples") or (len(digit_split(source_options.get("split", "all")))
                                                  if source == "digits" else None)
    bar = tqdm(total=total, desc=f"{source} -> {out}", unit="doc", disable=not progress)
    index = 0
    shapes: dict[str, Counter] = {"image": Counter(), "video": Counter()}
    for chunk in _chunks(docs, batch):
        for sample, arrays in encode_documents(chunk, tok, enc):
            writer.write(f"{source}-{index:08d}", sample, arrays)
            for seg in sample["segments"]:
                if "latent" in seg:
                    shapes[seg["kind"]][tuple(seg["shape"])] += 1
            index += 1
        bar.update(len(chunk))
    bar.close()
    return writer.close(source={"name": source, **{k: v for k, v in source_options.items() if v is not None}},
                        encoder=enc.describe(), latent_channels=enc.channels,
                        latent_shapes={k: list(c.most_common(1)[0][0]) for k, c in shapes.items() if c},
                        tokenizer=_describe_tokenizer(tok))


def _describe_tokenizer(tok: Tokenizer) -> dict:
    return {"fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size, "path": str(tok.path.resolve())}


@dataclass(frozen=True)
class Sizing:
    """How images are sized and which documents fit (the ingest sources' flags)."""
    image_size: Optional[int] = None
    max_pixels: Optional[int] = None
    min_size: int = 0
    patch_size: int = 2
    layout: str = "monoformer"
    block_size: int = 0               # acdit: latent tokens per block (sides become multiples of its side)
    seq_len: int = 1024
    max_tokens: Optional[int] = None  # default: seq_len


def write_media_shards(source: str, out: str, tokenizer: str, inputs: list[str], encoder: str = "vae",
                       vae: Optional[str] = None, channels: int = 3, sizing: Sizing = Sizing(),
                       read: ReadOptions = ReadOptions(), clips: ClipPolicy = ClipPolicy(),
                       tasks: Optional[int] = None, task: Optional[int] = None,
                       batch: int = 32, workers: int = 2, max_bad_fraction: float = 0.01,
                       progress: bool = True) -> dict:
    """Extract this task's share of a webdataset, parquet or files source of images and videos
    (data_pipelines.ingest)."""
    task, tasks = task_split(tasks, task)
    tok = load_tokenizer(tokenizer)
    enc = build_encoder(encoder, vae, channels, device=task_device())
    block_side = math.isqrt(sizing.block_size) if sizing.layout == "acdit" and sizing.block_size else 1
    if block_side ** 2 != max(sizing.block_size, 1) and sizing.layout == "acdit":
        raise ValueError(f"--block-size {sizing.block_size}: an image block is a square s*s of latent tokens")
    policy = ResolutionPolicy(sizing.image_size, sizing.max_pixels, sizing.min_size,
                              enc.spatial_factor * sizing.patch_size * block_side)
    max_tokens = sizing.max_tokens or sizing.seq_len
    spec = LayoutSpec(mode=sizing.layout, patch_size=sizing.patch_size, block_size=sizing.block_size)
    if clips.clip_frames is None:  # 16, or the fewest above it a video VAE takes (17 for Wan)
        clips = dataclasses.replace(clips, clip_frames=frames_at_least(16, enc.temporal_factor, enc.frame_step))
    try:
        enc.latent_frames(clips.clip_frames)
    except ValueError as e:
        raise ValueError(f"--clip-frames: {e}") from None
    units = list_units(source, inputs)
    read_options = {k: v for k, v in vars(read).items() if v is not None and
                    (source == "parquet") == k.endswith("_column")}
    recipe = {"source": {"name": source, "input": list(inputs), **read_options}, "encoder": enc.describe(),
              "latent_channels": enc.channels, "tokenizer": _describe_tokenizer(tok),
              "resolution": {**policy.describe(), "patch_size": sizing.patch_size, "layout": sizing.layout,
                             "block_size": sizing.block_size, "max_tokens": max_tokens},
              "video": clips.describe(),
              "encoding": {"batch": batch}}  # a VAE's numbers may depend on the batch: a rerun must keep it
    prep = Preparation(policy, read, str(tok.path), enc.spatial_factor, enc.temporal_factor, spec, max_tokens, clips)
    return extract(out, units, prep, enc, recipe, task, tasks, units_digest(units), batch, workers,
                   max_bad_fraction, progress)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=sorted(SOURCES) + list(INGEST_SOURCES))
    p.add_argument("--input", nargs="*", default=None,
                   help="files/folders (text, jsonl); shards as a folder, files, {a..b} list, http(s) folder or "
                        "pipe: list (webdataset); tables (parquet)")
    p.add_argument("--num-samples", type=int, default=None, help="documents to write (default: source's)")
    p.add_argument("--crop", type=int, default=None, help="photos: crop size in pixels")
    p.add_argument("--frames", type=int, default=None, help="moving_digits: frames per video")
    p.add_argument("--max-chars", type=int, default=None, help="text: characters per document piece")
    p.add_argument("--skip", type=int, default=None, help="text: pieces to pass over first (a held-out split "
                                                           "after the pieces a training set took)")
    p.add_argument("--split", default=None, choices=sorted(DIGIT_SPLITS),
                   help="digits: all, train (0-1496) or heldout (the last 300, 1497-1796)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoder", default="pixels", choices=ENCODERS)
    p.add_argument("--vae", default=None, help="diffusers VAE folder (--encoder vae): AutoencoderKL, "
                                               "AutoencoderKLWan, AutoencoderKLLTXVideo or AutoencoderKLCogVideoX")
    p.add_argument("--channels", type=int, default=3, help="pixels: 1 (grey) or 3 (RGB)")
    p.add_argument("--tokenizer", required=True, help="tokenizer file: .model (data_pipelines.train_tokenizer) or a release's tokenizer.json")
    p.add_argument("--out", required=True)
    p.add_argument("--samples-per-shard", type=int, default=None,
                   help="built-in sources (default 256); webdataset/parquet write one shard per input unit")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("webdataset and parquet sources")
    g.add_argument("--caption-key", default=None, help="webdataset: caption from this field of KEY.json "
                                                        "(default: KEY.txt)")
    g.add_argument("--image-column", default="jpg", help="parquet: column of image bytes")
    g.add_argument("--caption-column", default="caption", help="parquet: column of captions")
    g.add_argument("--image-size", type=int, default=None, help="shorter side to S, center crop S x S")
    g.add_argument("--max-pixels", type=int, default=None,
                   help="keep the aspect ratio, scale down to at most N pixels, sides multiples of the encoder's "
                        "spatial factor x --patch-size")
    g.add_argument("--min-size", type=int, default=0, help="skip images whose shorter side is smaller")
    g.add_argument("--patch-size", type=int, default=2, help="the model's patch_size")
    g.add_argument("--layout", default="monoformer", choices=("monoformer", "acdit"),
                   help="the model's mode (acdit lays out each latent twice)")
    g.add_argument("--block-size", type=int, default=0,
                   help="acdit: the model's block_size (s*s tokens; sides become multiples of s patches)")
    g.add_argument("--seq-len", type=int, default=1024, help="the training data.seq_len")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="skip documents longer than this as laid out for training (default: --seq-len)")
    g.add_argument("--fps", type=float, default=None, help="videos (also jsonl): sample frames at this rate "
                                                           "(default: theirs)")
    g.add_argument("--clip-frames", type=int, default=None,
                   help="videos: frames per clip (default 16, or the fewest above it the VAE takes: 17 for Wan; "
                        "jsonl: the middle clip of a video file, default all frames)")
    g.add_argument("--clips-per-video", type=int, default=1,
                   help="videos: K clips evenly spaced (0: every non-overlapping clip)")
    g.add_argument("--tasks", type=int, default=None, help="split the input units over N tasks "
                                                            "(default: Slurm's or torchrun's, else 1)")
    g.add_argument("--task", type=int, default=None, help="this task, 0..N-1")
    g.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding and resizing")
    g.add_argument("--batch", type=int, default=32, help="images per encoder batch")
    g.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="stop with an error when more of the samples are skipped")
    return p


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if a.source in INGEST_SOURCES:
            return _main_ingest(a)
        if a.split is not None and a.source != "digits":
            raise ValueError(f"--split: the digits source's option, not {a.source}'s")
        options = {k: v for k, v in dict(input=a.input, num_samples=a.num_samples, crop=a.crop, frames=a.frames,
                                         max_chars=a.max_chars, skip=a.skip, split=a.split, seed=a.seed, fps=a.fps,
                                         clip_frames=a.clip_frames).items() if v is not None}
        m = write_shards(a.source, a.out, a.tokenizer, a.encoder, a.vae, a.channels, a.samples_per_shard or 256,
                         progress=not a.no_progress, **options)
    except (ValueError, FileNotFoundError, ExtractError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {m.num_samples} samples in {len(m.shards)} shards to {a.out} (fingerprint {m.fingerprint})")
    return 0


def _main_ingest(a) -> int:
    if a.samples_per_shard is not None:
        raise ValueError(f"--samples-per-shard: the {a.source} source writes one output shard per input unit")
    sizing = Sizing(a.image_size, a.max_pixels, a.min_size, a.patch_size, a.layout, a.block_size, a.seq_len,
                    a.max_tokens)
    read = ReadOptions(a.caption_key, a.image_column, a.caption_column)
    clips = ClipPolicy(a.fps, a.clip_frames, a.clips_per_video)
    r = write_media_shards(a.source, a.out, a.tokenizer, a.input or [], a.encoder, a.vae, a.channels, sizing,
                           read, clips, a.tasks, a.task, a.batch, a.workers, a.max_bad_fraction, not a.no_progress)
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(r["skipped"].items())) or "none"
    print(f"task done: {r['written']} samples written, skipped: {skipped} ({r['kept']} finished shards kept, "
          f"{r['redone']} written now)")
    m = r["manifest"]
    if m is None:
        print(f"other tasks are unfinished; when they are done: python -m data_pipelines.merge_shards {a.out}")
    else:
        print(f"wrote {m.num_samples} samples in {len(m.shards)} shards to {a.out} (fingerprint {m.fingerprint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
