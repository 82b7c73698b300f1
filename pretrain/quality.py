"""Generation quality: how recognisable sampled images are, for the trainer and the benchmarks.

    python -m pretrain.quality --model RUN_OR_RELEASE [--per-digit 10] [--steps 25] [--cfg 3] \\
        [--out digits.png]     # a grid with a row per digit, its .npz, and the accuracy per digit
    python -m pretrain.quality --model RUN_OR_RELEASE --task caption   # image-to-text on held-out digits
    python -m pretrain.quality --model RUN_OR_RELEASE --task both

`--task caption` captions the 300 held-out digits (scikit-learn's last 300, in no training set of the
demo; pretrain.evaluation.captioning) greedily and reports the share whose caption names the right digit.

A scorer's `score` takes the prompts it was asked for and the decoded samples (n, C, H, W in
[0, 1], `samples_per_prompt` per prompt, prompt-major) and returns a few numbers; its `check`
takes the prompts and the (C, H, W) of the images before any is sampled and raises ValueError
when it could not score them, so that a run stops at its start. `digits` is built in: an RBF support-vector classifier trained on real scikit-learn digits (8x8, 16 grey
levels), which says which digit each sample is; a sample counts as right when that is the
digit its caption names. `video_digits` scores moving digits (n, 1, T, H, W): the share of frames
whose 8x8 window around the centre of mass the same classifier reads as the captioned digit, and
how far the digit jumps between frames. Other datasets register a scorer in `SCORERS`.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from data_pipelines.sources import DIGIT_NAMES, digit_caption

HOLDOUT_FRACTION = 0.25  # of the real digits, kept out of the classifier's training to measure it


def digit_prompt(digit: int) -> str:
    """The caption the digits source gives a digit (data_pipelines.sources.digits)."""
    return digit_caption(digit)


def prompt_digit(prompt: str) -> int:
    """The digit a caption names (its last digit word), ValueError when it names none."""
    words = [w for w in prompt.lower().replace(",", " ").split() if w in DIGIT_NAMES]
    if not words:
        raise ValueError(f"prompt {prompt!r} names no digit ({', '.join(DIGIT_NAMES)})")
    return DIGIT_NAMES.index(words[-1])


class DigitClassifier:
    """SVC(gamma=0.001, C=10) on scikit-learn's digits, as in its classification example, trained on a
    stratified 75% of the 1,797 images; `holdout_accuracy` is its accuracy on the other 25%."""

    def __init__(self, seed: int = 0):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.svm import SVC
        data = load_digits()
        x_train, x_test, y_train, y_test = train_test_split(
            data.data, data.target, test_size=HOLDOUT_FRACTION, stratify=data.target, random_state=seed)
        self.svc = SVC(gamma=0.001, C=10.0).fit(x_train, y_train)
        self.holdout_accuracy = float((self.svc.predict(x_test) == y_test).mean())

    def predict(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """Digits (n,) of images (n, 1, 8, 8) or (n, 8, 8) in [0, 1]."""
        x = torch.as_tensor(images).float().reshape(len(images), -1)
        if x.shape[1] != 64:
            raise ValueError(f"images: digits are 8x8 grey, got {tuple(images.shape[1:])}")
        return self.svc.predict((x.clamp(0, 1) * 16.0).numpy())


@functools.lru_cache(maxsize=1)
def digit_classifier() -> DigitClassifier:
    return DigitClassifier()


def score_digits(prompts: Sequence[str], images: torch.Tensor, samples_per_prompt: int) -> dict:
    """{digit_accuracy, digit_accuracy_<d> for each digit asked for}: the fraction of samples the
    classifier reads as the digit their prompt names."""
    wanted = np.repeat([prompt_digit(p) for p in prompts], samples_per_prompt)
    got = digit_classifier().predict(images)
    right = got == wanted
    out = {"digit_accuracy": float(right.mean())}
    for d in sorted(set(wanted.tolist())):
        out[f"digit_accuracy_{d}"] = float(right[wanted == d].mean())
    return out


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of a and b."""
    return np.sqrt(np.clip((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0, None))


def _mean_pairwise(x: np.ndarray) -> float:
    return float(_distances(x, x).sum() / max(1, len(x) * (len(x) - 1)))


def digit_spread(images: torch.Tensor | np.ndarray, wanted: np.ndarray) -> dict:
    """Whether samples are varied digits rather than one mode or copies of the training set: the mean
    pixel distance between two samples of the same digit (against the same for real digits), and
    from each sample to its nearest real digit (against a real digit's distance to its nearest other),
    and the share of samples nearer to a real digit than 95% of real digits are to their nearest other
    (about 5% for samples as new as real digits; copies raise it)."""
    from sklearn.datasets import load_digits
    data = load_digits()
    real = data.images.reshape(len(data.images), -1) / 16.0
    x = torch.as_tensor(images).float().reshape(len(images), -1).clamp(0, 1).numpy()
    nearest = _distances(x, real).min(1)
    real_nearest = _distances(real[:200], real)
    real_nearest[np.arange(200), np.arange(200)] = np.inf
    real_nearest = real_nearest.min(1)
    digits = sorted(set(np.asarray(wanted).tolist()))
    return {"within_digit_distance": float(np.mean([_mean_pairwise(x[wanted == d]) for d in digits])),
            "real_within_digit_distance": float(np.mean([_mean_pairwise(real[data.target == d][:100])
                                                         for d in digits])),
            "nearest_real_distance": float(nearest.mean()),
            "real_nearest_other_distance": float(real_nearest.mean()),
            "near_copy_share": float((nearest < np.percentile(real_nearest, 5)).mean())}


def check_digits(prompts: Sequence[str], image_shape: Sequence[int]) -> None:
    """ValueError unless every prompt names a digit and the images are 8x8 grey, as the classifier's."""
    for prompt in prompts:
        prompt_digit(prompt)
    if tuple(image_shape) != (1, 8, 8):
        raise ValueError(f"digits scorer: images must be 1x8x8 (grey 8x8 digits), the data's are "
                         f"{'x'.join(map(str, image_shape))}")


JUMP_LIMIT = 4.0  # pixels between frames: moving_digits moves a digit 1 or 2 pixels a frame on each axis


def centres(clips: np.ndarray) -> np.ndarray:
    """Centre of mass (y, x) of every frame: clips (n, T, H, W) -> (n, T, 2)."""
    n, t, h, w = clips.shape
    mass = clips.reshape(n, t, -1).sum(-1).clip(min=1e-6)
    ys, xs = np.arange(h)[:, None], np.arange(w)[None, :]
    return np.stack([(clips * ys).sum((2, 3)) / mass, (clips * xs).sum((2, 3)) / mass], axis=-1)


def motion(clips: np.ndarray, captions: Sequence[str]) -> dict:
    """Jumps of the centre of mass between frames (mean, max, share over JUMP_LIMIT: a digit that
    teleports), and whether the first move goes the way the caption says ("moving down and left")."""
    c = centres(clips)
    jumps = np.linalg.norm(np.diff(c, axis=1), axis=-1)
    first = c[:, 1] - c[:, 0]
    want = np.array([[1 if "down" in p else -1, 1 if "right" in p else -1] for p in captions])
    return {"mean_jump": float(jumps.mean()), "max_jump": float(jumps.max()),
            "jumps_over_limit": float((jumps > JUMP_LIMIT).mean()),
            "first_move_as_captioned": float((np.sign(first) == want).all(-1).mean())}


def frame_digits_read(clips: np.ndarray) -> np.ndarray:
    """The digit the classifier reads in each frame (n, T): the 8x8 window around its centre of mass."""
    n, t, h, w = clips.shape
    corner = np.clip(np.rint(centres(clips) - 3.5).astype(int), 0, [h - 8, w - 8])
    windows = np.stack([clips[i, f, y:y + 8, x:x + 8] for i in range(n) for f in range(t)
                        for y, x in [corner[i, f]]])
    return digit_classifier().predict(windows).reshape(n, t)


def frame_digit_accuracy(clips: np.ndarray, captions: Sequence[str]) -> float:
    """Share of frames read as the digit their clip's caption names."""
    return float((frame_digits_read(clips) == np.array([prompt_digit(c) for c in captions])[:, None]).mean())


def score_video_digits(prompts: Sequence[str], videos: torch.Tensor, samples_per_prompt: int) -> dict:
    """{video_digit_accuracy (frames read as the captioned digit), video_mean_jump,
    video_jumps_over_limit}: moving digits, videos n,1,T,H,W."""
    clips = torch.as_tensor(videos).float()[:, 0].numpy()
    captions = [p for p in prompts for _ in range(samples_per_prompt)]
    m = motion(clips, captions)
    return {"video_digit_accuracy": frame_digit_accuracy(clips, captions), "video_mean_jump": m["mean_jump"],
            "video_jumps_over_limit": m["jumps_over_limit"]}


def check_video_digits(prompts: Sequence[str], video_shape: Sequence[int]) -> None:
    for prompt in prompts:
        prompt_digit(prompt)
    if len(video_shape) != 4 or video_shape[0] != 1 or min(video_shape[2:]) < 8 or video_shape[1] < 2:
        raise ValueError(f"video_digits scorer: videos must be 1xTxHxW grey, T >= 2, H and W >= 8 (moving digits); "
                         f"the data's are {'x'.join(map(str, video_shape))}")


@dataclass(frozen=True)
class Scorer:
    score: Callable[[Sequence[str], torch.Tensor, int], dict]
    check: Callable[[Sequence[str], Sequence[int]], None]


SCORERS: dict[str, Scorer] = {"digits": Scorer(score_digits, check_digits),
                               "video_digits": Scorer(score_video_digits, check_video_digits)}


def get_scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise ValueError(f"sample_quality: {name!r} is not one of {'|'.join(SCORERS)}")
    return SCORERS[name]


def evaluate_digits(loaded, per_digit: int = 10, steps: int = 25, cfg_scale: float = 3.0, seed: int = 0,
                    sampler: str = "auto", out: Optional[Path] = None, progress: bool = False) -> dict:
    """Sample `per_digit` images of each digit from a loaded model (pretrain.export.release.load_for_sampling),
    score them; with `out`, write the grid (a row per digit) and `out`.npz (images in [0, 1], the
    digit asked for, the digit read). Returns the scores, the classifier's own held-out accuracy and
    the sampling time."""
    from pretrain.images import save_image_grid
    from pretrain.sample import sample_pixels
    prompts = [digit_prompt(d) for d in range(10)]
    start = time.time()
    pixels = sample_pixels(loaded, prompts, per_digit, "image", steps, cfg_scale, seed, sampler, progress=progress)
    seconds = time.time() - start
    result = dict(score_digits(prompts, pixels, per_digit), samples=len(pixels), sampling_seconds=seconds,
                  classifier_holdout_accuracy=digit_classifier().holdout_accuracy,
                  **digit_spread(pixels, np.repeat(np.arange(10), per_digit)))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        save_image_grid(pixels, out, cols=per_digit)
        np.savez_compressed(Path(out).with_suffix(".npz"), images=pixels[:, 0].numpy(),
                            wanted=np.repeat(np.arange(10), per_digit), read=digit_classifier().predict(pixels))
    return result


def format_digit_scores(result: dict) -> str:
    per = " ".join(f"{d}:{result[f'digit_accuracy_{d}']:.0%}" for d in range(10))
    return (f"{result['digit_accuracy']:.1%} of {result['samples']} samples read as the digit asked for "
            f"(classifier: {result['classifier_holdout_accuracy']:.1%} on held-out real digits)\n  per digit {per}\n"
            f"  spread: two samples of a digit {result['within_digit_distance']:.2f} apart (real digits "
            f"{result['real_within_digit_distance']:.2f}); a sample {result['nearest_real_distance']:.2f} from its "
            f"nearest real digit (a real digit from its nearest other: {result['real_nearest_other_distance']:.2f}); "
            f"{result['near_copy_share']:.1%} nearer than 95% of real digits to their nearest other")


def main(argv=None) -> int:
    from pretrain.export.release import load_for_sampling
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="release folder, run directory or checkpoint folder")
    p.add_argument("--task", default="image", choices=("image", "caption", "both"),
                   help="image: draw each digit and read it back; caption: caption the held-out digits; both")
    p.add_argument("--per-digit", type=int, default=10)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="auto")
    p.add_argument("--raw", action="store_true", help="run directory: raw weights, not the EMA")
    p.add_argument("--out", default=None, help="PNG grid (a row per digit); the samples go to the same name .npz")
    p.add_argument("--json", default=None, help="write the scores here too")
    a = p.parse_args(argv)
    result: dict = {}
    try:
        loaded = load_for_sampling(a.model, ema=not a.raw)
        if a.task in ("image", "both"):
            result = evaluate_digits(loaded, a.per_digit, a.steps, a.cfg, a.seed, a.sampler,
                                     Path(a.out) if a.out else None, progress=True)
            print(("text-to-image: " if a.task == "both" else "") + format_digit_scores(result))
            if a.out:
                print(f"wrote {a.out} and {Path(a.out).with_suffix('.npz')}")
        if a.task in ("caption", "both"):
            from pretrain.evaluation.captioning import evaluate_heldout_captions
            captions = evaluate_heldout_captions(loaded, seed=a.seed)
            print(format_caption_scores(captions))
            result.update(captions)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def format_caption_scores(result: dict) -> str:
    examples = "; ".join(f"{ref.split()[-1]} -> {got!r}" for ref, got in result["examples"][:3])
    return (f"image-to-text: {result['caption_accuracy']:.1%} of the {result['captions']} held-out digits captioned "
            f"with the right digit (greedy; e.g. {examples})")


if __name__ == "__main__":
    sys.exit(main())
