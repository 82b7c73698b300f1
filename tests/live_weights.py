"""`python -m tests.live_weights --config X.yaml key=value ...` under torchrun: train as pretrain.train
does, then save what the trainer holds at its end (rank 0): RUN_DIR/live.pt = {"weights": the fp32
master weights, "ema": the EMA (or None)}, gathered from the live engine (DeepSpeed's
safe_get_full_fp32_param), not read from a checkpoint. The release tests compare against it."""
import argparse
from pathlib import Path

import torch

from pretrain.ema import full_fp32_state
from pretrain.process import run_and_exit
from pretrain.train import Trainer
from tests.launch import start_probe


def main(argv=None) -> int:
    _, cfg, dist = start_probe(argparse.ArgumentParser(), argv)
    trainer = Trainer(cfg, dist, "none")
    trainer.run()
    weights = full_fp32_state(trainer.engine, keep=dist.is_main)
    ema = trainer.ema.full_state(trainer.engine, keep=dist.is_main) if trainer.ema is not None else None
    if dist.is_main:
        torch.save({"weights": weights, "ema": ema}, Path(cfg.run.dir) / "live.pt")
    return 0


if __name__ == "__main__":
    run_and_exit(main)
