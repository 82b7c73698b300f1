"""Sample text, images or video from a release folder or a training run, or caption images.

    python -m pretrain.sample --model RELEASE_OR_RUN_DIR --prompt "a handwritten digit 7" --out out.png \\
        [--kind image|video|text] [--n 16] [--steps 50] [--cfg 3.0] [--seed 0] [--sampler auto|ddim|dpm++|euler]
    python -m pretrain.sample --model RELEASE_OR_RUN_DIR --kind caption --image a.png [--image b.png ...] \\
        [--max-new-tokens 64] [--temperature 0] [--top-p 1]     # prints "FILE<tab>caption" per image

Images go to a PNG grid, video to an MP4 or animated GIF of grids (by --out's suffix), text to
stdout (and --out if given). A caption's image is read as the model's encoder takes it (grey or
RGB), resized to cover the training size and center-cropped, encoded, then captioned through the
KV cache (greedy at temperature 0). The latent size defaults to the one the model was trained on (--size
H W to change); --frames F asks for F video frames (as the VAE's rule takes them: 1 + 4k for Wan), more than
the model was trained on included: an ACDiT model then goes on block by block through a sliding
window of its KV cache (model.sample).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from data_pipelines.encoders import latent_frames
from model.generate import generate_text
from model.sample import SAMPLERS, check_prompts, sample_latents
from pretrain.images import VIDEO_SUFFIXES, decode, save_image_grid, save_video_grid
from pretrain.export.release import Loaded, load_for_sampling


class SampleError(ValueError):
    pass


def latent_shape(loaded: Loaded, kind: str, size=None, frames=None) -> list[int]:
    shapes = loaded.info.get("latent_shapes", {})
    if kind not in shapes:
        trained = ", ".join(["text"] + sorted(shapes)) if shapes else "unknown (no release.json)"
        raise SampleError(f"--kind {kind}: this model was not trained on {kind} (its data had: {trained})")
    shape = list(shapes[kind])
    if size:
        shape[-2:] = size
    if frames and kind == "video":
        encoder = loaded.info.get("encoder") or {}
        try:
            shape[1] = latent_frames(frames, encoder.get("temporal_factor", 1), encoder.get("frame_step", 0))
        except ValueError as e:
            raise SampleError(f"--frames: {e}") from None
    return shape


def tokenizer_of(loaded: Loaded):
    from data_pipelines.tokenizer import load_tokenizer
    if loaded.tokenizer is None:
        raise SampleError("no tokenizer found (no tokenizer.model or tokenizer.json in the release folder, no tokenizer path in "
                          "the run's shard manifests): pass --tokenizer")
    return load_tokenizer(loaded.tokenizer)


def sample_pixels(loaded: Loaded, prompts: list[str], per_prompt: int = 1, kind: str = "image", steps: int = 50,
                  cfg_scale: float = 3.0, seed: int = 0, sampler: str = "auto", size=None, frames=None,
                  progress: bool = True, encoder=None) -> torch.Tensor:
    """Decoded samples in [0, 1], `per_prompt` for each prompt, prompt-major: images (n, C, H, W),
    video (n, C, T, H, W). `encoder`: one already loaded (else built from the model's info)."""
    from data_pipelines.encoders import load_encoder
    tok = tokenizer_of(loaded)
    ids = [tok.encode(p) for p in prompts]
    shape = latent_shape(loaded, kind, size, frames)
    check_prompts(loaded.model, ids, shape)
    n = len(prompts) * per_prompt
    bar = tqdm(desc=f"sampling {n} {kind}", unit="step", disable=not progress)
    latents = sample_latents(loaded.model, [i for i in ids for _ in range(per_prompt)], shape, steps, cfg_scale,
                             sampler, seed, progress=bar.update)
    bar.close()
    return decode(encoder or load_encoder(loaded.info["encoder"]), latents)


def caption(loaded: Loaded, images: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
            top_p: float = 1.0, seed: int = 0) -> str:
    """One line per image file: its name as given, a tab, the caption."""
    import numpy as np
    from data_pipelines.encoders import load_encoder
    from pretrain.evaluation.captioning import caption_images, image_size, one_line, read_image
    if not images:
        raise SampleError("--kind caption: give the images to caption with --image FILE (repeatable)")
    encoder = load_encoder(loaded.info["encoder"]) if "image" in loaded.info.get("latent_shapes", {}) else None
    size = image_size(loaded.info, encoder)
    pixels = np.stack([read_image(path, size) for path in images])
    captions = caption_images(loaded, pixels, encoder, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, seed=seed)
    return "\n".join(f"{one_line(str(path))}\t{one_line(text)}" for path, text in zip(images, captions))


def sample(loaded: Loaded, prompt: str, kind: str, out: str | None, n: int = 16, steps: int = 50,
           cfg_scale: float = 3.0, seed: int = 0, sampler: str = "auto", size=None, frames=None,
           max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, progress: bool = True):
    if kind == "text":
        tok = tokenizer_of(loaded)
        new = generate_text(loaded.model, tok.encode(prompt), max_new_tokens, temperature, top_p, seed)
        text = prompt + tok.decode(new)
        if out:
            with open(out, "w") as f:
                f.write(text + "\n")
        return text
    if kind != "text" and not out:
        raise SampleError(f"--out is required for {kind}")
    if kind == "video" and Path(out).suffix.lower() not in VIDEO_SUFFIXES:
        raise SampleError(f"--out {out}: a video is written as {' or '.join(VIDEO_SUFFIXES)}")
    pixels = sample_pixels(loaded, [prompt], n, kind, steps, cfg_scale, seed, sampler, size, frames, progress)
    if kind == "video":
        return save_video_grid(pixels, out, fps=(loaded.info.get("video") or {}).get("fps") or 8)
    return save_image_grid(pixels, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="release folder, run directory or checkpoint folder")
    p.add_argument("--prompt", default="")
    p.add_argument("--out", default=None, help="output PNG (image), MP4 or GIF (video) or text file")
    p.add_argument("--kind", default="image", choices=["image", "video", "text", "caption"])
    p.add_argument("--image", action="append", default=[], help="caption: an image file to caption (repeatable)")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="auto", choices=SAMPLERS)
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="latent size")
    p.add_argument("--frames", type=int, default=None,
                   help="video: frames (default: as trained; a video VAE takes its rule's: Wan 1 + 4k, "
                        "CogVideoX 1 + 8k)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--raw", action="store_true", help="run directory: raw weights, not the EMA")
    p.add_argument("--tokenizer", default=None, help="tokenizer file, .model or .json (default: the model's own)")
    a = p.parse_args(argv)
    if a.kind in ("image", "video") and not a.out:
        p.error("--out is required for images and video")
    if a.image and a.kind != "caption":
        p.error(f"--image is what --kind caption reads; --kind {a.kind} samples from --prompt")
    try:
        loaded = load_for_sampling(a.model, "cuda" if torch.cuda.is_available() else "cpu", ema=not a.raw)
        if a.tokenizer:
            loaded.tokenizer = Path(a.tokenizer)
        if a.kind == "caption":
            result = caption(loaded, a.image, a.max_new_tokens, a.temperature, a.top_p, a.seed)
        else:
            result = sample(loaded, a.prompt, a.kind, a.out, a.n, a.steps, a.cfg, a.seed, a.sampler, a.size,
                            a.frames, a.max_new_tokens, a.temperature, a.top_p)
    except (SampleError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result if a.kind in ("text", "caption") else f"wrote {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
