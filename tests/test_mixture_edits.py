"""Data mixtures edited between restarts (loader only, no training): random schedules, weight changes,
datasets added, removed and re-added, and layout changes (ranks x workers, shards_in_flight) across 2-4
restarts read every token of every dataset once, and keep the token shares the weights ask for."""
import collections
import json
import random

import numpy as np
import pytest

from data_pipelines.loader import PackedLoader
from data_pipelines.loader_state import ledger_totals
from data_pipelines.shards import ShardSetWriter
from tests.data_fixtures import data_config, model_config

SETS = {"prose": (60, 10, "text"), "code": (40, 8, "text"), "pics": (50, 10, "image"), "notes": (30, 10, "text")}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Four small shard sets: {name: (path, {key: text tokens with <bos>/<eos>, or None for an image})}."""
    root, rng, out = tmp_path_factory.mktemp("pool"), np.random.default_rng(0), {}
    for name, (n, per_shard, kind) in SETS.items():
        w, docs = ShardSetWriter(root / name, samples_per_shard=per_shard), {}
        for i in range(n):
            key = f"{name}-{i:04d}"
            if kind == "text":
                tokens = rng.integers(10, 999, int(rng.integers(3, 300 if name == "code" else 120))).tolist()
                w.write(key, {"segments": [{"text": key, "tokens": tokens}]}, {})
                docs[key] = len(tokens) + 2
            else:
                side = int(rng.choice([4, 8]))
                caption = rng.integers(10, 999, int(rng.integers(2, 8))).tolist()
                w.write(key, {"segments": [{"text": key, "tokens": caption},
                                           {"latent": "lat0.npy", "kind": "image", "shape": [1, side, side]}]},
                        {"lat0.npy": rng.standard_normal((1, side, side)).astype(np.float16)})
                docs[key] = None
        w.close(encoder={"type": "pixels"}, latent_channels=1, tokenizer={"fingerprint": "t", "vocab_size": 1000})
        out[name] = (root / name, docs)
    return out


def rank_batches(loader):
    """The batches of one rank, its slots read in this process in the DataLoader's round robin."""
    slots = sorted(loader.own_slots(), key=lambda j: (loader.slot_states.get(j, {}).get("batches", 0), j))
    streams = [iter(loader.make_slot(j, place)) for place, j in enumerate(slots)]

    def round_robin():
        while streams:
            for s in list(streams):
                try:
                    yield next(s)
                except StopIteration:
                    streams.remove(s)
    return loader._hand_out(round_robin())


def each_token_once(seen: collections.Counter, pool) -> None:
    """Per dataset: documents with latents came whole, once; text ones as token ranges covering each once."""
    for name, (_, docs) in pool.items():
        whole, spans = collections.Counter(), collections.defaultdict(list)
        for (n, key), count in seen.items():
            if n == name and "@" in key:
                doc, r = key.split("@")
                spans[doc] += [tuple(map(int, r.split(":")))] * count
            elif n == name:
                whole[key] += count
        assert max(whole.values(), default=1) == 1, f"{name}: a document came twice"
        for doc, ranges in spans.items():
            ranges.sort()
            ends = [0] + [b for _, b in ranges]
            assert [a for a, _ in ranges] == ends[:-1], f"{name}/{doc}: ranges {ranges} overlap or leave a gap"
            assert ends[-1] == docs[doc], f"{name}/{doc}: {ends[-1]} of {docs[doc]} tokens"
        assert set(whole) | set(spans) == set(docs), f"{name}: {len(set(docs) - set(whole) - set(spans))} skipped"


class Run:
    """A run of the loader over restarts: each `segment` builds the loaders of a config, resumes them from
    the last state, takes `steps` optimizer steps (every rank `per_step` batches) and saves the state."""

    def __init__(self, pool, batch_size=2, **data):
        self.pool, self.batch_size, self.data, self.state, self.step = pool, batch_size, data, None, 0
        self.seen = collections.Counter()
        self.shares: list[dict] = []  # per step: {name: loss tokens so far}, and the target shares of the step
        self.segments: list[tuple[int, int]] = []  # (first step, end step)

    def segment(self, names, weights, ranks, workers, in_flight, steps, per_step=1, schedule=(), interpolate=True):
        cfg = data_config(*[self.pool[n][0] for n in names], weights=weights, num_workers=workers,
                          shards_in_flight=in_flight, schedule=list(schedule), interpolate=interpolate, **self.data)
        loaders = [PackedLoader(cfg, model_config(), self.batch_size, rank=r,
                                world_size=ranks, batches_per_step=per_step) for r in range(ranks)]
        for ld in loaders:
            if self.state is not None:
                ld.load_state_dict(self.state, self.step)
        streams, first = [rank_batches(ld) for ld in loaders], self.step
        for _ in range(steps):
            got = 0
            for ld, stream in zip(loaders, streams):
                for _ in range(per_step):
                    if next(stream, None) is not None:
                        got += 1
                        self.seen.update((n, k) for rn, rk in zip(ld.last_datasets, ld.last_keys)
                                         for n, k in zip(rn, rk))
            if not got:
                break
            counts = [[b + sum(ld.ledger()[d][k] for ld in loaders) for k, b in enumerate(base)]
                      for d, base in enumerate(loaders[0].base_ledger)]
            self.shares.append(({n: c[1] + c[2] for n, c in zip(names, counts)},
                                dict(zip(names, loaders[0].shares(self.step)))))
            self.step += 1
        self.segments.append((first, self.step))
        self.state = json.loads(json.dumps(PackedLoader.merge_states([ld.state_dict(self.step) for ld in loaders])))
        return loaders


def random_schedule(rng: random.Random, names: list[str], start: int) -> list[dict]:
    """0-2 points from `start` on, each giving some datasets a weight (0 included), never all 0."""
    points = []
    for step in sorted(rng.sample(range(start, start + 40), rng.randint(0, 2))):
        weights = {n: rng.choice([0, 0.5, 1, 2]) for n in rng.sample(names, rng.randint(1, len(names)))}
        if len(weights) == len(names) and not any(weights.values()):
            weights[names[0]] = 1
        points.append({"step": step, "weights": weights})
    return points


def random_segment(rng: random.Random, run: Run, at_least: int, steps: tuple[int, int], final=False) -> None:
    names = rng.sample(list(SETS), len(SETS) if final else rng.randint(at_least, len(SETS)))
    run.segment(names, [rng.choice([0.5, 1, 2, 3]) for _ in names], ranks=rng.randint(1, 3),
                workers=rng.randint(1, 2), in_flight=rng.randint(1, 2), steps=rng.randint(*steps),
                per_step=rng.randint(1, 2), schedule=[] if final else random_schedule(rng, names, run.step),
                interpolate=rng.random() < 0.5)


@pytest.mark.parametrize("cases", [range(0, 60), range(60, 120), range(120, 180), range(180, 240)])
def test_random_edits_and_layouts_read_every_token_of_every_dataset_once(pool, cases):
    """2-4 restarts, each with another subset of the datasets (added, removed, re-added, reordered),
    weights, schedule and layout, then one that lists them all and reads to the end: every token of every
    dataset came once, and the ledger counts every document."""
    for case in cases:
        rng = random.Random(case)
        run = Run(pool, seq_len=64, num_epochs=1, mix_by=rng.choice(["tokens", "tokens", "documents"]))
        for _ in range(rng.randint(2, 4)):
            random_segment(rng, run, 1, (1, 12))
        random_segment(rng, run, 4, (10**6, 10**6), final=True)
        try:
            each_token_once(run.seen, pool)
            assert {n: c[0] for n, c in ledger_totals(run.state).items()} == {n: len(d) for n, (_, d) in pool.items()}
        except AssertionError as e:
            raise AssertionError(f"case {case}: {e}") from None


@pytest.mark.parametrize("case", range(8))
def test_token_shares_hold_within_2_points_per_50_step_window_across_edits(pool, case):
    """Endless epochs, 2-3 restarts that change the datasets, weights, schedule and layout: in every 50-step
    window inside a segment (past the run's first 50 steps), each dataset's share of the loss tokens is
    within 2 points of its weights' mean share over the window."""
    rng = random.Random(1000 + case)
    run = Run(pool, batch_size=4, seq_len=256, num_epochs=0, mix_by="tokens")
    for _ in range(rng.randint(2, 3)):
        random_segment(rng, run, 2, (55, 90))
    checked = 0
    for first, end in run.segments:
        for start in range(max(first + 1, 50), end - 49, 25):
            before, (after, _) = run.shares[start - 1][0], run.shares[start + 49]
            got = {n: after[n] - before.get(n, 0) for n in after}
            targets = [run.shares[s][1] for s in range(start, start + 50)]
            for name in got:
                want = sum(t[name] for t in targets) / 50
                assert abs(got[name] / sum(got.values()) - want) < 0.02, (case, start, name, got, want)
            checked += 1
    assert checked


def text_lengths(path) -> dict:
    """{key: tokens with <bos>/<eos>} of a text-only shard set."""
    from data_pipelines.shards import iter_shard_documents
    return {key: sum(len(s["tokens"]) for s in segs) + 2 for key, segs in iter_shard_documents(path)}


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_zero3_by_tokens_then_one_rank_with_a_third_dataset(tiny_config, test_data, tmp_path):
    """0.5 : 0.5 by loss tokens on digits + text, 2 ranks x 2 workers under ZeRO-3 with evaluation; then 1
    rank resumes (universal checkpoint) with a third dataset and other weights. No document comes twice,
    each change is logged, and the ledger in the final checkpoint equals a recount from the documents the
    ranks logged: per dataset, documents and (text) loss tokens; the rest of the run's loss tokens are
    the digits'."""
    from data_pipelines.documents import text_chunk
    from data_pipelines.write_shards import write_shards
    from model.layout import LayoutSpec
    from pretrain.checkpoint.reader import CheckpointReader
    from pretrain.convert import to_universal
    from tests.launch import metrics, torchrun
    notes = tmp_path / "notes"
    write_shards("text", str(notes), tokenizer=str(test_data["tokenizer"]), channels=1, samples_per_shard=20,
                 progress=False, input=[str(test_data["corpus"])], max_chars=250)

    def datasets(**weights):
        paths = {"digits": test_data["digits"], "text": test_data["text"], "notes": notes}
        return "data.datasets=[" + ", ".join(f"{{path: {paths[n]}, weight: {w}}}" for n, w in weights.items()) + "]"
    common = ["wandb.mode=disabled", "train.log_interval=1", "train.log_samples=true", "data.mix_by=tokens",
              "data.num_workers=2", "train.zero_stage=3", "train.eval_interval=6", "checkpoint.interval=6"]
    a, b = tmp_path / "a", tmp_path / "b"
    r = torchrun(2, ["--config", str(tiny_config), f"run.dir={a}", "train.max_steps=6", *common,
                     datasets(digits=0.5, text=0.5)])
    assert r.returncode == 0, r.stderr[-3000:]
    universal = to_universal(a / "checkpoints/step_00000006", tmp_path / "universal")
    r = torchrun(1, ["--resume", str(universal), "--config", str(tiny_config), f"run.dir={b}", "train.max_steps=12",
                     *common, "train.grad_accum=2", datasets(digits=0.3, notes=0.4, text=0.3)])
    assert r.returncode == 0, r.stderr[-3000:]
    said = r.stdout + r.stderr
    for line in ("data: notes: new, read from its beginning (share 0.400)",
                 "data: digits: share 0.500 -> 0.300 from step 6", "data: text: share 0.500 -> 0.300 from step 6"):
        assert said.count(line) == 1, line

    seen = collections.Counter()
    for log in [*a.glob("samples_rank*.jsonl"), *b.glob("samples_rank*.jsonl")]:
        for record in map(json.loads, log.read_text().splitlines()):
            seen.update((n, k) for names, keys in zip(record["datasets"], record["docs"]) for n, k in zip(names, keys))
    assert {n for n, _ in seen} == {"digits", "text", "notes"} and max(seen.values()) == 1
    spec, lengths = LayoutSpec.from_model_config(model_config()), {"text": text_lengths(test_data["text"]),
                                                                    "notes": text_lengths(notes)}
    recount = {n: [0, 0, 0] for n in ("digits", "text", "notes")}
    for name, key in seen:
        if name == "digits":
            recount[name][0] += 1
            continue
        doc, span = key.split("@")
        start, end = map(int, span.split(":"))
        recount[name][0] += end == lengths[name][doc]  # its last piece
        recount[name][1] += int(text_chunk(list(range(end)), start, end, spec).text_loss.sum())
    # the metrics: the restart's mixture record holds the ledger it resumed with; then every step's tokens
    # add up to the loss tokens trained on
    resumed_with = ledger_totals(CheckpointReader(a / "checkpoints/step_00000006").client["data"])
    start = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()][0]
    assert start["step"] == 6 and [d["name"] for d in start["data/mixture"]["datasets"]] == ["digits", "notes", "text"]
    assert {n: start[f"data/{n}/tokens"] for n in ("digits", "text", "notes")} == {
        "digits": sum(resumed_with["digits"][1:]), "text": sum(resumed_with["text"][1:]), "notes": 0}
    assert sorted(r for r in metrics(b) if "loss" in metrics(b)[r]) == list(range(7, 13))
    for record in (r for r in metrics(b).values() if "loss" in r):
        assert sum(record[f"data/{n}/tokens"] for n in ("digits", "text", "notes")) == (
            record["text_tokens"] + record["latent_tokens"])
    final = CheckpointReader(b / "checkpoints/step_00000012").client
    text_tokens, latent_tokens = final["loss_tokens"]
    recount["digits"][1:] = [text_tokens - recount["text"][1] - recount["notes"][1], latent_tokens]
    assert ledger_totals(final["data"]) == recount


def test_after_an_exact_resume_each_rank_counts_its_own_slots(pool):
    """Every rank loads the whole state (all ranks' slots): its ledger and counters are its own slots',
    so the sum over ranks is the run's, as the state says."""
    cfg = data_config(pool["prose"][0], pool["pics"][0], seq_len=64, mix_by="tokens")
    first = [PackedLoader(cfg, model_config(), 2, rank=r, world_size=2) for r in range(2)]
    for ld in first:
        for _ in zip(range(3), rank_batches(ld)):
            pass
    state = json.loads(json.dumps(PackedLoader.merge_states([ld.state_dict(3) for ld in first])))
    resumed = [PackedLoader(cfg, model_config(), 2, rank=r, world_size=2) for r in range(2)]
    for ld in resumed:
        ld.load_state_dict(state, 3)
    want = [ledger_totals(state)[n] for n in ("prose", "pics")]
    assert all(sum(c) for c in want) and resumed[0].slot_states.keys() == {0, 1, 2, 3}
    for ld in resumed:
        assert [[a + b for a, b in zip(*x)] for x in zip(ld.base_ledger, ld.ledger(every_slot=True))] == want
    by_ranks = [[a + b + c for a, b, c in zip(*x)] for x in zip(resumed[0].base_ledger, *(ld.ledger() for ld in resumed))]
    assert by_ranks == want


def test_a_schedule_point_holds_from_its_step_on_every_slot_of_a_rank(pool):
    """2 workers, 1 batch per step: a rank's batches go to its slots in turn, so slot 1 makes steps 1, 3,
    5, ...; with one document per row (a packing buffer of 1) every batch reads by the weights of its own
    step: pictures only before step 5, prose only from it."""
    schedule = [{"step": 0, "weights": {"prose": 0}}, {"step": 5, "weights": {"pics": 0, "prose": 1}}]
    cfg = data_config(pool["pics"][0], pool["prose"][0], seq_len=64, num_workers=2, pack_buffer=1, mix_by="tokens",
                      schedule=schedule, interpolate=False)
    loader = PackedLoader(cfg, model_config(), 2)
    sets = [{n for row in loader.last_datasets for n in row} for _ in zip(range(10), rank_batches(loader))]
    assert sets == [{"pics"}] * 5 + [{"prose"}] * 5, sets


def test_switching_to_mix_by_tokens_at_a_restart_takes_the_token_shares_from_there(pool):
    """By documents, prose : pictures 1 : 1 is about 5 : 1 by tokens; resumed (same slots) by tokens, the
    next 60 steps share the tokens 1 : 1, without making up the documents-era gap."""
    cfg = data_config(pool["prose"][0], pool["pics"][0], seq_len=128, num_workers=1, num_epochs=0)
    first = PackedLoader(cfg, model_config(), 4)
    for _ in zip(range(30), rank_batches(first)):
        pass
    tokens = [c[1] + c[2] for c in first.ledger()]
    assert tokens[0] > 3 * tokens[1]
    state = json.loads(json.dumps(first.state_dict(30)))
    resumed = PackedLoader(cfg.replace(mix_by="tokens"), model_config(), 4)
    resumed.load_state_dict(state, 30)
    for _ in zip(range(60), rank_batches(resumed)):
        pass
    got = [c[1] + c[2] - t for c, t in zip(resumed.ledger(), tokens)]
    assert abs(got[0] / sum(got) - 0.5) < 0.03, got
