"""The planner against real 2-rank CPU runs: checkpoint bytes on disk and peak resident memory.

    python bench/plan_check.py [--data DIR] [--steps 12] [--sizes tiny,tiny-ckpt,100m] [--stages 1,3]

For each model size and ZeRO stage, `pretrain.train` runs on 2 CPU ranks (torchrun, gloo, a DataLoader
worker per rank, the demo's digits + text at 0.6 / 0.4 by document, no evaluation) for --steps steps and
saves a checkpoint; so does a no-model baseline (the same run with a model of dim 8, one layer). The
memory compared is the busiest rank's `memory/peak_gb` (VmHWM) above the baseline's, against
`pretrain.plan`'s peak for the configured stage above the plan of the baseline. Each run is made twice:
with glibc's malloc as it comes, whose heap keeps freed activations (fragmented, not given back), and
with MALLOC_MMAP_THRESHOLD_=131072, which hands every tensor of 128 KiB or more back when it is freed,
so that the resident set is what the tensors hold (what a GPU's caching allocator holds, near enough).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.config_system import load_config  # noqa: E402
from pretrain.config import ExperimentConfig  # noqa: E402
from pretrain.distributed import free_port  # noqa: E402
from pretrain.plan.cli import plan  # noqa: E402

SIZES = {"tiny": [], "tiny-ckpt": ["train.activation_checkpointing=true"],
         "100m": ["model.dim=768", "model.n_layers=12", "model.n_heads=12", "train.micro_batch_size=2"],
         "baseline": ["model.dim=8", "model.n_layers=1", "model.n_heads=1"]}
ALLOCATORS = {"glibc": {}, "mmap>=128K": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def write_config(data: Path, out: Path) -> Path:
    """configs/tiny-cpu.yaml on the demo data in `data`, both modalities in most batches, no evaluation."""
    text = (REPO / "configs/tiny-cpu.yaml").read_text().replace("runs/demo/data", str(data))
    text = text.replace("weight: 0.99,", "weight: 0.6,").replace("weight: 0.01}", "weight: 0.4}")
    out.write_text(text)
    return out


def train(config: Path, run_dir: Path, overrides: list, extra_env: dict) -> dict:
    """The last logged record of a 2-rank run."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true", PYTHONPATH=str(REPO), **extra_env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "pretrain.train", "--config", str(config), f"run.dir={run_dir}", "wandb.mode=disabled", *overrides]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"training failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in records if "memory/peak_gb" in x][-1]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None) -> int:
    a = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--data", default="", help="demo data (python -m data_pipelines.demo_data); default: built here")
    a.add_argument("--steps", type=int, default=12)
    a.add_argument("--sizes", default="tiny,tiny-ckpt,100m")
    a.add_argument("--stages", default="1,3")
    args = a.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="plan_check_"))
    data = Path(args.data) if args.data else tmp / "data"
    if not args.data:
        subprocess.run([sys.executable, "-m", "data_pipelines.demo_data", "--out", str(data)], cwd=REPO, check=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    config = write_config(data, tmp / "tiny.yaml")
    common = [f"train.max_steps={args.steps}", f"train.log_interval={args.steps}", "train.eval_interval=0",
              f"checkpoint.interval={args.steps}"]
    print("size      ZeRO allocator    params  plan peak MB  measured MB  ratio   plan ckpt MB  real ckpt MB  ratio   "
          "run s")
    for stage in map(int, args.stages.split(",")):
        def planned(size):
            cfg = load_config(ExperimentConfig, config, [*common, f"train.zero_stage={stage}", *SIZES[size]])
            return plan(cfg, 1, 2, "cpu", 2.0)
        base_plan = planned("baseline")["memory"][str(stage)]["total"]
        base = {name: train(config, tmp / f"base{stage}-{name}", [*common, f"train.zero_stage={stage}",
                                                                 *SIZES["baseline"]], env)["memory/peak_gb"]
                for name, env in ALLOCATORS.items()}
        for size in args.sizes.split(","):
            p = planned(size)
            want = (p["memory"][str(stage)]["total"] - base_plan) / 1e6
            for name, env in ALLOCATORS.items():
                run_dir = tmp / f"{size}{stage}-{name}"
                start = time.time()
                got = (train(config, run_dir, [*common, f"train.zero_stage={stage}", *SIZES[size]], env)
                       ["memory/peak_gb"] - base[name]) * 1e3
                real = folder_bytes(run_dir / f"checkpoints/step_{args.steps:08d}") / 1e6
                print(f"{size:9s} {stage:4d} {name:10s} {p['parameters'] / 1e6:8.1f}M {want:12.1f} {got:12.1f} "
                      f"{want / got:6.2f} {p['checkpoint_total'] / 1e6:13.1f} {real:13.1f} "
                      f"{p['checkpoint_total'] / 1e6 / real:6.3f} {time.time() - start:7.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
