"""Checkpoint conversion.

    python -m pretrain.convert to-universal CKPT OUT     # a ZeRO checkpoint -> DeepSpeed universal
    python -m pretrain.train --config X.yaml --resume OUT  # ... then resume on another number of ranks
    python -m pretrain.convert to-release CKPT OUT [--raw] [--dtype bf16]  # -> a release folder

`to-universal` runs DeepSpeed's `ds_to_universal` (with `--inject_missing_state`, needed for
ZeRO-1/2) and adds `ema_fp32.pt`: the EMA reassembled from the per-rank partitions, which a
resumed run on any number of ranks cuts into its own partitions again.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from pretrain.checkpoint import CONFIG_FILE

EMA_FILE = "ema_fp32.pt"


def consolidate(ckpt: Path, partitions: Optional[list] = None) -> dict:
    """The full fp32 state dict of a ZeRO checkpoint folder: its fp32 master weights, or with
    `partitions` (one list of flat tensors per rank, the layout of that rank's masters) those
    tensors in their place (the EMA shadows).

    DeepSpeed's zero_to_fp32 reassembles flat fp32 partitions into parameters; it is handed slim
    copies of the optimizer files (no Adam moments). The copies also name the ZeRO stage of
    DeepSpeed's BF16_Optimizer files (ZeRO-1 in bf16), which zero_to_fp32 alone refuses."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    ckpt = Path(ckpt)
    with tempfile.TemporaryDirectory() as tmp:
        slim_ckpt = Path(tmp) / ckpt.name
        slim_ckpt.mkdir()
        for f in ckpt.glob("*model_states.pt"):
            os.symlink(f.resolve(), slim_ckpt / f.name)
        rank = 0
        while (src := next(ckpt.glob(f"*zero_pp_rank_{rank}_*optim_states.pt"), None)) is not None:
            osd = torch.load(src, map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
            stage = int(osd.get("zero_stage", 1))  # BF16_Optimizer (ZeRO-1 in bf16) writes none
            key = "single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"
            slim = {k: osd[k] for k in ("partition_count", "ds_version") if k in osd}
            slim.update(zero_stage=stage, **{key: osd[key] if partitions is None else partitions[rank]})
            torch.save({"optimizer_state_dict": slim, "ds_config": {}, "ds_version": osd.get("ds_version")},
                       slim_ckpt / src.name)
            rank += 1
        if rank == 0:
            raise FileNotFoundError(f"{ckpt}: no *zero_pp_rank_0_*optim_states.pt (not a ZeRO checkpoint folder)")
        return get_fp32_state_dict_from_zero_checkpoint(tmp, tag=ckpt.name)


def consolidate_ema(ckpt: Path) -> dict | None:
    """The full fp32 EMA state dict of a ZeRO checkpoint folder (None when it has no EMA)."""
    rank_files = sorted(Path(ckpt).glob("rank_*.pt"))
    if not rank_files:
        return None
    shadows = [torch.load(f, map_location="cpu", weights_only=False).get("ema") for f in rank_files]
    if any(s is None for s in shadows):
        return None
    return consolidate(ckpt, [s["shadow"] for s in shadows])


def to_universal(ckpt: str | Path, out: str | Path) -> Path:
    """Convert a ZeRO checkpoint folder (e.g. RUN/checkpoints/step_N) to a universal one at `out`."""
    ckpt, out = Path(ckpt), Path(out)
    if not list(ckpt.glob("*model_states.pt")):
        raise FileNotFoundError(f"{ckpt}: not a DeepSpeed checkpoint folder (no *model_states.pt)")
    if out.exists():
        raise FileExistsError(f"{out}: already exists")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed on {ckpt}:\n{r.stderr[-2000:]}")
    ema = consolidate_ema(ckpt)
    if ema is not None:
        torch.save(ema, tmp / EMA_FILE)
    if (ckpt / CONFIG_FILE).is_file():
        shutil.copy2(ckpt / CONFIG_FILE, tmp / CONFIG_FILE)
    os.replace(tmp, out)
    return out


def to_release(ckpt: str | Path, out: str | Path, ema: bool = True, dtype: str = "fp32") -> Path:
    """A checkpoint folder -> a release folder (safetensors; EMA weights when kept, else raw)."""
    from pretrain.release import data_info, model_from_checkpoint, save_release
    ckpt = Path(ckpt)
    model, client, used_ema = model_from_checkpoint(ckpt, ema)
    info, tokenizer = data_info(client["config"].get("data", {}))
    info["weights"] = "ema" if used_ema else "raw"
    info["step"] = client.get("step")
    return save_release(model, Path(out), info, tokenizer, torch.bfloat16 if dtype == "bf16" else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("to-universal", help="ZeRO checkpoint -> DeepSpeed universal checkpoint")
    u.add_argument("checkpoint", help="a checkpoint folder, e.g. RUN/checkpoints/step_00001000")
    u.add_argument("out", help="output folder (e.g. RUN/checkpoints/step_00001000_universal)")
    r = sub.add_parser("to-release", help="ZeRO checkpoint -> release folder (config.json + safetensors)")
    r.add_argument("checkpoint", help="a checkpoint folder, e.g. RUN/checkpoints/step_00001000")
    r.add_argument("out", help="release folder to write")
    r.add_argument("--raw", action="store_true", help="raw weights even when the run kept an EMA")
    r.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    a = p.parse_args(argv)
    try:
        if a.command == "to-universal":
            out = to_universal(a.checkpoint, a.out)
            print(f"wrote {out}; resume with --resume {out}")
        else:
            out = to_release(a.checkpoint, a.out, ema=not a.raw, dtype=a.dtype)
            print(f"wrote {out}; sample with python -m pretrain.sample --model {out}")
    except (FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
