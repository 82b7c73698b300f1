"""Output folders written whole or not at all: `staged_folder(out)` gives a temporary sibling
`.OUT.tmp-HOST-PID` to write into and renames it to OUT at the end; on an error (or Ctrl-C) it is
removed, and one left by a process that was killed (SIGKILL, a lost node) is removed by the next
conversion to the same OUT on that host.
"""
from __future__ import annotations

import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary siblings of `out` left by dead processes of this host; returns them."""
    host, removed = socket.gethostname(), []
    for tmp in Path(out).parent.glob(f".{Path(out).name}.tmp-*"):
        owner = tmp.name[len(f".{Path(out).name}.tmp-"):]
        where, _, pid = owner.rpartition("-")
        if pid.isdigit() and where in ("", host) and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """A temporary folder renamed to `out` (which must not exist) when the block ends without error."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: already exists")
    remove_stale(out)
    tmp = out.with_name(f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
