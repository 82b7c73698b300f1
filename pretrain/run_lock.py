"""One run per run directory, and no rank outliving its launcher.

Rank 0 holds an exclusive `fcntl.flock` on RUN_DIR/run.lock for the whole run, with its host,
pid and a heartbeat (`beat=`, rewritten every HEARTBEAT_S) written inside: a second run into the
same directory is refused with one line that names the holder. The kernel drops the lock when the
holder dies, so the lock of a killed run on this host is simply taken over (and the takeover is
logged). flock reaches every host on local disks, NFSv4 and GPFS; on Lustre mounted with
`localflock`, BeeGFS without global locks and NFS mounted `nolock` it sees only the local node. So a
lock naming another host is taken over only once its heartbeat is older than `stale_after_s`
(the holder is dead, or cut off from the file system); until then the run is refused.

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

from pretrain.distributed import DistInfo, all_gather_objects

LOCK_FILE = "run.lock"


class RunDirBusy(RuntimeError):
    """Another live run holds the run directory."""


HEARTBEAT_S = 30.0
LINE_WIDTH = 160  # the holder line, padded: rewritten in place
STALE_AFTER_S = 300.0


def _beat(holder: str) -> Optional[float]:
    """The heartbeat time written in a lock's text (None: none)."""
    for word in holder.split():
        if word.startswith("beat="):
            try:
                return float(word[5:])
            except ValueError:
                return None
    return None


class RunDirLock:
    def __init__(self, run_dir, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.path = Path(run_dir) / LOCK_FILE
        self.file = None
        self.previous: Optional[str] = None  # the holder named in a lock that was taken over
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.since = time.strftime('%Y-%m-%dT%H:%M:%S')
        self.writing = threading.Lock()  # the heartbeat never writes into a released lock

    def acquire(self) -> "RunDirLock":
        """Take the lock or raise RunDirBusy naming its holder. On a file system without flock the
        run goes on unlocked (a warning says so)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), "r+")  # no O_APPEND: pwrite at 0
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
        host = socket.gethostname()
        if self.previous and not self.previous.startswith(f"host={host} "):  # flock may not see that host
            beat = _beat(self.previous)
            age = time.time() - beat if beat is not None else float("inf")
            if age < self.stale_after_s:
                f.close()
                raise RunDirBusy(f"run.dir {self.path.parent} is in use by {self.previous.split(' beat=')[0]} "
                                 f"(its heartbeat in {self.path} is {age:.0f} s old; this file system's flock may "
                                 f"not reach that host: it is taken over {self.stale_after_s:.0f} s after its "
                                 "last heartbeat)")
        f.truncate(0)
        self.file = f
        self._write()
        os.register_at_fork(after_in_child=self._close_in_child)
        threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True).start()
        return self

    def _write(self) -> None:
        """The holder line, written over the old one in one write of a fixed width: a reader on
        another host never sees the file empty or half written."""
        line = f"host={socket.gethostname()} pid={os.getpid()} since={self.since} beat={time.time():.0f}"
        os.pwrite(self.file.fileno(), (line.ljust(LINE_WIDTH - 1) + "\n").encode(), 0)
        os.fsync(self.file.fileno())  # other hosts read it (a network file system sends it on fsync)

    def _heartbeat(self) -> None:
        failing = False
        while True:
            time.sleep(self.heartbeat_s)
            with self.writing:
                if self.file is None:
                    return
                try:
                    held = os.pread(self.file.fileno(), LINE_WIDTH, 0).decode(errors="replace").strip()
                    mine = f"host={socket.gethostname()} pid={os.getpid()} "
                    if held and not held.startswith(mine):  # a host whose flock did not see this one's
                        print(f"error: {self.path} now names {held.split(' beat=')[0]}: another run took this "
                              "run.dir over (its file system's flock does not reach across hosts); stop one of them",
                              file=sys.stderr, flush=True)
                    self._write()
                    failing = False
                except OSError as e:  # retried: a lock that stops beating is taken over after stale_after_s
                    if not failing:
                        print(f"warning: {self.path}: heartbeat not written ({e.strerror}); retrying",
                              file=sys.stderr, flush=True)
                    failing = True

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
        with self.writing:
            if self.file is not None:
                self.file.truncate(0)  # an empty file: the run ended cleanly
                self.file.close()      # closing drops the flock
                self.file = None


def lock_run_dir(run_dir: str, dist: DistInfo) -> Optional[RunDirLock]:
    """Rank 0 locks `run_dir` (the lock, None on the other ranks); every rank learns the outcome, so
    all raise RunDirBusy on a busy directory."""
    lock, error = None, None
    if dist.is_main:
        try:
            lock = RunDirLock(run_dir).acquire()
        except (RunDirBusy, OSError) as e:  # every rank must reach the gather below
            error = str(e)
    if dist.world_size > 1:
        error = all_gather_objects(error, dist.control_group)[0]
    if error:
        raise RunDirBusy(error)
    return lock


def exit_with_parent(what: str, stopping: Callable[[], bool] = lambda: False, poll_s: float = 1.0,
                     grace_s: float = 900.0) -> Optional[threading.Thread]:
    """Start a daemon thread that ends this process (exit code 1, no checkpoint) once its parent
    process is gone; None when the parent is init already (nothing to watch). While `stopping()`
    (a SIGTERM/SIGUSR1 arrived: Slurm signals the launcher too, which may die of it) the rank is
    given `grace_s` to write its checkpoint and exit by itself."""
    parent = os.getppid()
    if parent <= 1:
        return None

    def say(line: str) -> None:  # the launcher's pipe may be gone with it: a write then fails
        try:
            print(line, file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        time.sleep(2 * poll_s)  # a signal that killed the launcher may reach this rank a moment later
        try:
            if stopping():
                say(f"{what}: the launcher (pid {parent}) is gone; finishing the checkpoint of the stop signal")
                time.sleep(grace_s)
            say(f"{what}: the launcher (pid {parent}) is gone; exiting without a checkpoint")
        finally:
            os._exit(1)

    thread = threading.Thread(target=watch, name="exit-with-launcher", daemon=True)
    thread.start()
    return thread
