"""Where shards live: a local folder, an http(s):// URL prefix, or a `pipe:` command template.

    runs/data/digits                                   a folder: FOLDER/manifest.json, FOLDER/shard-000000.tar
    https://example.org/data/digits                    URL/manifest.json, URL/shard-000000.tar
    pipe:aws s3 cp s3://bucket/digits/{shard} -        the command's stdout; {shard} = manifest.json, shard-...

Reading goes through webdataset's `gopen`: a local file directly, a URL as
`pipe:curl -f -s -S -L URL` (curl's own retries off: ours are counted), a command as itself.
`read_bytes` reads a whole file with up to `retries` retries and exponential backoff; a read
that breaks off is read again and the bytes already held are skipped (not every server answers
range requests), so no sample is read twice or lost; a file larger than `max_bytes` is an
error; with `sha256`, a file whose bytes do not match is read again, and after the last retry
returned as it is (the tar reader then counts its damaged samples as bad). Retries are counted
in `RETRIES` and logged with the location.
"""
from __future__ import annotations

import hashlib
import logging
import re
import shlex
import time
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)
RETRIES = {"count": 0}  # retries of this process (a reader slot reports them in its state)


class RemoteError(OSError):
    """A file that could not be read after the retries; names its location."""


def is_remote(root: str) -> bool:
    return str(root).startswith(("http://", "https://", "pipe:"))


def location(root: str, name: str) -> str:
    """The location of file `name` of a shard set at `root` (folder, URL prefix or pipe template)."""
    root = str(root)
    if root.startswith("pipe:"):
        if "{shard}" not in root:
            raise ValueError(f"{root}: a pipe: path needs {{shard}} where the file name goes")
        return root.replace("{shard}", shlex.quote(name))
    if root.startswith(("http://", "https://")):
        return root.rstrip("/") + "/" + name
    return str(Path(root) / name)


def _open(where: str):
    from webdataset.gopen import gopen
    if where.startswith(("http://", "https://")):
        return gopen("pipe:" + shlex.join(["curl", "-f", "-s", "-S", "-L", "--connect-timeout", "10", where]))
    return gopen(where)  # pipe: commands, local files


def read_bytes(where: str, max_bytes: int = 0, retries: int = 5, backoff: float = 0.5,
               sha256: Optional[str] = None, sleep: Callable[[float], None] = time.sleep) -> bytes:
    """The whole file at `where` (see the module doc). FileNotFoundError for a missing local file,
    RemoteError once the retries are spent, ValueError for a file over `max_bytes` (0 = no limit)."""
    data = bytearray()
    attempt = 0
    while True:
        error, whole = None, False
        too_big = False
        try:
            stream = _open(where)
            try:
                skip = len(data)  # the bytes already held, read again
                while chunk := stream.read(1 << 20):
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    data += chunk
                    if max_bytes and len(data) > max_bytes:
                        too_big = True
                        break
            finally:
                try:
                    stream.close()  # a pipe's close raises when its command failed
                except (OSError, EOFError):
                    if not too_big:  # a command stopped early (curl: exit 23) is not a read error
                        raise
            if too_big:
                raise ValueError(f"{where}: larger than data.max_shard_bytes={max_bytes} "
                                 "(write smaller shards or raise the limit)")
            whole = True
            if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
                error = f"sha256 mismatch after {len(data)} bytes (cut short?)"
        except FileNotFoundError:
            if not is_remote(where):
                raise
            error = "not found"
        except (OSError, EOFError) as e:
            status = re.search(r"exit (\d+)", str(e))  # webdataset's Pipe names the command's exit status
            error = f"exit status {status.group(1)}" if status else (str(e).splitlines() or [type(e).__name__])[0]
        if error is None:
            return bytes(data)
        if attempt >= retries:
            if whole:  # read to its end, but damaged: the tar reader counts what it cannot read
                log.warning("%s: %s after %d retries; reading what it holds", where, error, retries)
                return bytes(data)
            raise RemoteError(f"{where}: unreadable after {retries} retries ({error})")
        attempt += 1
        RETRIES["count"] += 1
        log.warning("%s: %s; retry %d of %d", where, error, attempt, retries)
        if whole:
            data.clear()  # a complete but wrong read is not a prefix to keep
        sleep(backoff * 2 ** (attempt - 1))


class FolderServer:
    """A threaded HTTP server over a local folder on 127.0.0.1 (the standard library's), for tests and
    benchmarks that read shards over HTTP; `stop` and `start` again keep its port. `outage=(n, s)`:
    after the n-th request for a .tar file the server stops, and starts again s seconds later. Serve
    to other processes, or to a loader without workers: forked DataLoader workers of this process
    have hung on its requests (bench/data_throughput.py runs `python -m http.server` instead)."""

    def __init__(self, root: str | Path, port: int = 0, outage: Optional[tuple[int, float]] = None):
        self.root, self.port, self.httpd = Path(root), port, None
        self.outage, self.tar_requests = outage, 0
        self.start()

    def start(self) -> None:
        import functools
        import http.server
        import threading
        server = self

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path.endswith(".tar"):
                    server.tar_requests += 1
                    if server.outage and server.tar_requests == server.outage[0]:
                        threading.Thread(target=server._outage, daemon=True).start()
                        return  # this request gets no answer: the connection closes
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port),
                                                     functools.partial(Quiet, directory=str(self.root)))
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _outage(self) -> None:
        self.stop()
        time.sleep(self.outage[1])
        self.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"
