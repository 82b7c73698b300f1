"""Sharded checkpoints that a kill, or a host crash, at any moment cannot corrupt. This package is
the one owner of the checkpoint folder: its file names, client state, EMA files, lineage and, in
`reader`, reading whole tensors back out of the rank files (pretrain.convert and pretrain.export.release
call it); `writer` puts the files on disk.

Layout: CKPT/step_00000100/ holds DeepSpeed's checkpoint (model and optimizer shards,
LR scheduler, client state: step, tokens seen, data-loader state, config), `config.json` (the
resolved experiment config), `lineage` (the id of the run and of every run resumed from it) and
one `rank_RRRRR.pt` per rank (its RNG states and its EMA partition). A universal checkpoint
(`to-universal`) holds DeepSpeed's `zero/` folder and the whole EMA as `ema_fp32.pt`.
CKPT/latest names the newest complete one.

Writing (`Checkpointer.save`): every rank writes its files into `step_N.tmp`, each fsynced, then
fsyncs the folder. Once every rank's files are on disk (an all-reduce of "written" flags on a gloo
group of its own), rank 0 renames the folder to `step_N`, fsyncs CKPT, replaces `latest` (a temp
file, fsynced, renamed, CKPT fsynced again) and prunes this lineage's checkpoints to the last
`keep`. With `checkpoint.async` the files are written from a snapshot in host memory by a
background thread and the commit runs there too: training goes on; the next save, the end of the
run and a stop signal wait for it. A crash before the rename leaves only a `.tmp` folder, which
loading ignores and the next save removes; `latest` always names a complete checkpoint. When a run
resumed from an earlier checkpoint saves a step that exists already, `latest` first moves back to
the newest earlier step, then the old folder is replaced.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import sys
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from data_pipelines.tokenizer import TOKENIZER_FILES, file_name as tokenizer_file_name, find_tokenizer
from pretrain.checkpoint.writer import CheckpointWriteError, FileWriter, fsync_dir
from model.config_system import InputMissing

LATEST = "latest"
CONFIG_FILE = "config.json"  # the resolved experiment config, readable without loading any weights
EMA_FILE = "ema_fp32.pt"     # universal checkpoints: the whole EMA, {name: fp32 tensor}
LINEAGE_FILE = "lineage"     # the id shared by a run's checkpoints and those of the runs resumed from them
DATA_FILE = "data.json"      # what a release needs from the run's shards: encoder, latent shapes, tokenizer fingerprint
# the shards' tokenizer (when it was found and matched their fingerprint) is carried under the name
# data_pipelines.tokenizer gives its back-end: tokenizer.model or tokenizer.json
SIDE_FILES = (CONFIG_FILE, LINEAGE_FILE, DATA_FILE, *TOKENIZER_FILES)  # rank 0's files beside DeepSpeed's
TAG = re.compile(r"^step_(\d{8})(_universal)?$")
FAULT_ENV = "MONOFUSION_FAULT"  # testing hook: "checkpoint-write@N" / "checkpoint-replace@N" exit inside
                                # the save of step N (after writing / while an older step N is replaced);
                                # "checkpoint-enospc@N:R": rank R's files of step N fail as on a full disk


def _fault(point: str, step: int, rank: Optional[int] = None) -> None:
    wanted = os.environ.get(FAULT_ENV)
    if point == "checkpoint-enospc":
        if wanted == f"{point}@{step}:{rank}":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    elif wanted == f"{point}@{step}":
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
    fsync_dir(root)


def read_latest(root: Path) -> Optional[str]:
    path = Path(root) / LATEST
    return path.read_text().strip() if path.is_file() else None


def list_checkpoints(root: Path) -> list[str]:
    """Complete checkpoint tags under root, oldest first."""
    if not Path(root).is_dir():
        return []
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir() and TAG.match(p.name))


def new_lineage() -> str:
    return uuid.uuid4().hex[:16]


def read_lineage(folder: Path) -> Optional[str]:
    """The lineage id of a checkpoint folder (None: written before lineages, or not by a run)."""
    path = Path(folder) / LINEAGE_FILE
    return path.read_text().strip() or None if path.is_file() else None


def copy_side_files(source: Path, target: Path) -> None:
    """A converted checkpoint (to-universal) keeps its source's config, lineage, data record and tokenizer."""
    for name in SIDE_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(target) / name)


def data_files(record: dict, tokenizer: Optional[bytes]) -> dict[str, bytes]:
    """The files a checkpoint carries about its data (Checkpointer.data_files): `record` (encoder,
    latent shapes, tokenizer fingerprint) and the tokenizer itself."""
    files = {DATA_FILE: (json.dumps(record, indent=2) + "\n").encode()}
    if tokenizer is not None:
        files[tokenizer_file_name(tokenizer)] = tokenizer
    return files


def read_data(folder: Path) -> tuple[Optional[dict], Optional[Path]]:
    """(data record, tokenizer file) a checkpoint carries; (None, None) for one written before them."""
    folder = Path(folder)
    if not (folder / DATA_FILE).is_file():
        return None, None
    return json.loads((folder / DATA_FILE).read_text()), find_tokenizer(folder)


def prune(root: Path, keep: int, lineage: str) -> None:
    """Delete all but the newest `keep` checkpoints of `lineage` (never `latest`): checkpoints of
    another run in the same directory (after `--resume none`), universal ones and older ones stay."""
    latest = read_latest(root)
    ours = [t for t in list_checkpoints(root) if not t.endswith("_universal") and read_lineage(root / t) == lineage]
    for tag in ours[:-keep]:
        if tag != latest:
            remove(root, tag)


def remove(root: Path, tag: str) -> None:
    """Delete a checkpoint folder so that a crash midway leaves no half-deleted `step_N`: it is
    renamed to a `.tmp` name first (loading ignores those, the next save removes them)."""
    doomed = root / f"{tag}.old.tmp"
    os.replace(root / tag, doomed)
    fsync_dir(root)
    shutil.rmtree(doomed, ignore_errors=True)


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


class Checkpointer:
    """Saves a run's checkpoints under `root` (see the module's docstring); `lineage` names the run.
    `group`: a gloo group used only by the commit (None on one rank)."""

    def __init__(self, engine, root: Path, rank: int, keep: int, asynchronous: bool, group=None):
        self.engine, self.root, self.rank, self.keep, self.group = engine, Path(root), rank, keep, group
        self.writer = FileWriter(asynchronous)
        engine.checkpoint_engine = self.writer  # DeepSpeed's files go through it too
        self.lineage = new_lineage()
        self.data_files: dict[str, bytes] = {}  # rank 0 writes them into every checkpoint (data_files())

    def save(self, step: int, client_state: dict, rank_state: dict) -> Path:
        """Write checkpoint `step_N` on every rank (collective); `latest` moves once all are on disk:
        before this returns, or later in the background with `checkpoint.async`. A previous
        checkpoint that failed (on every rank alike: the commit tells them) is reported, and this
        one is tried: the run goes on, `latest` still names the last complete one."""
        self.settle()  # a second save waits for the first
        tag = tag_for(step)
        tmp = self.root / (tag + ".tmp")
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.tmp"):  # of a run killed while saving
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
        _barrier()
        self.engine.save_checkpoint(str(self.root), tmp.name, client_state=client_state, save_latest=False)
        if self.rank == 0:
            if "config" in client_state:
                self.writer.put(tmp / CONFIG_FILE, (json.dumps(client_state["config"], indent=2) + "\n").encode())
            self.writer.put(tmp / LINEAGE_FILE, (self.lineage + "\n").encode())
            for name, content in self.data_files.items():
                self.writer.put(tmp / name, content)
        self.writer.put(tmp / rank_file(self.rank), rank_state)
        self.writer.then(lambda: (_fault("checkpoint-enospc", step, self.rank), fsync_dir(tmp),
                                  _fault("checkpoint-write", step)), f"fsync {tmp}")
        self.writer.then(lambda: self._commit(step), f"commit {tag}", always=True)
        if not self.writer.asynchronous:
            self.settle()  # the commit's last all-reduce follows rank 0's publish: `latest` has moved
        return self.root / tag

    def settle(self, timeout_s: Optional[float] = None) -> bool:
        """Wait for the checkpoint in flight (at most `timeout_s`: after a failure, a rank that died
        never joins its commit); False, with one line on stderr, when it failed (on every rank alike:
        the commit tells them) or did not finish in time."""
        try:
            if self.writer.wait(timeout_s):
                return True
            line = f"checkpoint in flight not committed within {timeout_s:g} s"
        except CheckpointWriteError as e:
            line = str(e)
        sys.stderr.write(f"error (rank {self.rank}): {line}; `latest` names the previous checkpoint\n")
        sys.stderr.flush()
        return False

    def busy(self) -> bool:
        return self.writer.busy()

    def _commit(self, step: int) -> None:
        """On the writer thread of every rank: agree that every rank's files are on disk, rank 0
        publishes the step, and every rank learns whether it did (a failure is every rank's)."""
        written = not self.writer.failed
        if self.group is not None:
            written = self._all(written)
        published = False
        if written and self.rank == 0:
            try:
                publish(self.root, step, self.keep, self.lineage)
                published = True
            except BaseException:
                if self.group is not None:
                    self._all(False)
                raise
        if self.group is not None and written:
            published = self._all(published or self.rank != 0)
        if not written and not self.writer.failed:
            raise CheckpointWriteError(f"checkpoint {tag_for(step)}: another rank could not write its files")
        if written and not published:
            raise CheckpointWriteError(f"checkpoint {tag_for(step)}: rank 0 could not publish it")

    def _all(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on every rank (the writers' own gloo group)."""
        from pretrain.distributed import any_rank
        return not any_rank(not flag, self.group)


def publish(root: Path, step: int, keep: int, lineage: str) -> None:
    """Rank 0, once every rank's files of `step_N.tmp` are on disk: rename, `latest`, prune."""
    tag = tag_for(step)
    if (root / tag).exists():  # a run resumed from an earlier step saves this step again
        if read_latest(root) == tag:  # `latest` must not name it while it is replaced
            earlier = [t for t in list_checkpoints(root) if int(TAG.match(t).group(1)) < step]
            if earlier:
                write_latest(root, earlier[-1])
        remove(root, tag)
        _fault("checkpoint-replace", step)
    os.replace(root / (tag + ".tmp"), root / tag)
    fsync_dir(root)
    write_latest(root, tag)
    prune(root, keep, lineage)


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
    raise InputMissing(f"--resume {resume}: not a checkpoint (no '{LATEST}' file, no *model_states.pt)")


def is_universal(root: Path, tag: str) -> bool:
    """A DeepSpeed universal checkpoint (pretrain.convert to-universal) has a `zero/` folder."""
    return (Path(root) / tag / "zero").is_dir()


def load_checkpoint(engine, root: Path, tag: str, rank: int) -> tuple[dict, Optional[dict]]:
    """Load into the engine; returns (client state, this rank's own state or None). The optimizer's
    hyperparameters are the checkpoint's afterwards: pretrain.engine.restore_settings sets this run's."""
    if not (Path(root) / tag).is_dir():
        raise InputMissing(f"{Path(root) / tag}: checkpoint not found")
    path, client = engine.load_checkpoint(str(root), tag, load_module_strict=True, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise InputMissing(f"{Path(root) / tag}: DeepSpeed could not load this checkpoint")
    if is_universal(root, tag) and engine.zero_optimization_stage() == 3:
        _unshare_step(engine.optimizer.optimizer)
    own = Path(root) / tag / rank_file(rank)
    rank_state = torch.load(own, weights_only=False) if own.is_file() else None
    return client, rank_state


def _unshare_step(optimizer) -> None:
    """DeepSpeed 0.19.8's ZeRO-3 universal loader hands every parameter group's state *one shared*
    `step` tensor, which AdamW then increments once per group and step; each group gets its own
    back (with this and restore_settings a resume through a universal checkpoint continues bit for
    bit, as a ZeRO checkpoint does)."""
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


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
