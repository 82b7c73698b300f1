"""Which share of the input units this process extracts, and on which device.

Input unit u belongs to task u % tasks. The task comes from `--tasks N --task I`, else from the
launcher: a Slurm job array (the task is SLURM_ARRAY_TASK_ID itself, and `--tasks N` is required:
an array resubmitted for a few failed indices must not change the split), Slurm tasks of one step
(SLURM_PROCID / SLURM_NTASKS), or torchrun (RANK / WORLD_SIZE); else the one task.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional


def task_split(tasks: Optional[int] = None, task: Optional[int] = None,
               environ: Optional[Mapping[str, str]] = None) -> tuple[int, int]:
    """(task, tasks) of this process; ValueError for a missing or inconsistent pair."""
    env = os.environ if environ is None else environ
    if task is None:
        if "SLURM_ARRAY_TASK_ID" in env:
            if tasks is None:
                raise ValueError("a Slurm job array: give --tasks N, the number of tasks of the whole extraction "
                                 "(array indices 0..N-1)")
            task = int(env["SLURM_ARRAY_TASK_ID"])
        elif int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env:
            task, tasks = int(env["SLURM_PROCID"]), tasks or int(env["SLURM_NTASKS"])
        elif "WORLD_SIZE" in env and "RANK" in env:
            task, tasks = int(env["RANK"]), tasks or int(env["WORLD_SIZE"])
        elif tasks is None:
            task, tasks = 0, 1
        else:
            raise ValueError("--tasks without --task: give --task I too (or launch under Slurm or torchrun)")
    elif tasks is None:
        raise ValueError("--task without --tasks: give --tasks N too")
    if tasks < 1 or not 0 <= task < tasks:
        raise ValueError(f"--task {task} --tasks {tasks}: the task must be in 0..tasks-1")
    return task, tasks


def task_device(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """This task's GPU when there are GPUs (the local rank's, so tasks of one node share none), else None."""
    import torch
    if not torch.cuda.is_available():
        return None
    env = os.environ if environ is None else environ
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    return f"cuda:{local % torch.cuda.device_count()}"
