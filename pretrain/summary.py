"""Where a run's outputs are and how its losses went.

    python -m pretrain.summary RUN_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from pretrain import job_history
from pretrain.checkpoint import CONFIG_FILE, list_checkpoints, read_latest, run_checkpoints


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
            seen = [r for r in losses if key in r]  # a modality absent from a window is absent from its record
            if seen:
                lines.append(f"  {key:15s} {seen[0][key]:.4f} (step {seen[0]['step']}) -> {seen[-1][key]:.4f} "
                             f"(step {seen[-1]['step']})")
        lines.append(f"  tokens/s        {last['tokens_per_s']:.0f}")
    for r in records:  # evaluations: held-out losses and the quality of the samples
        shown = {k: v for k, v in r.items() if k.startswith(("eval/", "sample/")) and not k[-1].isdigit()}
        if shown:
            lines.append(f"  evaluation at step {r['step']}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    lines += mixture_lines(records, run_config(run_dir))
    if (run_dir / "samples").is_dir():
        lines.append(f"sample grids:  {run_dir / 'samples'} ({len(list((run_dir / 'samples').glob('*.png')))})")
    root = run_checkpoints(run_dir)
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


def run_config(run_dir: Path) -> Optional[dict]:
    """The experiment config of a run's latest checkpoint (None without one)."""
    root = run_checkpoints(run_dir)
    tag = read_latest(root)
    path = root / tag / CONFIG_FILE if tag else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def mixture_lines(records: list[dict], config: Optional[dict]) -> list[str]:
    """Per (re)start and schedule phase in it, each dataset's target share (the mean of its normalised
    weight over the phase's steps) and the share it got, from the ledger the trainer logs: of loss
    tokens (data.mix_by tokens) or of documents. Each (re)start's record of its mixture (`MIXTURE`)
    gives its config; records before the first (older runs) take `config` (the latest checkpoint's)."""
    from pretrain.metrics import MIXTURE
    segments, data, rows = [], (config or {}).get("data"), []
    for r in records:
        if MIXTURE in r:
            segments.append((data, rows, r["step"]))  # (a later start cuts off what its attempt redoes)
            data, rows = r[MIXTURE], []
        rows.append(r)
    segments.append((data, rows, None))
    lines = [line for data, rows, cut in segments if data for line in _phase_lines(rows, data, cut)]
    return ["data mixture (target / realised share):"] + lines if lines else []


def _phase_lines(records: list[dict], data: dict, cut: Optional[int]) -> list[str]:
    from data_pipelines.config import DataConfig
    from data_pipelines.mixture import weights_at
    from model.config_system import ConfigError
    from pretrain.metrics import MIXTURE
    try:
        cfg = DataConfig.from_dict(data)
    except (ConfigError, TypeError, ValueError):  # a config this version cannot read: no mixture lines
        return []
    unit = "tokens" if cfg.mix_by == "tokens" else "documents"
    names = [d.name for d in cfg.datasets]
    logged = [r for r in records if all(f"data/{n}/{unit}" in r for n in names) and (cut is None or r["step"] <= cut)]
    if not logged:
        return []
    first, last = (0 if MIXTURE not in records[0] else logged[0]["step"]), logged[-1]["step"]
    cuts = sorted({first, *(p.step for p in cfg.schedule if first < p.step < last), last})
    lines = []
    for a, b in zip(cuts, cuts[1:]):
        start = next((r for r in reversed(logged) if r["step"] <= a), None)
        end = next(r for r in reversed(logged) if r["step"] <= b)
        got = [end[f"data/{n}/{unit}"] - (start[f"data/{n}/{unit}"] if start else 0) for n in names]
        steps = range(start["step"] if start else 0, end["step"])
        if not steps or not sum(got):
            continue
        targets = [sum(weights_at(cfg, s)[d] / sum(weights_at(cfg, s)) for s in steps) / len(steps)
                   for d in range(len(names))]
        lines.append(f"  steps {steps.start}-{steps.stop} ({unit}): " + ", ".join(
            f"{n} {t:.3f} / {g / sum(got):.3f}" for n, t, g in zip(names, targets, got)))
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(summarize(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
