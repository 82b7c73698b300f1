"""How hard a remote read tries (ReadPolicy), what it counts (ReadStats), and how it fails.

A read that fails is retried after a backoff that doubles from `backoff` up to `backoff_max`, each
delay drawn in [d/2, d] (jitter: a thousand readers that failed together do not retry together),
until `retry_budget` seconds have passed since the read's first failure. A permanent failure (HTTP 404, 403,
401, 410; a file whose bytes do not match its sha256) is checked once more, then final.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Optional

PERMANENT_HTTP = (401, 403, 404, 410)


@dataclasses.dataclass(frozen=True)
class ReadPolicy:
    read_timeout: float = 60.0      # seconds without a byte (or below min_speed) before a read is aborted
    min_speed: float = 0.0          # bytes/s a transfer must keep up over each read_timeout window (0: any byte)
    retry_budget: float = 300.0     # seconds from a read's first failure until it gives up
    backoff: float = 0.5            # seconds before the first retry
    backoff_max: float = 30.0       # cap of the doubling backoff
    max_bytes: int = 0              # a larger file is refused at once (0: no limit)
    spill_dir: str = ""             # where downloaded shards wait to be read ("" = the system's temp dir)

    @classmethod
    def from_config(cls, cfg) -> "ReadPolicy":
        """The policy of a DataConfig."""
        return cls(cfg.read_timeout, cfg.min_read_speed, cfg.retry_budget, cfg.retry_backoff, cfg.retry_backoff_max,
                   cfg.max_shard_bytes, cfg.spill_dir)

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before retry `attempt` (0 = the first retry)."""
        d = min(self.backoff_max, self.backoff * 2 ** min(attempt, 30))
        return d * rng.uniform(0.5, 1.0)


@dataclasses.dataclass
class ReadStats:
    """Counters of one reader: retries (any failed attempt retried), stalls (attempts aborted for no
    progress), resumes (attempts that continued a broken transfer by a Range request)."""
    retries: int = 0
    stalls: int = 0
    resumes: int = 0

    FIELDS = ("retries", "stalls", "resumes")

    @classmethod
    def from_state(cls, state: Optional[dict]) -> "ReadStats":
        state = state or {}
        return cls(*(int(state.get(k, 0)) for k in cls.FIELDS))

    def to_state(self) -> dict:
        return {k: getattr(self, k) for k in self.FIELDS}


class AttemptFailed(OSError):
    """One attempt at a read failed; `permanent` when retrying cannot help (after one check)."""

    def __init__(self, reason: str, permanent: bool = False, restart: bool = False):
        super().__init__(reason)
        self.reason, self.permanent, self.restart = reason, permanent, restart  # restart: drop the bytes held


class Stalled(AttemptFailed):
    """An attempt made no progress for data.read_timeout seconds (or kept below data.min_read_speed)."""


class RemoteError(OSError):
    """A file that could not be read within the retry budget; the message names it and why."""


class ChecksumError(RemoteError):
    """A file whose bytes, read whole, do not match the manifest's sha256 (also after a re-read)."""


class TooLarge(ValueError):
    """A file larger than data.max_shard_bytes (not retried)."""
