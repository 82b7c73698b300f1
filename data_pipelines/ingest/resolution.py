"""What size an image is encoded at: decode its bytes, then one resolution policy.

* `image_size=S`: the shorter side resized to S, then a center crop to S x S.
* `max_pixels=N`: the aspect ratio kept, scaled down (never up) to at most N pixels, each side
  rounded down to a multiple of `multiple` (the encoder's spatial factor x the model's patch size,
  x the side of an ACDiT block) by a center crop after the resize; a side shorter than `multiple`
  is raised to it (use `min_size` to skip such images instead).
* neither: the native size, center-cropped to multiples of `multiple`.

Images with a side below `min_size` are skipped (`Skip("too_small")`), as are bytes PIL cannot
decode (`Skip("undecodable")`). The policy is recorded in the shard manifest (`describe()`).
"""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np


ORIENTATION = 0x0112  # the EXIF tag


class Skip(Exception):
    """A source sample that is not written: `reason` is the manifest's `skipped` key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ResolutionPolicy:
    image_size: Optional[int] = None  # shorter side -> S, center crop S x S
    max_pixels: Optional[int] = None  # keep the aspect ratio, at most this many pixels
    min_size: int = 0                 # skip images whose shorter side is smaller
    multiple: int = 1                 # every side a multiple of this (spatial factor x patch size)

    def __post_init__(self):
        if self.image_size is not None and self.max_pixels is not None:
            raise ValueError("resolution: give --image-size or --max-pixels, not both")
        if self.multiple < 1:
            raise ValueError(f"resolution: multiple must be >= 1, got {self.multiple}")
        if self.image_size is not None and (self.image_size <= 0 or self.image_size % self.multiple):
            raise ValueError(f"--image-size {self.image_size}: must be a positive multiple of {self.multiple} "
                             "(the encoder's spatial factor x --patch-size)")
        if self.max_pixels is not None and self.max_pixels < self.multiple ** 2:
            raise ValueError(f"--max-pixels {self.max_pixels}: below one {self.multiple}x{self.multiple} patch")

    def describe(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) an image of this size is encoded at."""
        m = self.multiple
        if self.image_size is not None:
            return self.image_size, self.image_size
        scale = 1.0
        if self.max_pixels is not None and width * height > self.max_pixels:
            scale = math.sqrt(self.max_pixels / (width * height))
        w, h = (max(m, int(side * scale) // m * m) for side in (width, height))
        if self.max_pixels is not None and w * h > self.max_pixels:  # a thin image's short side was raised to m
            if w >= h:
                w = max(m, self.max_pixels // h // m * m)
            else:
                h = max(m, self.max_pixels // w // m * m)
        return w, h

    def apply(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> H,W,3 uint8 at the policy's size (Skip for undecodable or too small)."""
        from PIL import Image
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(data))
                width, height = im.size
                if im.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8):  # stored turned by 90 degrees
                    width, height = height, width
                if min(width, height) < max(self.min_size, 1):
                    raise Skip("too_small", f"{width}x{height} below --min-size {self.min_size}")
                w, h = self.target_size(width, height)
                scale = max(w / width, h / height)  # cover the target, then crop the excess
                if scale < 1:  # JPEG: decode at a fraction of the size
                    im.draft("RGB", (math.ceil(im.width * scale), math.ceil(im.height * scale)))
                im = as_viewed(im, "RGB")
                return np.array(resize_cover(im, w, h))  # a writable copy (torch refuses read-only arrays)
        except Skip:
            raise
        except Exception as e:  # PIL raises many types for bad bytes (OSError, SyntaxError, bomb, ...)
            raise Skip("undecodable", f"{type(e).__name__}: {e}") from None


def as_viewed(im, mode: str = "RGB"):
    """A PIL image as a viewer shows it, in `mode` ("RGB" or "L"): turned by its EXIF orientation; a
    16-bit or wider grey image scaled to 8 bits by its range (PIL's own convert would clip it at 255);
    an alpha channel dropped."""
    from PIL import Image, ImageOps
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        x = np.asarray(im, np.float32)
        full = 65535.0 if im.mode != "F" else (1.0 if x.max() <= 1.0 else 255.0)
        im = Image.fromarray(((x / full).clip(0, 1) * 255).round().astype(np.uint8))
    return im.convert(mode)


def resize_cover(im, w: int, h: int):
    """Resize a PIL image to cover w x h (aspect kept), then center-crop to exactly w x h."""
    from PIL import Image
    scale = max(w / im.width, h / im.height)
    rw, rh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
    if (rw, rh) != im.size:
        im = im.resize((rw, rh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (rw - w) // 2, (rh - h) // 2
    return im.crop((left, top, left + w, top + h))
