"""Encode a source's documents once, offline, into WebDataset tar shards plus a manifest.

    python -m data_pipelines.write_shards --source digits --encoder pixels \\
        --tokenizer tok.model --out shards/digits --samples-per-shard 256
    python -m data_pipelines.write_shards --source jsonl --input docs.jsonl --encoder vae --vae my_vae/ ...

Text is stored as token ids, images and videos as latents (`.npy`, float16).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from itertools import islice
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from data_pipelines.encoders import ENCODERS, build_encoder, encode_video
from data_pipelines.shards import Manifest, ShardSetWriter
from data_pipelines.sources import SOURCES, get_source
from data_pipelines.tokenizer import Tokenizer


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
            lat = latents[(d, s)] if kind == "image" else encode_video(encoder, seg["video"])
            name = f"lat{len(arrays)}.npy"
            arrays[name] = lat
            segments.append({"latent": name, "kind": kind, "shape": list(lat.shape)})
        out.append(({"segments": segments}, arrays))
    return out


def write_shards(source: str, out: str, tokenizer: str, encoder: str = "pixels", vae: str | None = None,
                 channels: int = 3, samples_per_shard: int = 256, batch: int = 64, progress: bool = True,
                 **source_options) -> Manifest:
    """Write `source`'s documents as shards under `out`; returns the manifest."""
    tok = Tokenizer(tokenizer)
    enc = build_encoder(encoder, vae, channels)
    docs = get_source(source)(**source_options)
    writer = ShardSetWriter(out, samples_per_shard)
    total = source_options.get("num_samples") or (1797 if source == "digits" else None)
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
                        tokenizer={"fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size,
                                   "path": str(tok.path.resolve())})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=sorted(SOURCES))
    p.add_argument("--input", nargs="*", default=None, help="files/folders (text, jsonl sources)")
    p.add_argument("--num-samples", type=int, default=None, help="documents to write (default: source's)")
    p.add_argument("--crop", type=int, default=None, help="photos: crop size in pixels")
    p.add_argument("--frames", type=int, default=None, help="moving_digits: frames per video")
    p.add_argument("--max-chars", type=int, default=None, help="text: characters per document piece")
    p.add_argument("--skip", type=int, default=None, help="text: pieces to pass over first (a held-out split "
                                                           "after the pieces a training set took)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoder", default="pixels", choices=ENCODERS)
    p.add_argument("--vae", default=None, help="diffusers AutoencoderKL folder (--encoder vae)")
    p.add_argument("--channels", type=int, default=3, help="pixels: 1 (grey) or 3 (RGB)")
    p.add_argument("--tokenizer", required=True, help="tokenizer .model (data_pipelines.train_tokenizer)")
    p.add_argument("--out", required=True)
    p.add_argument("--samples-per-shard", type=int, default=256)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    options = {k: v for k, v in dict(input=a.input, num_samples=a.num_samples, crop=a.crop, frames=a.frames,
                                     max_chars=a.max_chars, skip=a.skip, seed=a.seed).items() if v is not None}
    try:
        m = write_shards(a.source, a.out, a.tokenizer, a.encoder, a.vae, a.channels, a.samples_per_shard,
                         progress=not a.no_progress, **options)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {m.num_samples} samples in {len(m.shards)} shards to {a.out} (fingerprint {m.fingerprint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
