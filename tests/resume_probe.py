"""`python -m tests.resume_probe --config X.yaml --resume PATH --out FILE key=value ...` under torchrun:
resume as pretrain.train does (any world size, direct or universal), take no step, and save on rank 0
what the live engine then holds, gathered through DeepSpeed's public safe_get_full_* calls: {"weights",
"ema", "exp_avg", "exp_avg_sq": {name: fp32 tensor}, "groups": [the optimizer's hyperparameters per
group], "notes": the trainer's resume notes}. Tests compare it across world sizes and resume paths."""
import argparse

import torch

from pretrain.ema import full_fp32_state
from pretrain.engine import torch_optimizer
from pretrain.process import run_and_exit
from pretrain.train import Trainer
from tests.launch import start_probe


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--resume", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--moments", action="store_true", help="also the Adam moments (ZeRO-3: DeepSpeed links them "
                                                          "for ZeRO-1/2 only once a step was taken)")
    a, cfg, dist = start_probe(p, argv)
    trainer = Trainer(cfg, dist, a.resume)
    notes = trainer.resume()
    from deepspeed.utils import safe_get_full_optimizer_state
    engine, keep = trainer.engine, dist.is_main
    moments = {key: {} for key in ("exp_avg", "exp_avg_sq")} if a.moments else {}
    for name, param in engine.module.named_parameters():
        for key in moments:
            full = safe_get_full_optimizer_state(param, key)
            if keep:
                moments[key][name] = full.detach().float().cpu().clone()
    out = {"weights": full_fp32_state(engine, keep), **moments, "notes": notes,
           "ema": trainer.ema.full_state(engine, keep) if trainer.ema is not None else None,
           "groups": [{k: g[k] for k in ("lr", "weight_decay", "betas", "eps")}
                      for g in torch_optimizer(engine).param_groups],
           "step": trainer.step}
    if keep:
        torch.save(out, a.out)
    return 0


if __name__ == "__main__":
    run_and_exit(main)
