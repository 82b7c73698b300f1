"""PackedLoader: streams packed batches from WebDataset shards on every rank, resumably.

    loader = PackedLoader(data_cfg, model_cfg, batch_size=4, rank=r, world_size=w)
    for batch in loader: ...                       # PackedBatch
    local = loader.state_dict()                    # this rank's slots
    state = PackedLoader.merge_states(all_ranks)   # gathered by the trainer, saved once
    loader.load_state_dict(state)                  # same or another number of ranks/workers

Resumed with the same number of slots (ranks x workers, e.g. 2 x 1 or 1 x 2) and the same
data.shards_in_flight, every slot continues exactly (same batches).
Otherwise the slots' progress is folded into the consumed set of the global order and the
unseen samples are dealt to the new slots (none repeated, none skipped). A state whose
dataset fingerprints differ from the shards on disk is refused.
"""
from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import os
import signal
import time
from typing import Iterator, Optional

import torch

from data_pipelines import loader_state
from data_pipelines.config import DataConfig, DatasetConfig
from data_pipelines.loader_state import STATE_VERSION, dataset_record
from data_pipelines.mixture import weights_at
from data_pipelines.order import Dealing, DatasetOrder
from data_pipelines.shards import load_manifest
from data_pipelines.slot import LEDGER, DataError, Dataset, Slot, unstarted_state
from data_pipelines.transport.policy import ReadPolicy, ReadStats
from data_pipelines.transport.sources import die_with_parent
from model.diffusion import Diffusion
from model.layout import LayoutSpec

COUNTERS = ("bad", "oversize", *ReadStats.FIELDS)  # summed over slots by `counters()`
log = logging.getLogger(__name__)


class WorkerFailed:
    """What a slot hands out instead of a batch when its data cannot be read: the DataError's one line
    (raised again in the rank's main process, which then ends the workers)."""

    def __init__(self, message: str):
        self.message = message


def _init_worker(stop, parent: int, _worker_id: int) -> None:
    """DataLoader worker init. The worker dies with its rank (prctl), and leaves SIGUSR1/SIGUSR2 and
    Slurm's SIGTERM to the rank, which checkpoints and then stops the workers (Slurm signals every
    process of a job step, workers included); a SIGTERM of the loader's own shutdown (`stop` set) ends
    it at once, even in the middle of a read."""
    die_with_parent()
    if os.getppid() != parent:  # the rank died before the line above
        os._exit(1)
    for sig in (signal.SIGUSR1, signal.SIGUSR2):  # USR2: submitit's time-limit signal
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, functools.partial(_worker_sigterm, stop))


def _worker_sigterm(stop, _signum, _frame) -> None:
    if stop.value:
        os._exit(0)


_RUNNING: dict[int, tuple] = {}  # id -> (DataLoader iterator, stop event) of this process's live workers


def _end_workers(iterator, stop, graceful: bool, grace_s: float = 5.0) -> None:
    """End a DataLoader iterator's workers, however they are doing. graceful: torch's own shutdown first
    (workers between batches finish and exit); else (an error, the process exiting) at once. Then
    SIGTERM (which `stop` makes a worker obey) and, after `grace_s`, SIGKILL."""
    _RUNNING.pop(id(iterator), None)
    stop.value = 1
    workers = list(getattr(iterator, "_workers", []))
    if graceful:
        iterator._shutdown_workers()
    elif not getattr(iterator, "_shutdown", True):  # torch internals (torch pinned): what its shutdown does
        iterator._shutdown = True
        if iterator._worker_pids_set:
            torch.utils.data._utils.signal_handling._remove_worker_pids(id(iterator))
            iterator._worker_pids_set = False
        for q in iterator._index_queues:
            q.cancel_join_thread()
    for w in workers:
        if w.is_alive():
            os.kill(w.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for w in workers:
        w.join(max(0.0, deadline - time.monotonic()))
        if w.is_alive():
            os.kill(w.pid, signal.SIGKILL)
            w.join()


@atexit.register  # registered after torch's and multiprocessing's, so it runs before them: their exit
def _end_all_workers() -> None:  # handlers skip or hang on workers that ignore SIGTERM
    for iterator, stop in list(_RUNNING.values()):
        _end_workers(iterator, stop, graceful=False)


class _SlotStream(torch.utils.data.IterableDataset):
    """Runs, in DataLoader worker w, the slot self.assignment[w]; a DataError ends it with a WorkerFailed."""

    def __init__(self, loader: "PackedLoader", assignment: list[int]):
        self.loader, self.assignment = loader, assignment

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is not None:
            torch.set_num_threads(1)
        place = info.id if info is not None else 0  # (workers are asked in turn, from worker 0)
        try:
            yield from self.loader.make_slot(self.assignment[place], place)
        except DataError as e:
            yield WorkerFailed(str(e))


class PackedLoader:
    def __init__(self, cfg: DataConfig, model_cfg, batch_size: int, rank: int = 0, world_size: int = 1,
                 datasets: Optional[list[DatasetConfig]] = None, num_epochs: Optional[int] = None,
                 batches_per_step: int = 1):
        """`batches_per_step`: batches a rank takes per optimizer step (train.grad_accum), for data.schedule."""
        self.cfg, self.batch_size, self.batches_per_step = cfg, batch_size, batches_per_step
        self.rank, self.world_size = rank, world_size
        self.workers = max(1, cfg.num_workers)
        self.num_slots = world_size * self.workers
        self.num_epochs = cfg.num_epochs if num_epochs is None else num_epochs
        self.spec = LayoutSpec.from_model_config(model_cfg)
        self.diffusion = Diffusion(model_cfg)
        if datasets is not None:  # (evaluation) these sets, by their own weights: no training mixture
            self.cfg = cfg = cfg.replace(mix_by="documents", schedule=[])
        self.entries = list(cfg.datasets if datasets is None else datasets)
        self.start_step = 0  # the optimizer step of the loaded state (load_state_dict)
        self.legacy_mix = False  # a run whose state predates data.mix_by stays by documents
        if not self.entries:
            raise DataError("data.datasets: no dataset configured")
        try:
            self.manifests = [load_manifest(e.path, ReadPolicy.from_config(cfg)) for e in self.entries]
        except ValueError as e:  # not JSON, another format, edited by hand, too large, a malformed URL
            raise DataError(str(e)) from None
        for e, m in zip(self.entries, self.manifests):
            if m.latent_shapes and m.latent_channels != model_cfg.latent_channels:  # (a text-only set has none)
                raise DataError(f"{e.path}: latents have {m.latent_channels} channels, "
                                f"model.latent_channels is {model_cfg.latent_channels}")
            if m.resolution.get("patch_size", model_cfg.patch_size) != model_cfg.patch_size:
                raise DataError(f"{e.path}: images were sized for patch_size {m.resolution['patch_size']}, "
                                f"model.patch_size is {model_cfg.patch_size}")
            if m.num_samples == 0:
                raise DataError(f"{e.path}: the shard set holds no sample")
            if m.vocab_size > model_cfg.vocab_size:
                raise DataError(f"{e.path}: tokenizer has {m.vocab_size} pieces, "
                                f"model.vocab_size is {model_cfg.vocab_size}")
        # a group's shards (about 2F when shards are cut into slices) and a packing buffer's
        self.orders = [DatasetOrder(m.shard_sizes, cfg.seed, cfg.shuffle, 2 * cfg.shards_in_flight + 2)
                       for m in self.manifests]
        if rank == 0:
            self._warn_about_cut_shards()
        self.base = [loader_state.base_from_json(None) for _ in self.entries]  # (epochs, partial, first_epoch)
        self.base_ledger = [[0] * len(LEDGER) for _ in self.entries]  # what slots of earlier layouts handed out
        self.retired: dict[str, dict] = {}  # records of datasets the state had and the config has not
        self.slot_states: dict[int, dict] = {}
        self.last_keys: list[list[str]] = []  # the documents of the last batch, per row (text: with token range)
        self.last_datasets: list[list[str]] = []  # and the names of their datasets
        self.last_position: tuple[int, int] = (-1, -1)

    def _warn_about_cut_shards(self) -> None:
        want = self.num_slots * self.cfg.shards_in_flight
        for e, m in zip(self.entries, self.manifests):
            if len(m.shards) < want:
                log.warning("%s: %d shards for %d slots x data.shards_in_flight=%d: the epoch is cut into "
                            "slices and each shard fetched by about %d readers; write at least %d shards to read "
                            "each once", e.path, len(m.shards), self.num_slots, self.cfg.shards_in_flight,
                            want // len(m.shards) + 1, want)

    # ---- slots ---------------------------------------------------------------------------
    def own_slots(self) -> list[int]:
        return list(range(self.rank * self.workers, (self.rank + 1) * self.workers))

    def make_slot(self, slot: int, place: int = 0) -> Slot:
        """Slot `slot`, whose batches are its rank's `place`-th of every `workers` (the round robin)."""
        datasets = []
        for e, m, order, (base, partial, first) in zip(self.entries, self.manifests, self.orders, self.base):
            dealing = Dealing(order, self.num_slots, first, self.num_epochs, self.cfg.shards_in_flight)
            datasets.append(Dataset(m, e.role, e.image_first, order, dealing, base, partial))
        return Slot(datasets, self.cfg, self.spec, self.diffusion, self.batch_size, slot, self.weights,
                    self.slot_states.get(slot), (self.workers, self.batches_per_step, self.start_step, place))

    def weights(self, step: int) -> list[float]:
        """The datasets' weights at an optimizer step (data.schedule)."""
        return weights_at(self.cfg, step) if self.cfg.schedule else [e.weight for e in self.entries]

    def shares(self, step: int) -> list[float]:
        weights = self.weights(step)
        return [w / sum(weights) for w in weights]

    def __iter__(self) -> Iterator:
        """Batches of this rank's slots (round robin over its workers). A DataError in a worker is raised
        here, once its workers are ended; so is any other failure of the DataLoader."""
        # Workers are filled in round-robin order; give worker 0 the slot that is due next.
        slots = sorted(self.own_slots(), key=lambda j: (self.slot_states.get(j, {}).get("batches", 0), j))
        stream = _SlotStream(self, slots)
        if self.cfg.num_workers == 0:
            yield from self._hand_out(iter(stream))
            return
        context = multiprocessing.get_context()
        stop = context.RawValue("b", 0)  # 1: the loader ends its workers (no lock: read in a signal handler)
        items = iter(torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=self.workers, prefetch_factor=2, persistent_workers=False,
            pin_memory=torch.cuda.is_available(), multiprocessing_context=context,
            worker_init_fn=functools.partial(_init_worker, stop, os.getpid())))
        _RUNNING[id(items)] = (items, stop)
        graceful = False
        try:
            yield from self._hand_out(items)
            graceful = True
        except GeneratorExit:  # the consumer is done with the batches
            graceful = True
            raise
        finally:
            _end_workers(items, stop, graceful)

    def _hand_out(self, items) -> Iterator:
        for item in items:
            if isinstance(item, WorkerFailed):
                raise DataError(item.message)
            batch, state, keys, sets = item
            self.slot_states[state["slot"]] = state
            self.last_keys = keys
            self.last_datasets = [[self.entries[d].name for d in row] for row in sets]
            self.last_position = (state["slot"], state["batches"] - 1)  # which slot, its how-many-th batch
            yield batch

    def ledger(self, every_slot: bool = False) -> list[list[int]]:
        """Per dataset, LEDGER counts (documents, text targets, latent loss tokens) this rank's slots handed
        out; the whole run's is the sum over ranks plus `base_ledger` (slots of the layouts before).
        `every_slot`: of every slot of the loaded state (right after loading, before any batch: the
        whole run's, without `base_ledger`)."""
        states = self.slot_states.values() if every_slot else self._own_states()
        return [[sum(int(s.get("ledger", [[0] * len(LEDGER)] * len(self.entries))[d][k]) for s in states)
                 for k in range(len(LEDGER))] for d in range(len(self.entries))]

    def counters(self) -> dict[str, int]:
        """Skipped samples and remote-read retries, stalls and resumes of this rank's slots so far."""
        return {k: sum(int(s.get(k, 0)) for s in self._own_states()) for k in COUNTERS}

    def _own_states(self) -> list[dict]:
        # (a loaded state holds every rank's slots: the other ranks count theirs)
        return [self.slot_states[j] for j in self.own_slots() if j in self.slot_states]

    # ---- state ---------------------------------------------------------------------------
    def fingerprints(self) -> list[str]:
        return [m.fingerprint for m in self.manifests]

    def layout(self) -> dict:
        return {"world_size": self.world_size, "workers": self.workers, "slots": self.num_slots,
                "shards_in_flight": self.cfg.shards_in_flight, "seed": self.cfg.seed, "shuffle": self.cfg.shuffle,
                "num_epochs": self.num_epochs}

    def state_dict(self, step: Optional[int] = None) -> dict:
        """This rank's part of the state (merge all ranks' with `merge_states`; fields: loader_state) at
        optimizer step `step` (default: the loaded one). Every slot of the rank is in it: one that has handed
        out no batch yet is at its start (cursors (0, 0))."""
        shares = self.shares(self.start_step if step is None else step)
        records = {e.name: dataset_record(m.fingerprint, share, base, ledger) for e, m, share, base, ledger
                   in zip(self.entries, self.manifests, shares, self.base, self.base_ledger)}
        return {"version": STATE_VERSION, "layout": self.layout(), "mix_by": self.cfg.mix_by,
                "mix_by_legacy": self.legacy_mix, "batches_per_step": self.batches_per_step,
                "active": [e.name for e in self.entries], "datasets": {**self.retired, **records},
                "slots": {str(j): self.slot_states.get(j) or unstarted_state(j, len(self.entries))
                          for j in self.own_slots()}}

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        merged = dict(states[0], slots={})
        for s in states:
            if s["layout"] != merged["layout"] or s["datasets"] != merged["datasets"]:
                raise DataError("merge_states: the ranks' loader states disagree on layout or datasets")
            merged["slots"].update(s["slots"])
        return merged

    def load_state_dict(self, state: dict, step: int = 0) -> None:
        """Continue from a state (of any layout) saved at optimizer step `step` (where data.schedule
        resumes). The same datasets on the same slots continue exactly; otherwise the slots' progress is
        folded (loader_state): datasets added start, removed ones are kept for later, one line each."""
        self.start_step = step
        names, fingerprints = [e.name for e in self.entries], self.fingerprints()
        state = loader_state.upgrade(state, names, fingerprints, {f: len(m.shards) for f, m in
                                                                  zip(fingerprints, self.manifests)})
        if ("mix_by" not in state or state.get("mix_by_legacy")) and self.cfg.mix_by != "documents":
            if self.rank == 0:
                log.warning("the run's data state predates data.mix_by: it goes on by documents")  # (< 2026-12-04)
            self.cfg, self.legacy_mix = self.cfg.replace(mix_by="documents"), True
        old = state["layout"]
        for key in ("seed", "shuffle", "num_epochs"):
            if old[key] != self.layout()[key]:
                raise DataError(f"loader state has data.{key}={old[key]}, the config says {self.layout()[key]}")
        matched = loader_state.match(state["datasets"], state["active"], names, fingerprints,
                                     [e.path for e in self.entries])
        slots = {int(j): s for j, s in state["slots"].items()}
        records, totals = state["datasets"], loader_state.ledger_totals(state)
        if state.get("mix_by", "documents") != self.cfg.mix_by:
            for s in slots.values():  # targets kept under another mix_by: rebuilt from what was handed out
                s.pop("target", None)
        if matched == state["active"] and (old["slots"], old["shards_in_flight"]) == (
                self.num_slots, self.cfg.shards_in_flight):
            # the same datasets on the same slots, whichever rank or worker reads each: exact
            self.base = [loader_state.base_from_json(records[n]["base"]) for n in matched]
            self.base_ledger = [list(records[n]["ledger"]) for n in matched]
            self.slot_states = slots
            if (old["workers"], state.get("batches_per_step", 1)) != (self.workers, self.batches_per_step):
                for s in slots.values():  # a slot's batches now make steps at another rate: count from here
                    s.pop("origin", None)
        else:
            missing = sorted(set(range(old["slots"])) - set(slots))
            if missing and any(s.get("batches") for s in slots.values()):
                raise DataError(f"loader state lacks slots {missing[:8]} of {old['slots']}: "
                                "pass the state merged from every rank (PackedLoader.merge_states)")
            records = loader_state.retire(state, slots)
            self.base = [loader_state.fold(records[n], order, self.num_slots, self.num_epochs) if n else
                         loader_state.base_from_json(None) for n, order in zip(matched, self.orders)]
            self.base_ledger = [list(records[n]["ledger"]) if n else [0] * len(LEDGER) for n in matched]
            self.slot_states = {}
        self.retired = {n: dict(r, retired=True) for n, r in records.items() if n not in matched}
        if self.rank == 0:
            lines = loader_state.change_lines(records, totals, state["active"], matched, names, self.shares(step), step)
            if state.get("mix_by", "documents") != self.cfg.mix_by:
                lines.insert(0, f"data.mix_by: {state.get('mix_by', 'documents')} -> {self.cfg.mix_by} from step {step}")
            for line in lines:
                log.warning(line)
