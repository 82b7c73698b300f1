"""Peak memory of `to-release` against the checkpoint's size (issue 13).

    python bench/convert_memory.py [--dim 1024] [--layers 8] [--vocab 32000] [--max-shard-size 100MB]

1. trains one step of a model of a few hundred MB on 2 CPU ranks under ZeRO-3 (EMA on), so that
   the checkpoint holds 2 optimizer files with fp32 masters and Adam moments, and 2 EMA files;
2. runs `python -m pretrain.convert to-release` on it in a child process and reads the child's
   peak resident memory (ru_maxrss), next to that of a child that imports the same modules and
   builds the model on the meta device (everything but tensors: the baseline), and of DeepSpeed's zero_to_fp32
   consolidation of the same checkpoint, which holds the whole model;
3. prints a table: checkpoint size, largest output shard, largest parameter, the target
   (1.5 x largest shard + largest parameter) and each peak above the baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 2 ** 20


def child_peak(code: str) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of `python -c code` run alone."""
    start = time.time()
    pid = os.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-c", code])
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed: {code}")
    return usage.ru_maxrss / 1024, time.time() - start


def train(out: Path, a) -> Path:
    """One step of a model of a few hundred MB on 2 ranks under ZeRO-3 -> its checkpoint folder."""
    from data_pipelines.demo_data import build
    build(REPO / "runs/demo/data")
    model = [f"model.dim={a.dim}", f"model.n_layers={a.layers}", f"model.n_heads={a.dim // 64}",
             f"model.vocab_size={a.vocab}", "model.max_seq_len=256", "data.seq_len=256"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "pretrain.train",
           "--config", "configs/tiny-cpu.yaml", f"run.dir={out / 'run'}", "--resume", "none", "wandb.mode=disabled",
           "train.zero_stage=3", "train.max_steps=1", "train.micro_batch_size=1", "train.eval_interval=0",
           "data.num_workers=0", "train.ema_decay=0.99", *model]
    subprocess.run(cmd, cwd=REPO, check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    return out / "run/checkpoints/step_00000001"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--max-shard-size", default="100MB")
    p.add_argument("--out", default="runs/bench/convert_memory")
    p.add_argument("--reuse", action="store_true", help="keep the checkpoint of an earlier run in --out")
    a = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    out = REPO / a.out
    ckpt = out / "run/checkpoints/step_00000001"
    if not (a.reuse and ckpt.is_dir()):
        shutil.rmtree(out, ignore_errors=True)
        train(out, a)
    shutil.rmtree(out / "release", ignore_errors=True)
    checkpoint_mb = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file()) / MB
    os.chdir(REPO)
    base, _ = child_peak(  # everything to_release imports and builds but the tensors: a meta-device model
        "import json, torch, deepspeed, tqdm, pretrain.convert, pretrain.export.release, model.weights, data_pipelines.shards\n"
        "from model.model_config import ModelConfig\nfrom model.transformer import UnifiedTransformer\n"
        f"cfg = ModelConfig.from_dict(json.load(open({str(ckpt / 'config.json')!r}))['model'])\n"
        "with torch.device('meta'):\n    UnifiedTransformer(cfg)")
    ours, ours_s = child_peak(f"from pretrain.convert import to_release; to_release({str(ckpt)!r}, "
                              f"{str(out / 'release')!r}, max_shard_size={a.max_shard_size!r})")
    theirs, theirs_s = child_peak("from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint as f; "
                                  f"f({str(ckpt.parent)!r}, tag={ckpt.name!r})")
    shards = list((out / "release").glob("*.safetensors"))
    largest_shard = max(f.stat().st_size for f in shards) / MB
    from model.weights import load_weights
    largest_param = max(t.numel() * t.element_size() for t in load_weights(out / "release").values()) / MB
    target = 1.5 * largest_shard + largest_param
    rows = {"checkpoint_mb": checkpoint_mb, "output_shards": len(shards), "largest_shard_mb": largest_shard,
            "largest_param_mb": largest_param, "target_mb": target, "baseline_mb": base,
            "to_release_peak_mb": ours, "to_release_above_baseline_mb": ours - base, "to_release_seconds": ours_s,
            "zero_to_fp32_peak_mb": theirs, "zero_to_fp32_above_baseline_mb": theirs - base,
            "zero_to_fp32_seconds": theirs_s}
    print("\n| what | value |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.0f} |" if isinstance(v, float) else f"| {k} | {v} |")
    print(f"\nto-release above the baseline: {ours - base:.0f} MB against the target {target:.0f} MB "
          f"({'met' if ours - base <= target else 'NOT met'}); zero_to_fp32: {theirs - base:.0f} MB")
    (out / "result.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
