"""Submit a training run to Slurm through submitit: one task per GPU (or --tasks-per-node on CPU
nodes), checkpoint and requeue at the time limit, resume from `latest`.

    python -m slurm.submit --config configs/monoformer-1b.yaml run.dir=runs/mf1b \\
        --nodes 4 --gpus-per-node 8 --cpus-per-task 12 --partition gpu --time 24:00:00
    python -m slurm.submit --config configs/tiny-cpu.yaml --tasks-per-node 2 --partition debug \\
        --time 10 --sweep train.lr=1e-3,3e-4      # a job array, one run directory per value
    python -m slurm.submit ... --dry-run           # print the sbatch script, submit nothing

submitit's files and the tasks' logs go to RUN_DIR/slurm/submitit/.
"""
from __future__ import annotations

import argparse
import itertools
import re
import shlex
import sys
from pathlib import Path

from model.config_system import ConfigError, load_config
from pretrain.config import ExperimentConfig

SUBMITIT_DIR = "slurm/submitit"


def minutes(text: str) -> int:
    """Slurm's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> whole minutes (at least 1)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ValueError(f"--time: {text!r} is not a Slurm time (minutes, H:M:S or D-H:M:S)")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # M:S
        seconds = a * 60 + b
    else:
        seconds = a * 60
    return max(1, -(-seconds // 60))


def sweep_points(sweeps: list[str]) -> list[list[str]]:
    """["k=v1,v2", "j=a,b"] -> the overrides of each point of the grid (one run each)."""
    axes = []
    for s in sweeps:
        key, _, values = s.partition("=")
        if not key or not values:
            raise ValueError(f"--sweep: {s!r} is not key=v1,v2,...")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(p) for p in itertools.product(*axes)] if axes else [[]]


def point_name(point: list[str]) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9._=+-]", "-", p) for p in point)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML experiment config")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.dir=runs/x train.max_steps=1000")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task per GPU")
    p.add_argument("--tasks-per-node", type=int, default=0, help="tasks per node on CPU nodes (default 1)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--mem", default=None, help="memory per node, e.g. 64G")
    p.add_argument("--partition", required=True)
    p.add_argument("--time", required=True, help="time limit per job: minutes, H:M:S or D-H:M:S")
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--name", default=None, help="job name (default: the run directory's name)")
    p.add_argument("--max-requeues", type=int, default=3, help="requeues after a time limit or preemption")
    p.add_argument("--signal-delay", type=int, default=90,
                   help="seconds before the time limit that the checkpoint signal (USR2) is sent")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="one run per value (several --sweep: their grid), as a job array")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    return p


def make_executor(args, folder: Path, name: str, dry_run: bool):
    from submitit import SlurmExecutor

    class DryRunExecutor(SlurmExecutor):  # renders the script where there is no srun
        @classmethod
        def affinity(cls) -> int:
            return 1

    executor = (DryRunExecutor if dry_run else SlurmExecutor)(folder=folder, max_num_timeout=args.max_requeues,
                                                             python=f"{shlex.quote(sys.executable)} -m slurm.boot")
    tasks = args.gpus_per_node or args.tasks_per_node or 1
    params = dict(job_name=name, partition=args.partition, time=minutes(args.time), nodes=args.nodes,
                  ntasks_per_node=tasks, signal_delay_s=args.signal_delay, stderr_to_stdout=False,
                  srun_args=["--kill-on-bad-exit=1"], additional_parameters={"requeue": True})
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_task:  # Slurm 22.05-23.02: srun does not inherit it from the allocation
        params["srun_args"].append(f"--cpus-per-task={args.cpus_per_task}")
    for key in ("cpus_per_task", "mem", "account", "qos", "constraint"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    executor.update_parameters(**params)
    return executor


def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    from slurm.job import TrainJob
    try:
        base = load_config(ExperimentConfig, args.config, args.overrides)  # bad keys: an error before submitting
        points = sweep_points(args.sweep)
        runs = []
        for point in points:
            run_dir = Path(base.run.dir) / point_name(point) if args.sweep else Path(base.run.dir)
            overrides = [o for o in args.overrides if not o.startswith("run.dir=")]
            overrides += [*point, f"run.dir={run_dir.resolve()}"]
            load_config(ExperimentConfig, args.config, overrides)
            runs.append((run_dir.resolve(), overrides))
        if len({r for r, _ in runs}) < len(runs):
            raise ValueError(f"--sweep: values give the same run directory name: {[str(r) for r, _ in runs]}")
        if args.signal_delay + 30 >= minutes(args.time) * 60:  # Slurm checks every 30 s and signals that early
            raise ValueError(f"--signal-delay: {args.signal_delay} s + Slurm's 30 s check leave no time before "
                             f"the signal in a {args.time} job: give at least {args.signal_delay + 31} s")
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    root = Path(base.run.dir).resolve()
    name = args.name or root.name
    array = len(runs) > 1
    folder = root / SUBMITIT_DIR / "%j"  # an array task's %j is ARRAYID_INDEX
    config = str(Path(args.config).resolve())
    try:
        executor = make_executor(args, folder, name, args.dry_run)
    except (RuntimeError, ValueError) as e:  # no srun here, or a parameter submitit refuses
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(executor._make_submission_file_text(executor._submitit_command_str, "DRYRUN"))
        if array:
            print(f"# submitted as a job array of {len(runs)} tasks (--array=0-{len(runs) - 1})")
        for run_dir, overrides in runs:
            print(f"# would run: python -m pretrain.train --config {config} --resume auto {' '.join(overrides)}")
        return 0
    calls = [TrainJob(config, overrides, args.max_requeues) for _, overrides in runs]
    if not array:
        jobs = [executor.submit(calls[0])]
    else:
        with executor.batch():
            jobs = [executor.submit(c) for c in calls]
    for job, (run_dir, _) in zip(jobs, runs):
        print(f"submitted job {job.job_id}: run {run_dir}")
        print(f"  logs: {job.paths.stdout} / {job.paths.stderr} (one pair per task: _0_, _1_, ...)")
    ids = ",".join(sorted({j.job_id.split('_')[0] for j in jobs}))
    print(f"  watch: squeue -j {ids}    history: sacct -j {ids}    python -m pretrain.summary RUN_DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main())
