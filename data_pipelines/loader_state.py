"""The packed loader's saved state — this module alone knows its fields — and how a resume maps it onto
the datasets configured now.

    {"version": 3,
     "layout": {world_size, workers, slots, shards_in_flight, seed, shuffle, num_epochs},
     "mix_by", "mix_by_legacy", "batches_per_step",
     "active": [the names of the datasets read, in the order of the slots' per-dataset lists],
     "datasets": {name: {"fingerprint", "share": its weight's share at the saved step,
                         "base": consumed positions folded so far, "ledger": LEDGER counts of earlier layouts,
                         "pending": (a dataset no longer read) its slots' progress, folded when it comes back}},
     "slots": {slot: Slot.state()}}

Datasets are matched by name, then (a renamed or moved folder) by fingerprint: a dataset matched to a
record continues after the positions it consumed, one without a record starts from its beginning, and a
record no dataset matches is kept (retired) until a dataset of that name or those shards comes back.
"""
from __future__ import annotations

import json
from typing import Optional

from data_pipelines.order import Dealing, DatasetOrder, Intervals
from data_pipelines.slot import LEDGER, DataError

STATE_VERSION = 3  # 2: cursors count groups of data.shards_in_flight units; 3: datasets by name


def base_to_json(base: dict, partial: dict, first_epoch: int) -> dict:
    return {"first_epoch": first_epoch, "epochs": {str(e): iv.to_list() for e, iv in base.items()},
            "partial": [[e, p, start] for (e, p), start in partial.items()]}


def base_from_json(obj: Optional[dict]) -> tuple[dict, dict, int]:
    if not obj:
        return {}, {}, 0
    base = {int(e): Intervals(r) for e, r in obj["epochs"].items()}
    partial = {(e, p): start for e, p, start in obj["partial"]}
    return base, partial, int(obj["first_epoch"])


def dataset_record(fingerprint: str, share: float, base: tuple, ledger: list[int]) -> dict:
    return {"fingerprint": fingerprint, "share": share, "base": base_to_json(*base), "ledger": list(ledger)}


def upgrade(state: dict, names: list[str], fingerprints: list[str], shards: dict[str, int]) -> dict:
    """A state of an earlier version as a version-3 one. Version 1 (one unit at a time) is version 2 with
    shards_in_flight=1 when each of its datasets has a shard per slot (`shards`: per fingerprint, of the
    datasets configured; then it is folded like any layout change). Version 2 lists its datasets by index:
    each takes the name of the dataset configured now with its fingerprint, else of the one at its index
    if that one's fingerprint is none of the state's (it must then match: refused), else it is kept as
    `unnamed-I`."""
    version = state.get("version")
    if version == 1 and all(shards.get(f, 0) >= state["layout"]["slots"] for f in state["fingerprints"]):
        state = dict(state, version=2, layout=dict(state["layout"], shards_in_flight=1))
        return upgrade(state, names, fingerprints, shards)
    if version == 3:
        return state
    if version != 2:
        raise DataError(f"loader state version {version} is not {STATE_VERSION} and cannot be converted "
                        "(version 1 only with a shard per slot); start a new run from the checkpoint's "
                        "weights: pretrain.convert to-release, then train.init_from")
    old, active = state["fingerprints"], [None] * len(state["fingerprints"])
    for i, fp in enumerate(old):
        same = [n for n, f in zip(names, fingerprints) if f == fp and n not in active]
        active[i] = same[0] if same else None
    for i, name in enumerate(active):
        if name is None:
            free = i < len(names) and names[i] not in active and fingerprints[i] not in old
            active[i] = names[i] if free else f"unnamed-{i}"
    ledgers = state.get("ledger") or [[0] * len(LEDGER)] * len(old)  # (none before 2026-12-04)
    return {**{k: v for k, v in state.items() if k not in ("fingerprints", "base", "ledger")}, "version": 3,
            "active": active, "datasets": {n: {"fingerprint": fp, "share": None, "base": b, "ledger": led}
                                          for n, fp, b, led in zip(active, old, state["base"], ledgers)}}


def match(records: dict, active: list[str], names: list[str], fingerprints: list[str],
          paths: list[str]) -> list[Optional[str]]:
    """Per configured dataset, the name of its record (None: a new dataset): the record of its name, else
    one no name matches with its fingerprint (the same shards elsewhere; one read at the save first). A
    record of its name with another fingerprint is refused: the shards changed."""
    out: list[Optional[str]] = []
    for name, fp, path in zip(names, fingerprints, paths):
        if name in records and records[name]["fingerprint"] != fp:
            raise DataError(f"loader state does not match the datasets: fingerprint differs for {path} "
                            f"(dataset {name!r}): its shards changed since the checkpoint; give it another "
                            "name to read it as a new dataset")
        out.append(name if name in records else None)
    for i, (fp, got) in enumerate(zip(fingerprints, out)):
        if got is None:
            free = [n for n in sorted(records, key=lambda n: n not in active)
                    if records[n]["fingerprint"] == fp and n not in names and n not in out]
            out[i] = free[0] if free else None
    return out


def retire(state: dict, slots: dict[int, dict]) -> dict:
    """The records of a state whose slots are not continued: each active dataset's record gets its slots'
    progress (`pending`, folded by `fold`) and their ledger counts."""
    records = {n: dict(r) for n, r in state["datasets"].items()}
    layout = state["layout"]
    for d, name in enumerate(state["active"]):
        records[name]["pending"] = {
            "slots": layout["slots"], "shards_in_flight": layout["shards_in_flight"],
            "cursors": {str(j): list(s["cursors"][d]) for j, s in slots.items()},
            "buffer": [[e, p, start] for s in slots.values() for dd, e, p, start in s["buffer"] if dd == d]}
        records[name]["ledger"] = [records[name]["ledger"][k] + sum(s["ledger"][d][k] for s in slots.values()
                                                                    if "ledger" in s)
                                   for k in range(len(LEDGER))]
    return records


def fold(record: dict, order: DatasetOrder, slots: int, num_epochs: int) -> tuple[dict, dict, int]:
    """A record's consumed positions with its pending slots' progress folded in (positions they pulled are
    consumed, but those of their packing buffers, which come back as partial documents), for `slots` slots."""
    epochs, partial, first = base_from_json(record["base"])
    pending = record.get("pending")
    if not pending:
        return epochs, partial, first
    dealing = Dealing(order, pending["slots"], first, num_epochs, pending["shards_in_flight"])
    cursors = {int(j): tuple(c) for j, c in pending["cursors"].items()}
    buffered = {(e, p): start for e, p, start in pending["buffer"]}
    epochs = dealing.fold_cursors(epochs, cursors, buffered)
    partial = {k: v for k, v in partial.items() if k[1] not in epochs.get(k[0], ())}
    partial.update(buffered)
    first = Dealing(order, slots, first).first_open_epoch(epochs)
    return {e: iv for e, iv in epochs.items() if e >= first}, partial, first


def change_lines(records: dict, totals: dict, active: list[str], matched: list[Optional[str]], names: list[str],
                 shares: list[float], step: int) -> list[str]:
    """One line per dataset whose part in the mixture changes at this resume (`totals`: `ledger_totals`,
    `active`: the names the state was reading, `matched`: each configured dataset's record, `shares`: their
    weights' shares now)."""
    lines = []
    for name, old, share in zip(names, matched, shares):
        if old is None:
            lines.append(f"data: {name}: new, read from its beginning (share {share:.3f})")
            continue
        was, docs = records[old].get("share"), totals[old][0]
        said = [f"the shards of {old!r}, continued after its {docs} documents" if old != name else
                f"back, continued after its {docs} documents" if old not in active else ""]
        if was is not None and abs(was - share) > 1e-9:
            said.append(f"share {was:.3f} -> {share:.3f} from step {step}")
        if any(said):
            lines.append(f"data: {name}: " + "; ".join(x for x in said if x))
    for name in active:
        if name not in matched:
            lines.append(f"data: {name}: removed; its {totals[name][0]} documents read stay consumed "
                         "(listing it again continues it)")
    return lines


def ledger_totals(state: dict) -> dict[str, list[int]]:
    """{dataset name: LEDGER counts} of everything a saved state's run handed out: its records' (earlier
    layouts, retired datasets) and its slots'."""
    state = upgrade(state, [], [], {}) if state.get("version") == 2 else state  # (datasets named unnamed-I)
    out = {name: list(r["ledger"]) for name, r in state["datasets"].items()}
    for d, name in enumerate(state["active"]):
        for s in state["slots"].values():
            if "ledger" in s:
                out[name] = [a + b for a, b in zip(out[name], s["ledger"][d])]
    return out


def state_bytes(slots: int, datasets: int, pack_buffer: int) -> int:
    """About how large (JSON) the state of a long run is: `slots` slots, each with a full packing buffer
    and counts of a long run (every number at its width then), `datasets` datasets (their consumed
    positions a few intervals each, as after any number of layout changes once an epoch is whole)."""
    from data_pipelines.slot import unstarted_state
    big = 10 ** 9
    base = ({0: Intervals([[0, big], [big + 7, 2 * big]])}, {(0, big): 123}, 0)
    records = {f"dataset-{d}": dataset_record("0" * 16, 0.5, base, [big] * len(LEDGER)) for d in range(datasets)}
    slot = dict(unstarted_state(0, datasets), batches=big, mix=big, ledger=[[big] * len(LEDGER)] * datasets,
                target=[float(big) + 0.5] * datasets, origin=[big, big, 1], cursors=[[big, big]] * datasets,
                buffer=[[datasets - 1, 3, big, 1234]] * pack_buffer)
    state = {"version": STATE_VERSION, "layout": {"world_size": slots, "workers": 1, "slots": slots,
                                                  "shards_in_flight": 4, "seed": 0, "shuffle": True, "num_epochs": 0},
             "mix_by": "tokens", "mix_by_legacy": False, "batches_per_step": 1, "active": list(records),
             "datasets": records, "slots": {str(j): dict(slot, slot=j) for j in range(slots)}}
    return len(json.dumps(state))
