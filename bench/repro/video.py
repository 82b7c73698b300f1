"""ACDiT video at small scale: moving digits generated frame block by frame block with the KV cache.

    python bench/repro/video.py [--config configs/repro-video.yaml] [--ranks 2] [--clips 4] [--long-frames 24]
                                [key=value ...]

1. writes `moving_digits` shards (one digit bouncing on a 16x16 canvas) into each of the config's
   data sets named `moving-digits-Nf` that is missing: N frames a clip (`--videos` clips; a set of
   1-frame stills gets `--stills`);
2. trains `configs/repro-video.yaml` (acdit, one frame per block) on `--ranks` ranks;
3. samples `--clips` clips for each of 8 captions (digits x directions), saves them as a GIF grid
   (a row per caption);
4. the motion check: the centre of mass of each frame, the jump between frames (mean, and the
   share over 4 pixels: a digit that teleports), and whether the first move goes the way the
   caption says, for the samples and for real clips of the same source;
5. the long horizon: `--long-frames` frames from the same captions, past the model's context
   (model.sample's sliding window), scored per frame index against real clips of that length.

Writes bench/repro/results/video.json, video.gif and video_long.gif and prints tables.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, torchrun  # noqa: E402  (bench/repro/common.py)

from pretrain.quality import JUMP_LIMIT, frame_digit_accuracy, motion  # noqa: E402

CLIP = dict(canvas=16, max_digits=1)
PROMPTS = [f"digit {d} moving {v} and {h}" for d, v, h in (
    ("zero", "down", "right"), ("one", "up", "left"), ("two", "down", "left"), ("three", "up", "right"),
    ("four", "down", "right"), ("five", "up", "left"), ("seven", "down", "left"), ("eight", "up", "right"))]


def real_clips(n: int, frames: int, seed: int = 1) -> tuple[np.ndarray, list[str]]:
    from data_pipelines.sources import moving_digits
    docs = list(moving_digits(num_samples=n, frames=frames, seed=seed, **CLIP))
    return np.stack([d[1]["video"][..., 0] for d in docs]), [d[0]["text"] for d in docs]


def main(argv=None) -> int:
    import torch
    from data_pipelines.demo_data import build
    from data_pipelines.write_shards import write_shards
    from model.config_system import load_config
    from pretrain.config import ExperimentConfig
    from pretrain.images import save_video_grid
    from pretrain.export.release import load_for_sampling
    from pretrain.sample import sample_pixels
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/repro-video.yaml")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--clips", type=int, default=4, help="clips per caption")
    p.add_argument("--steps", type=int, default=25, help="sampling steps per frame")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--videos", type=int, default=4000, help="training clips to write")
    p.add_argument("--stills", type=int, default=8000, help="1-frame clips to write (a moving-digits-1f set)")
    p.add_argument("--long-frames", type=int, default=24, help="frames of the long-horizon samples (0: none)")
    p.add_argument("--out", default="runs/repro/video")
    p.add_argument("--reuse", action="store_true", help="keep a finished run in --out")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    cfg = load_config(ExperimentConfig, REPO / a.config, a.overrides)
    info = build(REPO / "runs/demo/data")
    for dataset in cfg.data.datasets:
        folder = REPO / dataset.path
        named = re.fullmatch(r"moving-digits-(\d+)f", folder.name)
        if named and not (folder / "manifest.json").is_file():
            frames = int(named.group(1))
            write_shards("moving_digits", str(folder), str(info["tokenizer"]), encoder="pixels", channels=1,
                         samples_per_shard=256, num_samples=a.stills if frames == 1 else a.videos, frames=frames,
                         seed=frames, **CLIP)
    run = REPO / a.out
    seconds = torchrun(a.ranks, a.config, run, a.overrides, a.reuse)
    loaded = load_for_sampling(run, "cuda" if torch.cuda.is_available() else "cpu")
    start = time.time()
    pixels = sample_pixels(loaded, PROMPTS, a.clips, "video", a.steps, a.cfg, progress=False)  # n, C, T, H, W
    sampling = time.time() - start
    RESULTS.mkdir(parents=True, exist_ok=True)
    save_video_grid(pixels, RESULTS / "video.gif", cols=a.clips)
    captions = [q for q in PROMPTS for _ in range(a.clips)]
    generated = motion(pixels[:, 0].numpy(), captions)
    generated["frame_digit_accuracy"] = frame_digit_accuracy(pixels[:, 0].numpy(), captions)
    reference = real_clips(200, pixels.shape[2])
    real = motion(*reference)
    real["frame_digit_accuracy"] = frame_digit_accuracy(*reference)
    result = {"config": a.config, "overrides": a.overrides, "train_seconds": seconds, "sampling_seconds": sampling,
              "clips": len(pixels), "generated": generated, "real": real}
    (RESULTS / "video.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n| clips | mean jump (px) | max jump | jumps > {JUMP_LIMIT:g} px | first move as captioned | "
          f"frames read as the digit |\n|---|---|---|---|---|---|")
    for name, m in (("generated", generated), ("real (200)", real)):
        print(f"| {name} | {m['mean_jump']:.2f} | {m['max_jump']:.2f} | {m['jumps_over_limit']:.1%} | "
              f"{m['first_move_as_captioned']:.1%} | {m['frame_digit_accuracy']:.1%} |")
    print(f"\ntrain {seconds:.0f} s, sampling {sampling:.0f} s for {len(pixels)} clips; wrote {RESULTS / 'video.gif'}")
    if a.long_frames:
        result["long"] = long_horizon(loaded, a, captions)
        (RESULTS / "video.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


def per_frame(clips, captions) -> dict:
    """Digit accuracy and centre-of-mass jump (into the frame) at each frame index."""
    from pretrain.quality import centres, frame_digits_read, prompt_digit
    read = frame_digits_read(clips) == np.array([prompt_digit(c) for c in captions])[:, None]
    jumps = np.linalg.norm(np.diff(centres(clips), axis=1), axis=-1)
    return {"digit_accuracy": read.mean(0).tolist(), "jump": [0.0] + jumps.mean(0).tolist(),
            "jumps_over_limit": [0.0] + (jumps > JUMP_LIMIT).mean(0).tolist()}


def long_horizon(loaded, a, captions) -> dict:
    """`--long-frames` frames from a model trained on shorter clips: the drift over the horizon."""
    from model.sample import window_shape
    from model.special_tokens import BOS
    from pretrain.images import save_video_grid
    from pretrain.sample import latent_shape, sample_pixels, tokenizer_of
    shape = latent_shape(loaded, "video", frames=a.long_frames)
    tok = tokenizer_of(loaded)
    window = window_shape(loaded.model, [[BOS] + tok.encode(p) for p in PROMPTS], shape)[1]
    start = time.time()
    pixels = sample_pixels(loaded, PROMPTS, a.clips, "video", a.steps, a.cfg, frames=a.long_frames, progress=False)
    seconds = time.time() - start
    save_video_grid(pixels, RESULTS / "video_long.gif", cols=a.clips)
    generated = dict(motion(pixels[:, 0].numpy(), captions), **per_frame(pixels[:, 0].numpy(), captions))
    reference = real_clips(200, a.long_frames)
    real = dict(motion(*reference), **per_frame(*reference))
    print(f"\nlong horizon: {a.long_frames} frames, window {window} frames (model.max_seq_len "
          f"{loaded.model.cfg.max_seq_len}), {seconds:.0f} s\n\n| frames | read as the digit (generated / real) | "
          f"mean jump px (generated / real) | jumps > {JUMP_LIMIT:g} px (generated) |\n|---|---|---|---|")
    for lo in range(0, a.long_frames, max(1, window)):
        span = slice(lo, min(lo + max(1, window), a.long_frames))
        moves = slice(max(span.start, 1), span.stop)  # a jump is into a frame: none into the first

        def mean(m: dict, key: str, s: slice) -> float:
            return float(np.mean(m[key][s]))
        print(f"| {span.start + 1}-{span.stop} | {mean(generated, 'digit_accuracy', span):.1%} / "
              f"{mean(real, 'digit_accuracy', span):.1%} | {mean(generated, 'jump', moves):.2f} / "
              f"{mean(real, 'jump', moves):.2f} | {mean(generated, 'jumps_over_limit', moves):.1%} |")
    return {"frames": a.long_frames, "window_frames": window, "sampling_seconds": seconds,
            "generated": generated, "real": real}


if __name__ == "__main__":
    sys.exit(main())
