"""Training time lost per checkpoint save, blocking vs asynchronous (`checkpoint.async`), in one run.

    python bench/checkpoint_stall.py                 # 2 CPU ranks, ZeRO-1 and ZeRO-3, ~150M parameters, EMA on
    python bench/checkpoint_stall.py --stages 3 --dim 512 --layers 4 --saves 2   # a quick look

Each stage is one torchrun of 2 ranks training the real Trainer (DeepSpeed engine, packed loader,
EMA) on synthetic shards. Windows of `--steps-between` steps, `--saves` times each kind in turn:
no save, a blocking save first, an asynchronous save first. The loss of a save is the wall time
of its window (the save call, the steps, and the wait for a write still in flight: the next save
would wait for it) minus that of a window without a save (their median, the first left out); the
table shows the median loss of the saves after the first, their range, and the range of the plain
windows (on a shared 2-core machine single windows vary by seconds: use --saves 5 or more). The
first save of each kind is shown apart: an asynchronous one fills fresh snapshot buffers (page
faults), later ones reuse them. "writer cpu s" is the CPU time rank 0's writer process used for
one asynchronous save (median): what it takes from the cores training leaves idle (waits in the
collectives) or, where there are none, from training.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def worker(a) -> None:
    import torch
    from bench.train_step import write_synthetic_shards
    from data_pipelines.config import DataConfig, DatasetConfig
    from model.model_config import ModelConfig
    from pretrain.config import CheckpointConfig, ExperimentConfig, RunConfig, TrainConfig, WandbConfig
    from pretrain.distributed import init_distributed
    from pretrain.train import Trainer
    dist = init_distributed()
    tmp = Path(a.dir or tempfile.gettempdir()) / f"checkpoint_stall-{os.environ['MASTER_PORT']}"  # one for all ranks
    try:
        mc = ModelConfig(dim=a.dim, n_layers=a.layers, n_heads=a.dim // 64, vocab_size=2000, latent_channels=4,
                         patch_size=2, mode="monoformer")
        if dist.is_main:
            write_synthetic_shards(Path(tmp) / "shards", "monoformer", a.seq, 4, 2, mc.vocab_size)
        torch.distributed.barrier()
        cfg = ExperimentConfig(
            run=RunConfig(dir=str(Path(tmp) / "run")), model=mc,
            data=DataConfig(datasets=[DatasetConfig(path=str(Path(tmp) / "shards"))], seq_len=a.seq, num_workers=1,
                            caption_dropout=0.0, add_bos_eos=True),
            train=TrainConfig(zero_stage=a.stage, micro_batch_size=1, warmup_steps=0, max_steps=10 ** 6,
                              ema_decay=0.999),
            checkpoint=CheckpointConfig(keep=1), wandb=WandbConfig(mode="disabled"))
        trainer = Trainer(cfg, dist, resume="none")
        batches = iter(trainer.loader)

        def steps(n: int) -> float:
            start = time.perf_counter()
            for _ in range(n):
                trainer.train_step(batches)
            return time.perf_counter() - start

        def writer_cpu() -> float:
            """CPU seconds used so far by this rank's writer process (asynchronous files)."""
            process = trainer.checkpointer.writer.process
            if process is None or process.proc.poll() is not None:
                return 0.0
            fields = Path(f"/proc/{process.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        steps(2)
        rows = {"plain": [], "blocking": [], "async": []}
        for i in range(a.saves):  # the windows interleaved: the plain ones are the baseline of their time
            for mode in rows:
                trainer.checkpointer.writer.asynchronous = mode == "async"
                start, cpu = time.perf_counter(), writer_cpu()
                if mode != "plain":
                    trainer.save()
                call = time.perf_counter() - start
                steps(a.steps_between)
                trainer.checkpointer.settle()
                rows[mode].append({"call": call, "window": time.perf_counter() - start, "writer_cpu": writer_cpu() - cpu})
        windows = [x["window"] for x in rows.pop("plain")]
        plain = statistics.median(windows[1:] or windows)
        for mode in rows:
            for x in rows[mode]:
                x["lost"] = x["window"] - plain
        size = sum(f.stat().st_size for f in (Path(tmp) / "run" / "checkpoints").rglob("*") if f.is_file())
        if dist.is_main:
            print(json.dumps({"stage": a.stage, "params": trainer.num_params, "plain_step": plain / a.steps_between,
                              "plain_windows": windows,
                              "checkpoint_bytes": size, "rows": rows}), flush=True)
        del trainer
        torch.distributed.barrier()
    finally:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default="1,3")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--saves", type=int, default=5, help="saves of each kind")
    p.add_argument("--steps-between", type=int, default=4)
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: the temp folder)")
    p.add_argument("--stage", type=int, help=argparse.SUPPRESS)  # a rank of one stage's run
    a = p.parse_args()
    if "RANK" in os.environ:
        from pretrain.process import run_and_exit
        run_and_exit(lambda: worker(a))
    from pretrain.distributed import free_port
    print(f"{'ZeRO':>4s} {'params':>8s} {'ckpt GB':>8s} {'step s':>7s} {'mode':>9s} {'1st lost s':>10s} "
          f"{'lost s':>7s} {'range s':>13s} {'call s':>7s} {'writer cpu s':>12s} {'async/blocking':>15s}")
    for stage in a.stages.split(","):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), __file__, "--stage", stage, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            sys.exit(f"stage {stage} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
        r = json.loads(lines[-1])
        later = {m: [x["lost"] for x in rows[1:] or rows] for m, rows in r["rows"].items()}
        lost = {m: statistics.median(v) for m, v in later.items()}  # the median: single windows vary by seconds
        spread = f"{min(r['plain_windows']):.1f}-{max(r['plain_windows']):.1f}"
        cpu = statistics.median(x["writer_cpu"] for x in r["rows"]["async"][1:] or r["rows"]["async"])
        for mode, rows in r["rows"].items():
            ratio = f"{lost['async'] / lost['blocking']:.1%}" if mode == "async" else ""
            writer = f"{cpu:.2f}" if mode == "async" else ""
            print(f"{stage:>4s} {r['params'] / 1e6:7.0f}M {r['checkpoint_bytes'] / 1e9:8.2f} {r['plain_step']:7.2f} "
                  f"{mode:>9s} {rows[0]['lost']:10.2f} {lost[mode]:7.2f} "
                  f"{min(later[mode]):6.2f}-{max(later[mode]):<6.2f} "
                  f"{statistics.mean(x['call'] for x in rows[1:] or rows):7.2f} {writer:>12s} {ratio:>15s}",
                  flush=True)
        print(f"     plain windows of {a.steps_between} steps: {spread} s", flush=True)


if __name__ == "__main__":
    main()
