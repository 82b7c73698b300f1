"""`python -m tests.live_weights --config X.yaml key=value ...` under torchrun: train as pretrain.train
does, then save what the trainer holds at its end (rank 0): RUN_DIR/live.pt = {"weights": the fp32
master weights, "ema": the EMA (or None)}, gathered from the live engine (DeepSpeed's
safe_get_full_fp32_param), not read from a checkpoint. The release tests compare against it."""
import argparse
from pathlib import Path

import torch

from model.config_system import load_config
from pretrain.config import ExperimentConfig
from pretrain.distributed import init_distributed
from pretrain.ema import full_fp32_state
from pretrain.process import run_and_exit
from pretrain.train import Trainer


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    cfg = load_config(ExperimentConfig, a.config, a.overrides)
    dist = init_distributed()
    trainer = Trainer(cfg, dist, "none")
    trainer.run()
    weights = full_fp32_state(trainer.engine, keep=dist.is_main)
    ema = trainer.ema.full_state(trainer.engine, keep=dist.is_main) if trainer.ema is not None else None
    if dist.is_main:
        torch.save({"weights": weights, "ema": ema}, Path(cfg.run.dir) / "live.pt")
    return 0


if __name__ == "__main__":
    run_and_exit(main)
