"""`python -m tests.peak_probe --config X.yaml --out DIR key=value ...` under torchrun: build the
trainer, take one step, then the last rank alone touches 512 MB more on its device (a rank busier than the rest),
and every rank builds the metrics record as the run does. Each rank writes DIR/rank{r}.json:
{"before_gb", "after_gb": its own high-water mark before and after the record, "record_gb": the record's
memory/peak_gb}."""
import argparse
import json
from pathlib import Path

import torch

from pretrain.metrics import peak_memory
from pretrain.process import run_and_exit
from pretrain.train import Trainer
from tests.launch import start_probe


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a, cfg, dist = start_probe(p, argv)
    trainer = Trainer(cfg, dist, "none")
    sums, counts = trainer.train_step(iter(trainer.loader))
    if dist.rank == dist.world_size - 1:
        torch.ones(2 ** 27, device=dist.device)  # 512 MB, every page written, then freed
    before = peak_memory(dist.device) / 1e9
    record = trainer.window_record([sums["lm_sum"], sums["diffusion_sum"]], counts, 1, 1.0, 1, None)
    out = {"before_gb": before, "after_gb": peak_memory(dist.device) / 1e9, "record_gb": record["memory/peak_gb"]}
    Path(a.out, f"rank{dist.rank}.json").write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    run_and_exit(main)
