"""Image-to-text: captions of images from the same model, and how often they are right.

An image is sized to the training resolution, encoded by the model's own encoder (the one in its
shard manifests or release) and captioned through the KV cache (`model.generate.caption_latents`),
laid out as image-first training documents are. A judge says whether a caption is right against a
reference: `digits` (it names the reference's digit), `exact` (the same text).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from data_pipelines.sources import digit_caption, digit_split
from model.generate import caption_latents

CAPTION_BATCH = 64  # images captioned together


def names_same_digit(caption: str, reference: str) -> bool:
    """The caption names one digit, the one the reference names (a caption naming none, or several
    different ones, is wrong)."""
    from data_pipelines.sources import DIGIT_NAMES
    from pretrain.quality import prompt_digit
    wanted = prompt_digit(reference)  # a ValueError: a reference this judge cannot judge
    named = {w for w in caption.lower().replace(",", " ").split() if w in DIGIT_NAMES}
    return named == {DIGIT_NAMES[wanted]}


def same_text(caption: str, reference: str) -> bool:
    return caption.strip() == reference.strip()


CAPTION_JUDGES: dict[str, Callable[[str, str], bool]] = {"digits": names_same_digit, "exact": same_text}


def get_judge(name: str) -> Callable[[str, str], bool]:
    if name not in CAPTION_JUDGES:
        raise ValueError(f"caption judge: {name!r} is not one of {'|'.join(CAPTION_JUDGES)}")
    return CAPTION_JUDGES[name]


def image_size(info: dict, encoder) -> tuple[int, int, int]:
    """(channels, height, width) in pixels of the images the model was trained on."""
    shapes = info.get("latent_shapes") or {}
    if "image" not in shapes:
        trained = ", ".join(["text"] + sorted(shapes)) if shapes else "unknown (no release.json)"
        raise ValueError(f"captions: this model was not trained on images (its data had: {trained})")
    return tuple(encoder.pixel_shape(shapes["image"]))


def read_image(path: str | Path, size: tuple[int, int, int]) -> np.ndarray:
    """An image file as H,W,C in [0, 1] at the training size (c, h, w), as a viewer shows it
    (ingest.resolution.as_viewed: EXIF turn, 16-bit grey by its range, alpha dropped), grey or RGB as
    the encoder takes it, resized to cover h x w and center-cropped. Pixel values are not changed
    otherwise: a model trained on bright digits on black reads a black-on-white drawing inverted."""
    from PIL import Image
    from data_pipelines.ingest.resolution import as_viewed, resize_cover
    c, h, w = size
    with Image.open(path) as im:
        im = resize_cover(as_viewed(im, "L" if c == 1 else "RGB"), w, h)
        x = np.asarray(im, dtype=np.float32) / 255.0
    return x[..., None] if x.ndim == 2 else x


def one_line(text: str) -> str:
    """A caption as one line of a tab-separated listing: backslash, newline and tab escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def caption_latent_batches(loaded, latents: Sequence[torch.Tensor], max_new_tokens: int = 16,
                           temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Captions (text) of latents (each C, H, W or C, T, H, W), in order: those of one shape run
    together, `CAPTION_BATCH` at a time."""
    from pretrain.sample import tokenizer_of
    tok = tokenizer_of(loaded)
    out: list[str] = [""] * len(latents)
    by_shape: dict[tuple, list[int]] = {}
    for i, lat in enumerate(latents):
        by_shape.setdefault(tuple(lat.shape), []).append(i)
    for rows in by_shape.values():
        for a in range(0, len(rows), CAPTION_BATCH):
            part = rows[a:a + CAPTION_BATCH]
            ids = caption_latents(loaded.model, torch.stack([latents[i] for i in part]), max_new_tokens, temperature,
                                  top_p, seeds=[seed + i for i in part])
            for i, x in zip(part, ids):
                out[i] = tok.decode(x)
    return out


def caption_images(loaded, images: np.ndarray, encoder=None, **kw) -> list[str]:
    """Captions of images (n, H, W, C in [0, 1], at the training size) through the model's encoder."""
    from data_pipelines.encoders import load_encoder
    encoder = encoder or load_encoder(loaded.info["encoder"])
    latents = torch.from_numpy(np.asarray(encoder.encode_images(images), np.float32))
    return caption_latent_batches(loaded, list(latents), **kw)


def heldout_digits() -> tuple[np.ndarray, list[str]]:
    """The held-out digits (scikit-learn's last 300, in no training set of the demo) as (n, 8, 8, 1)
    in [0, 1], with their captions."""
    from sklearn.datasets import load_digits
    data = load_digits()
    idx = np.asarray(digit_split("heldout"))
    return (data.images[idx] / 16.0)[..., None].astype(np.float32), [digit_caption(t) for t in data.target[idx]]


def score_captions(captions: Sequence[str], references: Sequence[str], judge: str = "digits") -> dict:
    """{caption_accuracy: the share judged right, captions: how many}."""
    right = [get_judge(judge)(c, r) for c, r in zip(captions, references)]
    return {"caption_accuracy": float(np.mean(right)) if right else 0.0, "captions": len(right)}


def evaluate_heldout_captions(loaded, max_new_tokens: int = 16, seed: int = 0) -> dict:
    """Greedy captions of the 300 held-out digits, scored by the digit they name; adds a few examples."""
    from data_pipelines.encoders import load_encoder
    images, references = heldout_digits()
    trained_on_images = "image" in (loaded.info.get("latent_shapes") or {})
    encoder = load_encoder(loaded.info["encoder"]) if trained_on_images else None
    size = image_size(loaded.info, encoder)  # a ValueError naming what it was trained on, without images
    if size[1:] != (8, 8):
        raise ValueError(f"--task caption: the held-out digits are 8x8, this model was trained on "
                         f"{size[1]}x{size[2]} images")
    captions = caption_images(loaded, images, encoder, max_new_tokens=max_new_tokens, seed=seed)
    result = score_captions(captions, references, "digits")
    result["examples"] = [[r, c] for r, c in list(zip(references, captions))[:5]]
    return result


def caption_set(paths: Sequence[str], limit: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """(latents, caption token ids) of the first `limit` samples of shard sets, in stored order, whose
    first segments are a caption and the image it describes (sets without images are not read)."""
    from data_pipelines.shards import iter_shard_documents, load_manifest
    latents, captions = [], []
    for path in paths:
        if "image" not in load_manifest(path).latent_shapes:
            continue
        for _, segments in iter_shard_documents(path):
            if len(segments) >= 2 and "tokens" in segments[0] and segments[1].get("kind") == "image":
                latents.append(torch.from_numpy(segments[1]["latent"]).float())
                captions.append(list(segments[0]["tokens"]))
                if len(latents) >= limit:
                    return latents, captions
    return latents, captions
