"""One attempt at reading a remote file, from a byte offset: `open_source(where, offset, timeout)`.

HTTP(S) goes through urllib (proxies from the environment, redirects, TLS): a socket timeout of
`timeout` seconds bounds every wait (connect, headers, each read), a `Range: bytes=N-` header asks
for the rest of a broken transfer, and the status code says whether a failure is permanent. A
`pipe:` command runs in a process group of its own that dies with this process; its stdout is read
with poll(), so it too never blocks longer than `timeout`, and an aborted attempt kills the group.
A source's body starts at `start` (the offset asked for when the server honoured it, else 0).
"""
from __future__ import annotations

import ctypes
import functools
import http.client
import os
import re
import select
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from typing import Optional

from data_pipelines.transport.locations import is_http
from data_pipelines.transport.policy import PERMANENT_HTTP, AttemptFailed, Stalled

CHUNK = 1 << 20
PR_SET_PDEATHSIG = 1
SETPRIV = shutil.which("setpriv")  # util-linux: sets the death signal, then execs (no Python between fork and exec)
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when the thread that started it exits (Linux prctl),
    so that nothing this process started outlives a killed rank."""
    _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


class HttpSource:
    def __init__(self, url: str, offset: int, timeout: float):
        headers = {"User-Agent": "monofusion"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        self.timeout = timeout
        try:
            self.response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as e:
            e.close()
            raise AttemptFailed(f"HTTP {e.code}", permanent=e.code in PERMANENT_HTTP,
                                restart=e.code == 416) from None  # 416: the file is not as long as the bytes held
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise Stalled(f"no answer in {timeout:g} s (data.read_timeout)") from None
            raise AttemptFailed(str(e.reason)) from None
        except TimeoutError:
            raise Stalled(f"no answer in {timeout:g} s (data.read_timeout)") from None
        except (OSError, http.client.HTTPException) as e:
            raise AttemptFailed(f"{type(e).__name__}: {e}") from None
        self.start, self.total = 0, None
        if self.response.status == 206:
            m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", self.response.headers.get("Content-Range", ""))
            if m is None or int(m.group(1)) != offset:
                self.close()
                raise AttemptFailed(f"answered a range request with Content-Range "
                                    f"{self.response.headers.get('Content-Range')!r}")
            self.start, self.total = offset, (int(m.group(2)) if m.group(2) != "*" else None)
        elif (length := self.response.headers.get("Content-Length", "")).isdigit():
            self.total = int(length)

    def read(self) -> bytes:
        """The next bytes of the body; b"" at its complete end."""
        try:
            chunk = self.response.read1(CHUNK)
        except TimeoutError:
            raise Stalled(f"no byte for {self.timeout:g} s (data.read_timeout)") from None
        except (OSError, http.client.HTTPException) as e:
            raise AttemptFailed(f"{type(e).__name__}: {e}") from None
        if not chunk and self.response.length:  # Content-Length said more was coming
            raise AttemptFailed(f"connection closed {self.response.length} bytes before the end")
        return chunk

    def close(self) -> None:
        self.response.close()


class PipeSource:
    def __init__(self, command: str, timeout: float):
        self.timeout, self.start, self.total, self.stderr = timeout, 0, None, b""
        # The outer shell gets the death signal (TERM) and passes it to the whole process group as KILL:
        # the command, its pipeline and its children (setpriv marks only the process it starts).
        argv = ["/bin/sh", "-c", 'trap "kill -KILL 0" TERM; /bin/sh -c "$1" & wait $!', "sh", command]
        self.process = subprocess.Popen([SETPRIV, "--pdeathsig", "TERM", "--", *argv] if SETPRIV else argv,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        process_group=0,
                                        preexec_fn=None if SETPRIV else functools.partial(die_with_parent, signal.SIGTERM))
        self.open = {self.process.stdout.fileno(), self.process.stderr.fileno()}

    def _wait(self, deadline: float) -> Optional[int]:
        """Read stderr until stdout is ready or at its end; the fd that became ready, None at the deadline.
        (poll, not select: a rank of a large job may hold more than select's 1024 descriptors.)"""
        out, err = self.process.stdout.fileno(), self.process.stderr.fileno()
        while self.open:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            poller = select.poll()
            for fd in self.open:
                poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            ready = {fd for fd, _ in poller.poll(left * 1000)}
            if err in ready:
                data = os.read(err, 65536)
                self.stderr = (self.stderr + data)[-4096:]
                if not data:
                    self.open.discard(err)
            if out in ready:
                return out
        return -1

    def read(self) -> bytes:
        out = self.process.stdout.fileno()
        if out in self.open:
            if self._wait(time.monotonic() + self.timeout) is None:
                raise Stalled(f"no byte for {self.timeout:g} s (data.read_timeout)")
            chunk = os.read(out, CHUNK) if out in self.open else b""
            if chunk:
                return chunk
            self.open.discard(out)
        if self._wait(time.monotonic() + self.timeout) is None:  # stderr to its end
            raise Stalled(f"output ended but the command did not exit in {self.timeout:g} s")
        try:
            status = self.process.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise Stalled(f"output ended but the command did not exit in {self.timeout:g} s") from None
        if status != 0:
            said = self.stderr.decode(errors="replace").strip().splitlines()
            raise AttemptFailed(f"exit status {status}" + (f" ({said[-1]})" if said else ""))
        return b""

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
        self.process.stdout.close()
        self.process.stderr.close()


def open_source(where: str, offset: int, timeout: float):
    """An attempt at reading `where` (a URL or a pipe: command) from byte `offset`."""
    if is_http(where):
        return HttpSource(where, offset, timeout)
    if where.startswith("pipe:"):
        return PipeSource(where[len("pipe:"):], timeout)
    raise ValueError(f"{where}: not a remote location")
