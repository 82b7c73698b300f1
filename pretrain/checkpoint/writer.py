"""How checkpoint files reach the disk: each one fsynced, and with `asynchronous` written by a
background thread from a copy in host memory while training goes on.

`FileWriter` is DeepSpeed's checkpoint engine for this project (it replaces the engine's
torch.save one, so DeepSpeed's model and optimizer files go through it; it has every method of
DeepSpeed's CheckpointEngine, without importing DeepSpeed) and the writer of the
project's own files in a checkpoint folder. Jobs (a file to write, a step of the commit) run in
the order they were queued, on one thread per rank; after a failed job the rest of the queue is
dropped (a later commit must not publish a checkpoint with a missing file) and `wait` raises it.
The thread hands each snapshot file to the rank's writer process (write_process.py), so that
writing never holds this process's GIL; without memfd_create (not Linux) the thread writes it.

The copy (`Snapshot`) goes into buffers kept from one save to the next: a first copy into fresh
memory costs about what writing costs on a local disk (the kernel zeroes every page on first
touch), a copy into the same buffers a twentieth of it (bench/checkpoint_stall.py). A save
waits for the previous one before it copies, so a buffer is never overwritten while written.
"""
from __future__ import annotations

import copy
import os
import queue
import sys
import threading
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import torch


class CheckpointWriteError(RuntimeError):
    """A checkpoint file could not be written (the previous checkpoint stays `latest`)."""


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (created, renamed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | Path, obj) -> None:
    """torch.save(obj) or, for bytes, the bytes themselves, into `path`; flushed and fsynced."""
    with open(path, "wb") as f:
        if isinstance(obj, bytes):
            f.write(obj)
        else:
            torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


class Snapshot:
    """Copies of nested state (dicts, lists, tensors) in host memory, into the same buffers at each
    save where the structure repeats. Tensors are copied compactly: a view of a flat buffer is
    saved as its own values, not the whole buffer (DeepSpeed's clone_tensors_for_torch_save)."""

    def __init__(self, shared=None):
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.shared = shared  # a write_process.SharedBuffers to allocate from, or host memory of this process

    def take(self, obj, where: tuple) -> object:
        return self._copy(obj, where, {})

    def _copy(self, obj, where: tuple, seen: dict):
        if torch.is_tensor(obj):
            if id(obj) in seen:  # the same tensor twice (tied weights): one copy, as torch.save keeps it
                return seen[id(obj)][1]
            src = obj.detach()
            buf = self.buffers.get(where)
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                if buf is not None and self.shared is not None:
                    self.shared.free(buf)
                buf = self.shared.empty(src.shape, src.dtype) if self.shared is not None else \
                    torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=src.is_cuda and torch.cuda.is_available())
                self.buffers[where] = buf
            buf.copy_(src, non_blocking=src.is_cuda)
            seen[id(obj)] = (obj, buf)
            return buf
        if isinstance(obj, dict):
            out = OrderedDict() if isinstance(obj, OrderedDict) else {}
            for k, v in obj.items():
                out[k] = self._copy(v, where + (k,), seen)
            return out
        if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
            return type(obj)(self._copy(v, where + (i,), seen) for i, v in enumerate(obj))
        return copy.deepcopy(obj)


class FileWriter:
    """Writes checkpoint files durably; with `asynchronous`, from snapshots on a background thread."""

    def __init__(self, asynchronous: bool, separate_process: bool = True):
        from pretrain.checkpoint.write_process import SharedBuffers
        self.name = "monofusion.FileWriter"
        self.asynchronous = asynchronous
        self.separate_process = separate_process and hasattr(os, "memfd_create")
        self.snapshot = Snapshot(SharedBuffers() if self.separate_process else None)
        self.process = None  # the write_process.WriteProcess, started at the first asynchronous write
        self.jobs: queue.Queue = queue.Queue()
        self.pending, self.done = 0, threading.Condition()
        self.error: Optional[str] = None
        self.thread: Optional[threading.Thread] = None

    # ---- DeepSpeed's checkpoint engine --------------------------------------------------------
    def create(self, info) -> None:
        pass

    def makedirs(self, path, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return dp_rank == 0

    def is_decoupled(self) -> bool:
        return False

    def set_commit_info(self, info) -> None:
        pass

    def get_commit_info(self):
        return None

    def cleanup(self) -> None:
        pass

    def save(self, state_dict, path: str) -> None:
        self.put(path, state_dict)

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)

    def commit(self, info) -> bool:
        return True  # the project commits a checkpoint itself (pretrain.checkpoint)

    def preserves_storage_sharing(self) -> bool:
        return not self.asynchronous  # else DeepSpeed clones module states, and the snapshot copies them again

    # ---- jobs ------------------------------------------------------------------------------
    def put(self, path: str | Path, obj) -> None:
        """Write `obj` (torch.save; bytes as they are) to `path`, fsynced: now, or queued from a snapshot."""
        if self.asynchronous and not isinstance(obj, bytes):
            obj = self.snapshot.take(obj, (Path(path).name,))
            if torch.cuda.is_available():
                torch.cuda.current_stream().synchronize()  # the pinned copies are complete before written
            self.then(lambda: self._write_from_snapshot(str(path), obj), f"write {path}")
        else:
            self.then(lambda: write_file(path, obj), f"write {path}")

    def _write_from_snapshot(self, path: str, obj) -> None:
        if not self.separate_process:
            write_file(path, obj)
            return
        from pretrain.checkpoint.write_process import WriteProcess
        if self.process is not None and self.process.proc.poll() is not None:
            print(f"warning: the checkpoint writer process ended (exit code {self.process.proc.returncode}) "
                  f"between saves; starting another", file=sys.stderr, flush=True)
            self.process = None
        if self.process is None:
            self.process = WriteProcess(self.snapshot.shared)
        self.process.write(path, obj)

    def then(self, job: Callable[[], None], what: str, always: bool = False) -> None:
        """Run `job` after everything queued before it (now, when not asynchronous). A job is skipped
        after a failure unless `always` (a commit step, which reads `failed` and tells the other ranks)."""
        if not self.asynchronous:
            self._run(job, what, always)
            return
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name="checkpoint-writer", daemon=True)
            self.thread.start()
        with self.done:
            self.pending += 1
        self.jobs.put((job, what, always))

    @property
    def failed(self) -> bool:
        return self.error is not None

    def _work(self) -> None:
        while True:
            job, what, always = self.jobs.get()
            self._run(job, what, always)
            with self.done:
                self.pending -= 1
                self.done.notify_all()

    def _run(self, job, what: str, always: bool) -> None:
        try:
            if self.error is None or always:  # after a failure the rest of this checkpoint is dropped
                job()
        except BaseException as e:  # kept for the training thread, which raises it at its next wait
            self.error = self.error or f"checkpoint: {what}: {type(e).__name__}: {e}\n{traceback.format_exc()}"

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until every queued job ran (False when `timeout` ran out first); then raise a failed job's error."""
        with self.done:
            finished = self.done.wait_for(lambda: self.pending == 0, timeout)
        if finished:  # else jobs of the failed checkpoint may still run, and must see the failure
            self.raise_error()
        return finished

    def busy(self) -> bool:
        return self.pending > 0

    def raise_error(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise CheckpointWriteError(error.splitlines()[0]) from RuntimeError(error)
