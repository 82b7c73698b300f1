"""Sharded checkpoints that a kill at any moment cannot corrupt. This package is the one owner
of the checkpoint folder: its file names, client state, EMA files and, in `reader`, reading
whole tensors back out of the rank files (pretrain.convert and pretrain.release call it).

Layout: CKPT/step_00000100/ holds DeepSpeed's checkpoint (model and optimizer shards,
LR scheduler, client state: step, tokens seen, data-loader state, config), `config.json` (the
resolved experiment config) and one `rank_RRRRR.pt` per rank (its RNG states and its EMA
partition). A universal checkpoint (`to-universal`) holds DeepSpeed's `zero/` folder and the
whole EMA as `ema_fp32.pt`. CKPT/latest names the newest complete one.

Writing: every rank writes into `step_N.tmp`; after a barrier (all ranks done) rank 0
renames it to `step_N`, then replaces `latest` atomically (temp file + rename) and prunes
to the last `keep`. A crash before the rename leaves only a `.tmp` folder, which loading
ignores and the next save removes; `latest` always names a complete checkpoint. When a run
resumed from an earlier checkpoint saves a step that exists already, `latest` first moves
back to the newest earlier step, then the old folder is replaced.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

LATEST = "latest"
CONFIG_FILE = "config.json"  # the resolved experiment config, readable without loading any weights
EMA_FILE = "ema_fp32.pt"     # universal checkpoints: the whole EMA, {name: fp32 tensor}
TAG = re.compile(r"^step_(\d{8})(_universal)?$")
FAULT_ENV = "MONOFUSION_FAULT"  # testing hook: "checkpoint-write@N" / "checkpoint-replace@N" exit inside
                                # the save of step N (after writing / while an older step N is replaced)


def _fault(point: str, step: int) -> None:
    if os.environ.get(FAULT_ENV) == f"{point}@{step}":
        os._exit(17)


CHECKPOINTS = "checkpoints"  # under run.dir


def run_checkpoints(run_dir: str | Path) -> Path:
    """Where a run directory keeps its checkpoints (and `latest`)."""
    return Path(run_dir) / CHECKPOINTS


def write_full_ema(folder: Path, state: dict) -> None:
    """The whole EMA of a universal checkpoint, {name: fp32 tensor}, which any world size cuts anew."""
    torch.save(state, Path(folder) / EMA_FILE)


def read_full_ema(folder: Path) -> Optional[dict]:
    path = Path(folder) / EMA_FILE
    return torch.load(path, map_location="cpu") if path.is_file() else None


def rank_file(rank: int) -> str:
    """A rank's own state in a checkpoint folder: {"rng": ..., "ema": {"shadow": [...]} or None}."""
    return f"rank_{rank:05d}.pt"


def is_checkpoint(folder: Path) -> bool:
    return any(Path(folder).glob("*model_states.pt"))


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def write_latest(root: Path, tag: str) -> None:
    tmp = root / (LATEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(tag + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)


def read_latest(root: Path) -> Optional[str]:
    path = Path(root) / LATEST
    return path.read_text().strip() if path.is_file() else None


def list_checkpoints(root: Path) -> list[str]:
    """Complete checkpoint tags under root, oldest first."""
    if not Path(root).is_dir():
        return []
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir() and TAG.match(p.name))


def prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    latest = read_latest(root)
    plain = [t for t in list_checkpoints(root) if not t.endswith("_universal")]
    for tag in plain[:-keep]:
        if tag != latest:
            shutil.rmtree(root / tag, ignore_errors=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, root: Path, step: int, client_state: dict, rank_state: dict, keep: int,
                    rank: int) -> Path:
    """Write checkpoint `step_N` under root on every rank; move `latest` once all are done."""
    root = Path(root)
    tag = tag_for(step)
    tmp = tag + ".tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
    _barrier()
    engine.save_checkpoint(str(root), tmp, client_state=client_state, save_latest=False)
    if rank == 0 and "config" in client_state:
        (root / tmp / CONFIG_FILE).write_text(json.dumps(client_state["config"], indent=2) + "\n")
    torch.save(rank_state, root / tmp / rank_file(rank))
    _fault("checkpoint-write", step)  # as if killed after writing, before the checkpoint is committed
    _barrier()
    if rank == 0:
        if (root / tag).exists():  # a run resumed from an earlier step saves this step again
            if read_latest(root) == tag:  # `latest` must not name it while it is replaced
                earlier = [t for t in list_checkpoints(root) if int(TAG.match(t).group(1)) < step]
                if earlier:
                    write_latest(root, earlier[-1])
            shutil.rmtree(root / tag)
            _fault("checkpoint-replace", step)
        os.replace(root / tmp, root / tag)
        write_latest(root, tag)
        prune(root, keep)
    _barrier()
    return root / tag


def resolve_resume(resume: str, root: Path) -> Optional[tuple[Path, str]]:
    """'none' -> None; 'auto' -> `latest` under root (None if there is none); a checkpoint
    folder (root with `latest`, or one step_N folder) -> (root, tag)."""
    if resume == "none":
        return None
    if resume == "auto":
        tag = read_latest(root)
        return (Path(root), tag) if tag else None
    path = Path(resume)
    if (path / LATEST).is_file():
        return path, read_latest(path)
    if path.is_dir() and is_checkpoint(path):
        return path.parent, path.name
    raise FileNotFoundError(f"--resume {resume}: not a checkpoint (no '{LATEST}' file, no *model_states.pt)")


def is_universal(root: Path, tag: str) -> bool:
    """A DeepSpeed universal checkpoint (pretrain.convert to-universal) has a `zero/` folder."""
    return (Path(root) / tag / "zero").is_dir()


def load_checkpoint(engine, root: Path, tag: str, rank: int) -> tuple[dict, Optional[dict]]:
    """Load into the engine; returns (client state, this rank's own state or None)."""
    if not (Path(root) / tag).is_dir():
        raise FileNotFoundError(f"{Path(root) / tag}: checkpoint not found")
    repair = is_universal(root, tag) and engine.zero_optimization_stage() == 3
    groups = [{k: v for k, v in g.items() if k not in SCHEDULED} for g in engine.optimizer.optimizer.param_groups] \
        if repair else []
    path, client = engine.load_checkpoint(str(root), tag, load_module_strict=True, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"{Path(root) / tag}: DeepSpeed could not load this checkpoint")
    if repair:
        _repair_universal_optimizer(engine.optimizer.optimizer, groups)
    own = Path(root) / tag / rank_file(rank)
    rank_state = torch.load(own, weights_only=False) if own.is_file() else None
    return client, rank_state


SCHEDULED = ("params", "lr", "initial_lr")  # param-group entries a checkpoint must not take from this run


def _repair_universal_optimizer(optimizer, groups: list[dict]) -> None:
    """Undo two things DeepSpeed 0.19.8's ZeRO-3 universal loader does to the torch optimizer (after it,
    a resume through a universal checkpoint continues bit for bit, as a ZeRO checkpoint does):
    it hands every parameter group's state *one shared* `step` tensor, which AdamW then increments
    once per group and step; and it copies group 0's hyperparameters into every group (the weight
    decay of the decayed group onto the group without). Groups get this run's values back."""
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    for group, own in zip(optimizer.param_groups, groups):
        group.update(own)


def check_model_matches(root: Path, tag: str, model_cfg) -> None:
    """ConfigError naming the model keys when the checkpoint's weights have other shapes than
    `model_cfg` gives (a checkpoint without CONFIG_FILE is not checked)."""
    from model.config_system import ConfigError
    from model.model_config import ModelConfig
    from model.transformer import UnifiedTransformer
    path = Path(root) / tag / CONFIG_FILE
    if not path.is_file():
        return
    saved = ModelConfig.from_dict(json.loads(path.read_text())["model"])

    def shapes(cfg):
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in UnifiedTransformer(cfg).state_dict().items()}

    if shapes(saved) != shapes(model_cfg):
        was, now = saved.to_dict(), model_cfg.to_dict()
        diff = ", ".join(f"model.{k} is {was[k]!r} there, {now[k]!r} here" for k in now if was.get(k) != now[k])
        raise ConfigError(f"--resume {Path(root) / tag}: the checkpoint's weights have other shapes ({diff})")
