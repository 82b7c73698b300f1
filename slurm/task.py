"""One task of a job started by `srun` from slurm/train.sbatch (plain sbatch, no submitit):

    srun python -m slurm.task train --config CONFIG [key=value ...]
    python -m slurm.task should-requeue --config CONFIG [key=value ...] [--max-requeues K]

`train` maps Slurm's environment to torch.distributed's as slurm.submit's jobs do (the master
is the job's first node, the port derived from the job id) and trains, resuming from `latest`;
SIGUSR1 (`#SBATCH --signal=USR1@90`) or SIGTERM makes it checkpoint and exit 0.
`should-requeue` exits 0 when this job's run stopped on such a signal before its end and has
requeues left, so that the batch script requeues it.
"""
from __future__ import annotations

import argparse
import os
import sys

from model.config import ConfigError, load_config


def export_distributed_environment() -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from Slurm's variables."""
    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
    from submitit.helpers import TorchDistributedEnvironment
    from slurm.job import master_port
    os.environ["MASTER_PORT"] = str(master_port(os.environ["SLURM_JOB_ID"]))
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("train", "should-requeue"))
    p.add_argument("--config", required=True)
    p.add_argument("--max-requeues", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    if "SLURM_JOB_ID" not in os.environ:
        print("error: not inside a Slurm job (SLURM_JOB_ID unset)", file=sys.stderr)
        return 2
    if args.action == "train":
        from pretrain.train import run_training
        export_distributed_environment()
        return run_training(["--config", args.config, "--resume", "auto", *args.overrides]).code
    from pretrain.config import ExperimentConfig
    from pretrain.job_history import should_requeue
    try:
        cfg = load_config(ExperimentConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    requeue, why = should_requeue(cfg.run.dir, args.max_requeues)
    print(f"job {os.environ['SLURM_JOB_ID']}: {'requeue' if requeue else 'no requeue'}: {why}")
    return 0 if requeue else 1


if __name__ == "__main__":
    sys.exit(main())
