"""Where a run's outputs are and how its losses went.

    python -m pretrain.summary RUN_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pretrain import job_history
from pretrain.checkpoint import list_checkpoints, read_latest


def summarize(run_dir: Path) -> str:
    lines = [f"run directory: {run_dir}"]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    losses = [r for r in records if "loss" in r]
    if losses:
        first, last = losses[0], losses[-1]
        lines.append(f"metrics:       {run_dir / 'metrics.jsonl'} ({len(records)} records, steps "
                     f"{first['step']}..{last['step']})")
        for key in ("loss", "lm_loss", "diffusion_loss"):
            lines.append(f"  {key:15s} {first[key]:.4f} (step {first['step']}) -> {last[key]:.4f} (step {last['step']})")
        lines.append(f"  tokens/s        {last['tokens_per_s']:.0f}")
    root = run_dir / "checkpoints"
    lines.append(f"checkpoints:   {root} latest={read_latest(root)} all={list_checkpoints(root)}")
    jobs = job_history.describe(run_dir)
    if jobs:
        requeues = sum(1 for a in job_history.attempts(run_dir) if a["restart"] > 0)
        lines.append(f"slurm jobs:    {run_dir / job_history.HISTORY_FILE} ({requeues} requeue(s))")
        lines += jobs
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*")) + sorted((run_dir / "wandb").glob("run-*"))
    for w in wandb_runs:
        lines.append(f"wandb run:     {w}" + ("  (upload: wandb sync " + str(w) + ")" if "offline" in w.name else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(summarize(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
