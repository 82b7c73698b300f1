"""What the repro scripts share: where results go, training a config from scratch, reading metrics."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the scripts run as files: the project's packages from this checkout
RESULTS = REPO / "bench" / "repro" / "results"


def torchrun(ranks: int, config: str, run_dir: Path, overrides: list[str], reuse: bool = False) -> float:
    """Train from scratch in an emptied `run_dir`; returns the wall time in seconds. With `reuse`, a
    run directory whose run finished is kept (its recorded time returned)."""
    done = run_dir / "train_seconds.txt"
    if reuse and done.is_file():
        return float(done.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)  # metrics.jsonl appends: no records of an earlier run
    run_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "-m", "pretrain.train",
           "--config", config, "--resume", "none", f"run.dir={run_dir}", *overrides]
    start = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    seconds = time.time() - start
    done.write_text(f"{seconds:.1f}\n")
    return seconds


def last_record(run_dir: Path, key: str) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if key in r][-1]
