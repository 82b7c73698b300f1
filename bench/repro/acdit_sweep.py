"""ACDiT at small scale: the same digits in acdit mode at block sizes 1, 4 and 16 (the whole latent).

    python bench/repro/acdit_sweep.py [--config configs/repro-acdit.yaml] [--blocks 1 4 16] [--per-digit 100]

One config, one switch (`model.block_size`): each block size is trained from scratch on
`--ranks` ranks, then `--per-digit` images of each digit are sampled block by block through
the KV cache and scored with the digit classifier (pretrain.quality). Prints one table
(accuracy, sampling time per image, training time) and writes
bench/repro/results/acdit.json and acdit_bs<B>.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import RESULTS, torchrun  # noqa: E402  (bench/repro/digits.py)


def main(argv=None) -> int:
    import torch
    from data_pipelines.demo_data import build
    from model.config import load_config
    from pretrain.config import ExperimentConfig
    from pretrain.quality import evaluate_digits
    from pretrain.release import load_for_sampling
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/repro-acdit.yaml")
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--per-digit", type=int, default=100)
    p.add_argument("--steps", type=int, default=25, help="sampling steps per block")
    p.add_argument("--cfg", type=float, default=3.0)
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
        scores = evaluate_digits(load_for_sampling(run, device), a.per_digit, a.steps, a.cfg,
                                 out=RESULTS / f"acdit_bs{block}.png")
        rows.append(dict(block_size=block, train_seconds=seconds, **scores))
        print(f"block size {block}: {scores['digit_accuracy']:.1%}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "acdit.json").write_text(json.dumps({"config": a.config, "overrides": a.overrides, "device": device,
                                                    "rows": rows}, indent=2) + "\n")
    print("\n| block size | blocks per digit | digit accuracy | sampling ms per image | train time |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['block_size']} | {16 // r['block_size']} | {r['digit_accuracy']:.1%} | "
              f"{1000 * r['sampling_seconds'] / r['samples']:.1f} | {r['train_seconds']:.0f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
