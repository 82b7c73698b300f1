"""One loader slot: reads its share of every dataset, mixes, lays out, packs, yields batches.

A slot is one (rank, worker) pair. Its whole state is small and JSON-able — cursors into
the global order (see `order.py`), the ids of the documents it holds in its packing buffer,
a mixture draw counter and a batch counter — so a resumed slot re-reads its buffer and
continues with the same batches. All randomness (mixture, caption dropout, image first, timesteps) is a
hash of the seed and stable ids, never a generator state.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from typing import Callable, Iterator, Optional, Union

from data_pipelines.config import DataConfig
from data_pipelines.mixture import accrue, pick
from data_pipelines.documents import best_fit, build_document, stateless_uniform, text_chunk, timestep_generator
from data_pipelines.order import Dealing, DatasetOrder
from data_pipelines.prefetch import ShardPrefetcher
from data_pipelines.shards import BadSample, Manifest, decode_sample, open_shard
from data_pipelines.tar_index import TarShard
from data_pipelines.transport.locations import is_remote
from data_pipelines.transport.policy import ReadPolicy, ReadStats, RemoteError, TooLarge
from model.diffusion import Diffusion, assign_timesteps
from model.layout import DocLayout, LayoutSpec, pack_rows

log = logging.getLogger(__name__)
MIX, DROP, TIMESTEP, IMAGE_FIRST = 1, 2, 3, 4  # hash domains
MIN_SPLIT = 8  # a text document is split to fill a row only if at least this many tokens fit
LEDGER = ("documents", "text_tokens", "latent_tokens")  # what a slot counts per dataset it hands out (loss tokens)


class DataError(RuntimeError):
    """The data cannot be streamed (too many bad samples, mismatched state); names the culprit."""


@dataclasses.dataclass
class Dataset:
    """A shard set as one slot sees it: its manifest (and where it is), its order, how it is dealt,
    what is consumed."""
    manifest: Manifest
    role: str
    image_first: float  # probability of laying a sample out image first (image-to-text)
    order: DatasetOrder
    dealing: Dealing
    base: dict  # epoch -> Intervals of consumed positions
    partial: dict  # (epoch, position) -> first token not yet emitted of a half-emitted text document


class ShardCursor:
    """Pulls a slot's positions of one dataset in order (group by group) and fetches their samples."""

    def __init__(self, ds: Dataset, slot: int, cfg: DataConfig, stats: ReadStats, cursor: tuple[int, int] = (0, 0)):
        self.ds, self.slot, self.cfg, self.stats = ds, slot, cfg, stats
        self.policy = ReadPolicy.from_config(cfg)
        self.g, self.q = cursor
        self._rest: Optional[tuple] = None
        self._cache: collections.OrderedDict[int, TarShard] = collections.OrderedDict()
        self._group_shards = ds.dealing.group_shards(slot, self.g)  # the cache keeps these, and one more
        self.prefetch = ShardPrefetcher(ds.manifest, self.policy) if is_remote(ds.manifest.root) else None
        self._ahead()

    def _ahead(self) -> None:
        """Have the prefetcher download the group's shards not yet here, then the next group's (only those
        with positions left to read: after a resume on another layout, some are consumed whole)."""
        if self.prefetch is not None:
            dealing, base = self.ds.dealing, self.ds.base
            now, ahead = (dealing.group_shards(self.slot, g, base) for g in (self.g, self.g + 1))
            self.prefetch.want([s for s in now if s not in self._cache] + [s for s in ahead if s not in now])

    def pull(self) -> Optional[tuple[int, int]]:
        """Next (epoch, position) of this slot, or None when its epochs are done."""
        dealing = self.ds.dealing
        while not dealing.group_exhausted(self.slot, self.g):
            if self._rest is None:
                self._rest = dealing.remaining(self.slot, self.g, self.ds.base)
            epochs, positions = self._rest
            if self.q < len(positions):
                self.q += 1
                return int(epochs[self.q - 1]), int(positions[self.q - 1])
            self.g, self.q, self._rest = self.g + 1, 0, None
            self._group_shards = dealing.group_shards(self.slot, self.g)
            self._ahead()
        return None

    def fetch(self, e: int, p: int) -> tuple[str, list[dict]]:
        """(key, decoded segments) of position p of epoch e; BadSample names shard and key; DataError
        for a shard that cannot be read (missing, unreachable, too large, not matching its sha256)."""
        shard, index = self.ds.order.locate(e, p)
        if shard in self._cache:
            self._cache.move_to_end(shard)
        else:
            # the group's shards and one more (for a document of the packing buffer) stay; least recently
            # used out, shards outside the group first
            while len(self._cache) > len(self._group_shards):
                drop = next((k for k in self._cache if k not in self._group_shards), next(iter(self._cache)))
                self._cache.pop(drop).close()
            try:
                got = self.prefetch.take(shard) if self.prefetch is not None else None
                if got is None:  # (not `or`: a shard of no readable sample is empty, and so false)
                    got = open_shard(self.ds.manifest, shard, self.policy, self.stats)
                self._cache[shard] = got
            except (RemoteError, TooLarge) as err:  # their message names the shard
                raise DataError(str(err)) from None
            except (OSError, ValueError) as err:  # a missing local file, a URL urllib refuses, ...
                why = getattr(err, "strerror", None) or f"{type(err).__name__}: {err}"
                raise DataError(f"{self.ds.manifest.shard_path(shard)}: {why}") from None
        tar = self._cache[shard]
        if index >= len(tar):
            raise BadSample(f"{tar.name}: sample {index} unreadable ({tar.error or 'missing'})")
        key, files = tar.sample(index)
        return key, decode_sample(key, files, tar.name)

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()
        while self._cache:
            self._cache.popitem()[1].close()


@dataclasses.dataclass
class Entry:
    """A document waiting in the packing buffer: text from token `start` on, or a whole layout."""
    dataset: int
    epoch: int
    position: int
    key: str
    doc: Union[list[int], DocLayout]
    start: int = 0

    @property
    def splittable(self) -> bool:
        return isinstance(self.doc, list)

    def __len__(self) -> int:
        return len(self.doc) - self.start

    @functools.cached_property
    def layout_loss_tokens(self) -> int:
        """(a document with latents, which is never split) its text and latent loss tokens, summed once:
        the controller counts the buffer at every read"""
        return int(self.doc.text_loss.sum()) + int(self.doc.latent_loss.sum())


class Slot:
    def __init__(self, datasets: list[Dataset], cfg: DataConfig, spec: LayoutSpec, diffusion: Diffusion,
                 batch_size: int, slot: int, weights: Callable[[int], list[float]], state: Optional[dict] = None,
                 steps: tuple[int, int, int, int] = (1, 1, 0, 0)):
        """`weights`: the datasets' weights at an optimizer step; `steps`: (slots of a rank, batches a rank
        takes per optimizer step, the step the loaded state was saved at, this slot's place in its rank's
        round robin now), which tell the step of this slot's next batch."""
        self.datasets, self.cfg, self.spec, self.diffusion = datasets, cfg, spec, diffusion
        self.batch_size, self.slot, self.weights, self.steps = batch_size, slot, weights, steps
        self.slots = datasets[0].dealing.slots
        state = state or unstarted_state(slot, len(datasets))
        self.batches = state.get("batches", 0)
        self.mix = state.get("mix", 0)
        self.bad = state.get("bad", 0)
        self.oversize = state.get("oversize", 0)
        self.oversize_run = 0  # consecutive oversize skips: a dataset of nothing else must not spin forever
        self.done = list(state.get("done", [False] * len(datasets)))
        self.ledger = [list(x) for x in state.get("ledger", [[0, 0, 0]] * len(datasets))]  # LEDGER per dataset
        # per dataset, the loss tokens the weights asked of the slot's batches so far (mix_by tokens; a state
        # saved before it: what was handed out)
        self.target = list(state.get("target") or [float(c[1] + c[2]) for c in self.ledger])
        # (step, batches, place in the round robin) from which this slot counts its steps; without one (a new
        # slot, a new rate, a state saved before schedules) it counts from the saved step
        self.origin = list(state.get("origin") or [steps[2], self.batches, steps[3]])
        self.origin += [0] * (3 - len(self.origin))
        self.reads = ReadStats.from_state(state)
        cursors = state.get("cursors", [[0, 0]] * len(datasets))
        self.cursors = [ShardCursor(ds, slot, cfg, self.reads, tuple(c)) for ds, c in zip(datasets, cursors)]
        self.buffer: list[Entry] = []
        self._restore = state.get("buffer", [])

    def state(self) -> dict:
        reads = self.reads.to_state()
        for c in self.cursors:  # and what the prefetch threads counted
            for k, v in (c.prefetch.stats.to_state().items() if c.prefetch is not None else ()):
                reads[k] += v
        return {"slot": self.slot, "batches": self.batches, "mix": self.mix, "bad": self.bad,
                "oversize": self.oversize, **reads, "done": list(self.done), "ledger": [list(x) for x in self.ledger],
                "target": list(self.target), "origin": list(self.origin),
                "cursors": [[c.g, c.q] for c in self.cursors],
                "buffer": [[x.dataset, x.epoch, x.position, x.start] for x in self.buffer]}

    def _document(self, d: int, e: int, p: int) -> Optional[tuple[str, Union[list[int], DocLayout]]]:
        """(key, document) of a position, or None for a counted skip (bad or oversized sample)."""
        ds = self.datasets[d]
        try:
            key, segments = self.cursors[d].fetch(e, p)
        except BadSample as err:
            self.bad += 1
            log.warning("skipping bad sample (%d so far): %s", self.bad, err)
            if self.bad > self.cfg.max_bad_samples:
                raise DataError(f"more than data.max_bad_samples={self.cfg.max_bad_samples} bad samples; "
                                f"last: {err}") from None
            return None
        drop = stateless_uniform(self.cfg.seed, DROP, d, e, p) < self.cfg.caption_dropout
        first = stateless_uniform(self.cfg.seed, IMAGE_FIRST, d, e, p) < ds.image_first
        doc = build_document(segments, self.spec, ds.role, drop, self.cfg.add_bos_eos, first)
        if not isinstance(doc, list) and len(doc) > self.cfg.seq_len:
            self.oversize += 1
            self.oversize_run += 1
            log.warning("skipping %s: %d tokens with latents, more than data.seq_len=%d (%d so far)",
                        key, len(doc), self.cfg.seq_len, self.oversize)
            if self.oversize_run > self.cfg.max_bad_samples:
                raise DataError(f"{self.oversize_run} documents in a row do not fit data.seq_len="
                                f"{self.cfg.seq_len} (last: {key}, {len(doc)} tokens with latents in "
                                f"{ds.manifest.root}); raise data.seq_len")
            return None
        self.oversize_run = 0
        return key, doc

    def _pull(self) -> bool:
        """Pull one document into the buffer; False when every dataset is done."""
        while not all(self.done):
            weights = self._weights()
            if not any(weights):  # the datasets left all weigh 0 now
                return False
            u = stateless_uniform(self.cfg.seed, MIX, self.slots, self.slot, self.mix)
            d = pick(weights, self._owed(weights) if self.cfg.mix_by == "tokens" else None, u)
            self.mix += 1
            pos = self.cursors[d].pull()
            if pos is None:
                self.done[d] = True
                continue
            got = self._document(d, *pos)
            if got is not None:
                self.buffer.append(Entry(d, *pos, *got, start=self.datasets[d].partial.get(pos, 0)))
                return True
        return False

    def _weights(self) -> list[float]:
        """The datasets' weights at the step of the batch being made (0 for those done)."""
        workers, per_step = self.steps[:2]
        step = self.origin[0] + ((self.batches - self.origin[1]) * workers + self.origin[2]) // per_step
        return [0.0 if done else w for w, done in zip(self.weights(step), self.done)]

    def _owed(self, weights: list[float]) -> list[float]:
        """Per dataset, the loss tokens the slot is behind its target, its buffered documents counted as
        handed out now (so a weight that changes is met once the buffer is through, whatever its order)."""
        buffered = [0] * len(self.datasets)
        for x in self.buffer:
            buffered[x.dataset] += loss_tokens(x)
        total, pending = sum(weights), sum(buffered)
        return [t + w / total * pending - c[1] - c[2] - b
                for t, w, c, b in zip(self.target, weights, self.ledger, buffered)]

    def _restore_buffer(self) -> None:
        for d, e, p, start in self._restore:
            got = self._document(d, e, p)
            if got is None or start >= max(1, len(got[1])):
                raise DataError(f"cannot restore buffered document {(d, e, p, start)} of dataset "
                                f"{self.datasets[d].manifest.root}: the shards changed since the checkpoint")
            self.buffer.append(Entry(d, e, p, *got, start=start))
        self._restore = []

    def _row(self) -> tuple[list[DocLayout], list[str], list[int]]:
        """Take one row's documents out of the buffer (best fit; text may be split to fill it): their
        layouts, keys (text: with the token range) and datasets."""
        chosen = best_fit([len(x) for x in self.buffer], self.cfg.seq_len)
        takes = {i: min(len(self.buffer[i]), self.cfg.seq_len) for i in chosen}
        room = self.cfg.seq_len - sum(takes.values())
        if room >= MIN_SPLIT:  # fill the rest with the head of the oldest text document left
            i = next((i for i, x in enumerate(self.buffer) if i not in takes and x.splittable), None)
            if i is not None:
                takes[i] = room
        layouts, keys, tokens = [], [], 0
        sets = [self.buffer[i].dataset for i in sorted(takes)]
        for i in sorted(takes):
            x, n = self.buffer[i], takes[i]
            layouts.append(text_chunk(x.doc, x.start, x.start + n, self.spec) if x.splittable else x.doc)
            keys.append(f"{x.key}@{x.start}:{x.start + n}" if x.splittable else x.key)
            x.start += n
            counts = self.ledger[x.dataset]
            counts[0] += len(x) == 0  # a document counts when its last piece is handed out
            counts[1] += int(layouts[-1].text_loss.sum())
            counts[2] += int(layouts[-1].latent_loss.sum())
            tokens += int(layouts[-1].text_loss.sum()) + int(layouts[-1].latent_loss.sum())
        accrue(self.target, self._weights(), tokens)
        self.buffer = [x for x in self.buffer if len(x) > 0]
        return layouts, keys, sets

    def __iter__(self) -> Iterator[tuple]:
        """Yields (PackedBatch, slot state after it, keys of the documents in it, their datasets)."""
        try:
            yield from self._batches()
        finally:
            for cursor in self.cursors:
                cursor.close()

    def _batches(self) -> Iterator[tuple]:
        self._restore_buffer()
        while True:
            rows, keys, sets = [], [], []
            for _ in range(self.batch_size):
                while len(self.buffer) < self.cfg.pack_buffer and self._pull():
                    pass
                if not self.buffer:
                    break
                layouts, row_keys, row_sets = self._row()
                rows.append(layouts)
                keys.append(row_keys)
                sets.append(row_sets)
            if not rows:
                return
            batch = pack_rows(rows, self.cfg.seq_len)
            gen = timestep_generator(self.cfg.seed, TIMESTEP, self.slots, self.slot, self.batches)
            batch = assign_timesteps(batch, self.diffusion, gen)
            self.batches += 1
            yield batch, self.state(), keys, sets


def unstarted_state(slot: int, num_datasets: int) -> dict:
    """The state of a slot that has handed out no batch: at the start of its share (cursors (0, 0))."""
    return {"slot": slot, "batches": 0, "mix": 0, "bad": 0, "oversize": 0, **ReadStats().to_state(),
            "done": [False] * num_datasets,
            "cursors": [[0, 0]] * num_datasets, "buffer": []}


def loss_tokens(entry: Entry) -> int:
    """The loss tokens a buffered document brings (text targets + latent loss tokens; for text, its
    tokens left but the last)."""
    if entry.splittable:
        return max(len(entry) - 1, 1)
    return max(entry.layout_loss_tokens, 1)
