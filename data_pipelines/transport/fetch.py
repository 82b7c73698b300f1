"""A whole remote file, however the network behaves: `download(where, out, policy, stats, sha256)`.

Each attempt reads from the first byte not yet held: a server that answers the Range request
continues the transfer (counted as a resume), otherwise the bytes already held are read again and
skipped. An attempt that fails (connection refused or cut, HTTP 5xx, a command's non-zero exit, no
byte for data.read_timeout, slower than data.min_read_speed) is retried after a jittered backoff
until data.retry_budget seconds have passed since the read's first failure; a permanent failure
(HTTP 404/403/401/410, a sha256 mismatch of a complete read) is checked once more, then final.
The bytes are hashed as they arrive and written once, to `out`: a spill file (`spill_file`), so a
shard's bytes are held once, on disk, not in memory.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import tempfile
import time
from typing import BinaryIO, Callable, Optional

from data_pipelines.transport.policy import (AttemptFailed, ChecksumError, ReadPolicy, ReadStats, RemoteError,
                                             Stalled, TooLarge)
from data_pipelines.transport.sources import open_source

log = logging.getLogger(__name__)


class _Attempt:
    """Appends one attempt's body to `out` from byte `held` on; checks size and speed."""

    def __init__(self, where: str, out: BinaryIO, digest, held: int, policy: ReadPolicy):
        self.where, self.out, self.digest, self.held, self.policy = where, out, digest, held, policy

    def run(self, source) -> None:
        p = self.policy
        if p.max_bytes and source.total is not None and source.total > p.max_bytes:
            raise TooLarge(f"{self.where}: {source.total} bytes, larger than data.max_shard_bytes={p.max_bytes} "
                           "(write smaller shards or raise the limit)")
        skip = self.held - source.start  # bytes of this body already held (the server ignored the range)
        window_start, window_bytes = time.monotonic(), 0
        floor = p.min_speed * p.read_timeout
        while chunk := source.read():
            if skip > 0:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            self.out.write(chunk)
            self.digest.update(chunk)
            self.held += len(chunk)
            if p.max_bytes and self.held > p.max_bytes:
                raise TooLarge(f"{self.where}: larger than data.max_shard_bytes={p.max_bytes} "
                               "(write smaller shards or raise the limit)")
            window_bytes += len(chunk)
            now = time.monotonic()
            if now - window_start >= p.read_timeout:
                if window_bytes < floor:
                    raise Stalled(f"{window_bytes / (now - window_start):.0f} bytes/s, below "
                                  f"data.min_read_speed={p.min_speed:g}")
                window_start, window_bytes = now, 0


def _restart(out: BinaryIO):
    """Empty `out`; a fresh digest."""
    out.seek(0)
    out.truncate()
    return hashlib.sha256()


def download(where: str, out: BinaryIO, policy: ReadPolicy, stats: Optional[ReadStats] = None,
             sha256: Optional[str] = None, sleep: Callable[[float], None] = time.sleep) -> int:
    """Read the file at `where` (a URL or pipe: command) whole into the empty file `out`; returns its
    size. RemoteError (ChecksumError) naming `where` and the reason once the retries are spent,
    TooLarge at once for a file over policy.max_bytes."""
    stats = stats if stats is not None else ReadStats()
    rng = random.Random(hash((os.getpid(), where, time.time_ns())))
    digest, held, retry, first_failure = hashlib.sha256(), 0, 0, None
    checks = 0  # attempts that failed permanently
    while True:
        attempt = _Attempt(where, out, digest, held, policy)
        try:
            source = open_source(where, held, policy.read_timeout)
            try:
                if held and source.start == held:
                    stats.resumes += 1
                attempt.run(source)
            finally:
                source.close()
            if sha256 is None or digest.hexdigest() == sha256:
                out.flush()  # the last chunks may wait in the file's buffer: readers of its fd must see them
                return attempt.held
            failure = AttemptFailed(f"sha256 {digest.hexdigest()[:16]}... of {attempt.held} bytes, the manifest "
                                    f"says {sha256[:16]}...", permanent=True)
            digest, attempt.held = _restart(out), 0  # a complete but wrong read is not a prefix to keep
        except AttemptFailed as e:
            failure = e
            stats.stalls += isinstance(e, Stalled)
            if e.restart:
                digest, attempt.held = _restart(out), 0
        held = attempt.held
        now = time.monotonic()
        first_failure = first_failure or now
        checks += failure.permanent
        delay = policy.delay(retry, rng)
        spent = now - first_failure
        if checks > 1 or spent + delay > policy.retry_budget:
            why = "after a second check" if checks > 1 else \
                f"after {retry} retries in {spent:.0f} s (data.retry_budget={policy.retry_budget:g})"
            error = ChecksumError if failure.reason.startswith("sha256") else RemoteError
            raise error(f"{where}: {failure.reason}, {why}")
        retry += 1
        stats.retries += 1
        log.warning("%s: %s; retry %d in %.1f s (%.0f s of data.retry_budget left)", where, failure.reason, retry,
                    delay, policy.retry_budget - spent)
        sleep(delay)


def spill_file(policy: ReadPolicy) -> BinaryIO:
    """An unnamed temporary file in policy.spill_dir: it takes no name on disk, and its space is given
    back when it is closed or this process ends, however it ends."""
    directory = policy.spill_dir or None
    if directory:
        os.makedirs(directory, exist_ok=True)
    return tempfile.TemporaryFile(dir=directory)


def download_bytes(where: str, policy: ReadPolicy, stats: Optional[ReadStats] = None) -> bytes:
    """A small remote file (a manifest) in memory."""
    out = io.BytesIO()
    download(where, out, policy, stats)
    return out.getvalue()
