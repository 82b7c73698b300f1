"""One task of a job started by `srun` from slurm/train.sbatch (plain sbatch, no submitit):

    srun python -m slurm.task train --config CONFIG [key=value ...]
    python -m slurm.task should-requeue --config CONFIG [key=value ...] [--max-requeues K]

`train` maps Slurm's environment to torch.distributed's as slurm.submit's jobs do (the master
is the job's first node, the port derived from the job id) and trains, resuming from `latest`;
SIGUSR1 (`#SBATCH --signal=USR1@90`) or SIGTERM makes it checkpoint and exit 0.
Slurm 22.05-23.02's srun does not pass --cpus-per-task on to the tasks: the script exports
SRUN_CPUS_PER_TASK.
`should-requeue` exits 0 when this job's run stopped on SIGUSR1 before its end and has requeues
left (the batch script then requeues it), 3 when the requeues are used up, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from model.config_system import ConfigError, load_config
from pretrain.process import run_and_exit


def export_distributed_environment() -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from Slurm's variables."""
    os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
    from submitit.helpers import TorchDistributedEnvironment
    from slurm.job import master_port
    os.environ["MASTER_PORT"] = str(master_port(os.environ["SLURM_JOB_ID"]))
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def main(argv=None) -> int:
    early = []  # a stop signal while starting (before the trainer's handlers): stop after the first step
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, _frame: early.append(signum))
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
        return run_training(["--config", args.config, "--resume", "auto", *args.overrides], early_signals=early).code
    from pretrain.config import ExperimentConfig
    from pretrain.job_history import should_requeue
    try:
        cfg = load_config(ExperimentConfig, args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    decision, why = should_requeue(cfg.run.dir, args.max_requeues)
    print(f"job {os.environ['SLURM_JOB_ID']}: {decision}: {why}")
    return {"requeue": 0, "end": 1, "cap": 3}[decision]


if __name__ == "__main__":
    run_and_exit(main)
