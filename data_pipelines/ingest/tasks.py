"""Which share of the input units this process extracts, and on which device.

Input unit u belongs to task u % tasks. The task comes from `--tasks N --task I`, else from the
launcher: a Slurm job array (SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT), Slurm tasks of one step
(SLURM_PROCID / SLURM_NTASKS), or torchrun (RANK / WORLD_SIZE); else the one task.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional


def task_split(tasks: Optional[int] = None, task: Optional[int] = None,
               environ: Optional[Mapping[str, str]] = None) -> tuple[int, int]:
    """(task, tasks) of this process; ValueError for an inconsistent pair."""
    env = os.environ if environ is None else environ
    if tasks is None and task is None:
        task, tasks = _from_launcher(env)
    elif tasks is None or task is None:
        raise ValueError("--tasks and --task: give both, or neither (taken from Slurm or torchrun)")
    if tasks < 1 or not 0 <= task < tasks:
        raise ValueError(f"--task {task} --tasks {tasks}: the task must be in 0..tasks-1")
    return task, tasks


def _from_launcher(env: Mapping[str, str]) -> tuple[int, int]:
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        step = int(env.get("SLURM_ARRAY_TASK_STEP", 1))
        return (int(env["SLURM_ARRAY_TASK_ID"]) - first) // step, int(env["SLURM_ARRAY_TASK_COUNT"])
    if int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    return 0, 1


def task_device(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """This task's GPU when there are GPUs (the local rank's, so tasks of one node share none), else None."""
    import torch
    if not torch.cuda.is_available():
        return None
    env = os.environ if environ is None else environ
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    return f"cuda:{local % torch.cuda.device_count()}"
