"""How one rank's failure to read its data stops every rank, each with one line.

A rank holds a loader failure (`next_batch`) until the next collective that carries a failure flag;
then `stop_if_any_failed` raises on every rank: the failed rank its own error, the others `PeerFailed`
naming it. So no rank is left waiting in a collective for a rank that is gone.
"""
from __future__ import annotations

import sys
from typing import Optional

from data_pipelines.slot import DataError
from pretrain.distributed import DistInfo, all_gather_objects, any_rank


class PeerFailed(DataError):
    """Another rank could not read its data (it says why); this rank stops with it."""


def next_batch(batches) -> tuple[Optional[object], Optional[BaseException]]:
    """(the next batch or None at the end, the error that took its place: the run stops on it)."""
    try:
        return next(batches, None), None
    except Exception as e:  # any loader failure stops every rank at the next collective
        return None, e


def stop_if_any_failed(dist: DistInfo, error: Optional[BaseException], known: bool = False) -> None:
    """Raise on every rank when any rank's `error` is not None: that rank's own error (a DataError is
    its one line), PeerFailed naming the failed rank on the others. `known`: every rank already knows
    that some rank failed (else one flag is all-reduced first)."""
    if dist.world_size == 1 or not (known or any_rank(error is not None, dist.control_group)):
        if error is not None:
            raise error
        return
    said = all_gather_objects(None if error is None else f"{type(error).__name__}: {error}", dist.control_group)
    if error is not None:
        raise error
    failed = [r for r, e in enumerate(said) if e is not None]
    raise PeerFailed(f"stopping: rank {failed[0]} could not read its data" +
                     (f" (and ranks {failed[1:]})" if len(failed) > 1 else "") + "; its error is in its log")


def say_error(line: str) -> None:
    """One line on stderr in one write: ranks sharing a launcher's stderr do not interleave it."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
