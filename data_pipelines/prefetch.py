"""Downloads the remote shards a reader will need next, in a thread, while it reads the ones it has.

A reader slot fetches a shard when its group first needs it; for a remote shard set that means a
pause of a whole download at every group (F shards at once). `ShardPrefetcher.want(shards)` queues
the shards of the group ahead; one thread downloads them in order (`open_shard`: retried, checked,
spilled to disk) and `take(shard)` hands one over — at once when done, after a wait while it is
downloading, or None when it was not started (the caller fetches it itself). A download that failed
raises its error when its shard is taken, so a failure surfaces where the data is needed. Spill files
of shards not taken are closed by `close()`.
"""
from __future__ import annotations

import threading
from typing import Optional, Union

from data_pipelines.shards import Manifest, open_shard
from data_pipelines.tar_index import TarShard
from data_pipelines.transport.policy import ReadPolicy, ReadStats


class ShardPrefetcher:
    def __init__(self, manifest: Manifest, policy: ReadPolicy):
        self.manifest, self.policy = manifest, policy
        self.stats = ReadStats()  # this thread's counts (the slot adds them to its own)
        self.cond = threading.Condition()
        self.queue: list[int] = []
        self.ready: dict[int, Union[TarShard, Exception]] = {}
        self.busy: Optional[int] = None
        self.closed = False
        self.thread: Optional[threading.Thread] = None

    def want(self, shards) -> None:
        """Download these shards next (in this order), instead of any queued before; downloaded shards
        no longer wanted are dropped."""
        shards = list(shards)
        with self.cond:
            for s in [s for s in self.ready if s not in shards]:
                got = self.ready.pop(s)
                if isinstance(got, TarShard):
                    got.close()
            self.queue = [s for s in shards if s not in self.ready and s != self.busy]
            if self.queue and self.thread is None:
                self.thread = threading.Thread(target=self._run, name="shard-prefetch", daemon=True)
                self.thread.start()
            self.cond.notify_all()

    def take(self, shard: int) -> Optional[TarShard]:
        """The shard if it was downloaded or is being downloaded (waits for it), else None."""
        with self.cond:
            if shard in self.queue:
                self.queue.remove(shard)
            while self.busy == shard:
                self.cond.wait()
            got = self.ready.pop(shard, None)
        if isinstance(got, Exception):
            raise got
        return got

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                shard = self.busy = self.queue.pop(0)
            try:
                got: Union[TarShard, Exception] = open_shard(self.manifest, shard, self.policy, self.stats)
            except Exception as e:  # raised in the reader when it takes this shard
                got = e
            with self.cond:
                self.busy = None
                if self.closed:
                    if isinstance(got, TarShard):
                        got.close()
                    return
                self.ready[shard] = got
                self.cond.notify_all()

    def close(self) -> None:
        """Stop after the download under way (whose shard is then dropped); close what was not taken."""
        with self.cond:
            self.closed = True
            for got in self.ready.values():
                if isinstance(got, TarShard):
                    got.close()
            self.ready.clear()
            self.cond.notify_all()
