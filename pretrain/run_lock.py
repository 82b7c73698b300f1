"""One run per run directory, and no rank outliving its launcher.

Rank 0 holds an exclusive `fcntl.flock` on RUN_DIR/run.lock for the whole run, with its host
and pid written inside: a second run into the same directory is refused with one line that
names the holder. The kernel drops the lock when the holder dies, so the lock of a killed
run is simply taken over (and the takeover is logged).

torchrun starts its ranks in their own sessions: killing the launcher alone (kill -9) leaves
them training, beside whatever is launched next into the same directory. Each rank started
by a launcher therefore watches its parent and exits, without a checkpoint, once it is gone.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

LOCK_FILE = "run.lock"


class RunDirBusy(RuntimeError):
    """Another live run holds the run directory."""


class RunDirLock:
    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_FILE
        self.file = None
        self.previous: Optional[str] = None  # the holder named in a lock that was taken over

    def acquire(self) -> "RunDirLock":
        """Take the lock or raise RunDirBusy naming its holder. On a file system without flock the
        run goes on unlocked (a warning says so)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirBusy(f"run.dir {self.path.parent} is in use by {holder} (lock file {self.path}); "
                             "stop that run or choose another run.dir (a network file system may keep the lock "
                             "of a crashed host: remove the file once that process is surely gone)") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f"warning: {self.path}: the file system does not support flock ({e.strerror}); "
                  "nothing stops a second run in this run.dir", file=sys.stderr)
        f.seek(0)
        self.previous = f.read().strip() or None  # a holder that died without releasing
        f.seek(0)
        f.truncate()
        f.write(f"host={socket.gethostname()} pid={os.getpid()} since={time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        f.flush()
        self.file = f
        os.register_at_fork(after_in_child=self._close_in_child)
        return self

    def _close_in_child(self) -> None:
        """A forked child (a DataLoader worker) drops its copy of the locked file: a flock belongs to
        the open file, and a worker outliving a killed rank would otherwise keep the run locked."""
        if self.file is not None:
            try:
                os.close(self.file.fileno())
            except OSError:
                pass
            self.file = None

    def release(self) -> None:
        if self.file is not None:
            self.file.truncate(0)  # an empty file: the run ended cleanly
            self.file.close()      # closing drops the flock
            self.file = None


def exit_with_parent(what: str, stopping: Callable[[], bool] = lambda: False, poll_s: float = 1.0,
                     grace_s: float = 900.0) -> Optional[threading.Thread]:
    """Start a daemon thread that ends this process (exit code 1, no checkpoint) once its parent
    process is gone; None when the parent is init already (nothing to watch). While `stopping()`
    (a SIGTERM/SIGUSR1 arrived: Slurm signals the launcher too, which may die of it) the rank is
    given `grace_s` to write its checkpoint and exit by itself."""
    parent = os.getppid()
    if parent <= 1:
        return None

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        time.sleep(2 * poll_s)  # a signal that killed the launcher may reach this rank a moment later
        if stopping():
            print(f"{what}: the launcher (pid {parent}) is gone; finishing the checkpoint of the stop signal",
                  file=sys.stderr, flush=True)
            time.sleep(grace_s)
        print(f"{what}: the launcher (pid {parent}) is gone; exiting without a checkpoint", file=sys.stderr,
              flush=True)
        os._exit(1)

    thread = threading.Thread(target=watch, name="exit-with-launcher", daemon=True)
    thread.start()
    return thread
