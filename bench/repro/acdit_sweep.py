"""ACDiT at small scale: the same digits in acdit mode at block sizes 1, 4 and 16 (the whole latent).

    python bench/repro/acdit_sweep.py [--config configs/repro-acdit.yaml] [--blocks 1 4 16] [--per-digit 100]

One config, one switch (`model.block_size`): each block size is trained from scratch on
`--ranks` ranks, then `--per-digit` images of each digit are sampled block by block through
the KV cache and scored with the digit classifier (pretrain.quality). Sampling is timed apart:
after a warm-up sample, the median of `--repeats` samplings of one batch of `--time-batch` images.
Prints one table (accuracy, sampling time per image, training time) and writes
bench/repro/results/acdit.json and acdit_bs<B>.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, torchrun  # noqa: E402  (bench/repro/common.py)


def sampling_seconds(loaded, batch: int, steps: int, cfg_scale: float, repeats: int) -> float:
    """Median wall time of sampling `batch` images (a tenth of each digit's caption) after a warm-up
    sample that pays the imports, the allocator and the first KV-cache growth."""
    from pretrain.quality import digit_prompt
    from pretrain.sample import sample_pixels
    prompts = [digit_prompt(d) for d in range(10)]
    sample_pixels(loaded, prompts, 1, "image", 2, cfg_scale, progress=False)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        sample_pixels(loaded, prompts, max(1, batch // 10), "image", steps, cfg_scale, seed=i, progress=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tokens_per_image(loaded) -> int:
    _, h, w = loaded.info["latent_shapes"]["image"]
    return (h // loaded.model.cfg.patch_size) * (w // loaded.model.cfg.patch_size)


def main(argv=None) -> int:
    import torch
    from data_pipelines.demo_data import build
    from model.config_system import load_config
    from pretrain.config import ExperimentConfig
    from pretrain.quality import evaluate_digits
    from pretrain.export.release import load_for_sampling
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/repro-acdit.yaml")
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--per-digit", type=int, default=100)
    p.add_argument("--steps", type=int, default=25, help="sampling steps per block")
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--time-batch", type=int, default=100, help="images per timed sampling")
    p.add_argument("--repeats", type=int, default=3, help="timed samplings (the median is reported)")
    p.add_argument("--out", default="runs/repro/acdit")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    cfg = load_config(ExperimentConfig, REPO / a.config, a.overrides)
    build(REPO / Path(cfg.data.datasets[0].path).parent)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for block in a.blocks:
        run = REPO / a.out / f"block_size={block}"
        seconds = torchrun(a.ranks, a.config, run, a.overrides + [f"model.block_size={block}"])
        loaded = load_for_sampling(run, device)
        scores = evaluate_digits(loaded, a.per_digit, a.steps, a.cfg, out=RESULTS / f"acdit_bs{block}.png")
        timed = sampling_seconds(loaded, a.time_batch, a.steps, a.cfg, a.repeats)
        rows.append(dict(block_size=block, blocks_per_image=tokens_per_image(loaded) // block, train_seconds=seconds,
                         timed_batch=10 * max(1, a.time_batch // 10), timed_seconds=timed, **scores))
        print(f"block size {block}: {scores['digit_accuracy']:.1%}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "acdit.json").write_text(json.dumps({"config": a.config, "overrides": a.overrides, "device": device,
                                                    "rows": rows}, indent=2) + "\n")
    print(f"\n| block size | blocks per digit | digit accuracy | sampling ms per image (batch {rows[0]['timed_batch']}, "
          f"median of {a.repeats}) | train time |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['block_size']} | {r['blocks_per_image']} | {r['digit_accuracy']:.1%} | "
              f"{1000 * r['timed_seconds'] / r['timed_batch']:.1f} | {r['train_seconds']:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
