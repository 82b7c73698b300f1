"""ACDiT video at small scale: moving digits generated frame block by frame block with the KV cache.

    python bench/repro/video.py [--config configs/repro-video.yaml] [--ranks 2] [--clips 4] [key=value ...]

1. writes `moving_digits` shards (one digit bouncing on a 16x16 canvas, `--frames` frames) into the
   config's first data set if missing;
2. trains `configs/repro-video.yaml` (acdit, one frame per block) on `--ranks` ranks;
3. samples `--clips` clips for each of 8 captions (digits x directions), saves them as a GIF grid
   (a row per caption);
4. the motion check: the centre of mass of each frame, the jump between frames (mean, and the
   share over 4 pixels: a digit that teleports), and whether the first move goes the way the
   caption says, for the samples and for real clips of the same source.

Writes bench/repro/results/video.json and video.gif and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, torchrun  # noqa: E402  (bench/repro/common.py)

CLIP = dict(canvas=16, max_digits=1)
PROMPTS = [f"digit {d} moving {v} and {h}" for d, v, h in (
    ("zero", "down", "right"), ("one", "up", "left"), ("two", "down", "left"), ("three", "up", "right"),
    ("four", "down", "right"), ("five", "up", "left"), ("seven", "down", "left"), ("eight", "up", "right"))]
JUMP_LIMIT = 4.0  # pixels between frames: the source moves a digit 1 or 2 pixels a frame on each axis


def centres(clips: np.ndarray) -> np.ndarray:
    """Centre of mass (y, x) of every frame: clips (n, T, H, W) -> (n, T, 2)."""
    n, t, h, w = clips.shape
    mass = clips.reshape(n, t, -1).sum(-1).clip(min=1e-6)
    ys, xs = np.arange(h)[:, None], np.arange(w)[None, :]
    return np.stack([(clips * ys).sum((2, 3)) / mass, (clips * xs).sum((2, 3)) / mass], axis=-1)


def motion(clips: np.ndarray, captions: list[str]) -> dict:
    """Jumps of the centre of mass between frames, and whether the first move follows the caption."""
    c = centres(clips)
    jumps = np.linalg.norm(np.diff(c, axis=1), axis=-1)
    first = c[:, 1] - c[:, 0]
    want = np.array([[1 if "down" in p else -1, 1 if "right" in p else -1] for p in captions])
    return {"mean_jump": float(jumps.mean()), "max_jump": float(jumps.max()),
            "jumps_over_limit": float((jumps > JUMP_LIMIT).mean()),
            "first_move_as_captioned": float((np.sign(first) == want).all(-1).mean())}


def frame_digit_accuracy(clips: np.ndarray, captions: list[str]) -> float:
    """Share of frames whose 8x8 window around the centre of mass the digit classifier reads as the
    digit the caption names (pretrain.quality)."""
    from pretrain.quality import digit_classifier, prompt_digit
    n, t, h, w = clips.shape
    corner = np.clip(np.rint(centres(clips) - 3.5).astype(int), 0, [h - 8, w - 8])
    windows = np.stack([clips[i, f, y:y + 8, x:x + 8] for i in range(n) for f in range(t)
                        for y, x in [corner[i, f]]])
    wanted = np.repeat([prompt_digit(c) for c in captions], t)
    return float((digit_classifier().predict(windows) == wanted).mean())


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
    from pretrain.release import load_for_sampling
    from pretrain.sample import sample_pixels
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/repro-video.yaml")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--clips", type=int, default=4, help="clips per caption")
    p.add_argument("--steps", type=int, default=25, help="sampling steps per frame")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--videos", type=int, default=4000, help="training clips to write")
    p.add_argument("--frames", type=int, default=6, help="frames per training clip (when writing them)")
    p.add_argument("--out", default="runs/repro/video")
    p.add_argument("--reuse", action="store_true", help="keep a finished run in --out")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    cfg = load_config(ExperimentConfig, REPO / a.config, a.overrides)
    video = REPO / cfg.data.datasets[0].path
    info = build(video.parent)
    if not (video / "manifest.json").is_file():
        write_shards("moving_digits", str(video), str(info["tokenizer"]), encoder="pixels", channels=1,
                     samples_per_shard=256, num_samples=a.videos, frames=a.frames, **CLIP)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
