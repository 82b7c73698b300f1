"""The Slurm history of a run: one line per start and end of each job (and each requeued restart
of it) in RUN_DIR/slurm/jobs.jsonl, written by rank 0 of the trainer whenever SLURM_JOB_ID is set.

    {"event": "start", "job": "41", "restart": 1, "step": 40, "nodes": "mfnode[1-2]", "ranks": 2, "time": ...}
    {"event": "end", "job": "41", "restart": 1, "step": 80, "reason": "signal SIGUSR2", "time": ...}

`python -m pretrain.summary RUN` shows it; `should_requeue` tells a batch script whether its
job stopped on a signal before the run's end (slurm/train.sbatch).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

HISTORY_FILE = "slurm/jobs.jsonl"
FINISHED = "finished"


def slurm_job() -> Optional[dict]:
    """This process's Slurm job (id, restart count, nodes), or None outside Slurm."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]
    return {"job": job, "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "nodes": os.environ.get("SLURM_JOB_NODELIST", "")}


def record(run_dir, event: str, step: int, **fields) -> None:
    """Append one event of this Slurm job to the run's history (nothing outside Slurm)."""
    job = slurm_job()
    if job is None:
        return
    path = Path(run_dir) / HISTORY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"event": event, "job": job["job"], "restart": job["restart"], "step": step, **fields,
             "time": round(time.time(), 3)}
    if event == "start":
        entry["nodes"] = job["nodes"]
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def read(run_dir) -> list[dict]:
    path = Path(run_dir) / HISTORY_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def attempts(run_dir) -> list[dict]:
    """One entry per (job, restart): its first and last step and why it ended ("running or killed"
    when no end was recorded: a SIGKILL, a node lost, or still running)."""
    out: dict = {}
    for e in read(run_dir):
        a = out.setdefault((e["job"], e["restart"]), {"job": e["job"], "restart": e["restart"], "from_step": e["step"],
                                                      "to_step": e["step"], "reason": "running or killed",
                                                      "nodes": e.get("nodes", "")})
        if e["event"] == "end":
            a.update(to_step=e["step"], reason=e["reason"])
    return list(out.values())


def describe(run_dir) -> list[str]:
    """Lines for pretrain.summary: each attempt of each job."""
    lines = []
    for a in attempts(run_dir):
        what = "first run" if a["restart"] == 0 else f"requeue {a['restart']}"
        lines.append(f"  job {a['job']:>8s} ({what}) on {a['nodes'] or '?'}: steps {a['from_step']} -> {a['to_step']}, "
                     f"{a['reason']}")
    return lines


def should_requeue(run_dir, max_requeues: int, requeue_signal: str = "SIGUSR1") -> tuple[str, str]:
    """("requeue" | "end" | "cap", why) for the job in this environment, from its last attempt:
    requeue when the batch script's time-limit signal stopped the run before its end ("cap" when
    the job was requeued `max_requeues` times already); any other end (finished, a SIGTERM from
    scancel, a failure) ends the job."""
    job = slurm_job()
    if job is None:
        return "end", "not in a Slurm job"
    mine = [a for a in attempts(run_dir) if (a["job"], a["restart"]) == (job["job"], job["restart"])]
    if not mine:
        return "end", "the trainer recorded no start for this job (it failed before training)"
    reason = mine[-1]["reason"]
    if requeue_signal not in reason.split(" ", 1)[-1].split("+"):
        return "end", f"the run ended: {reason}"
    if job["restart"] >= max_requeues:
        return "cap", f"stopped by {reason}, but requeued {job['restart']} times already (cap {max_requeues})"
    return "requeue", f"stopped by {reason} at step {mine[-1]['to_step']}: requeue {job['restart'] + 1} of {max_requeues}"
