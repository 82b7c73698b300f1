"""Tokenizer, shard writing and the packed loader: coverage, resume, mixture, bad data, packing."""
import collections
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipelines.loader import PackedLoader
from data_pipelines.shards import ShardSetWriter, load_manifest
from data_pipelines.slot import DataError
from data_pipelines.tokenizer import load_tokenizer
from model.special_tokens import BOI, SPECIAL_TOKENS
from tests.data_fixtures import data_config, model_config


def run(loaders, limit=None):
    """Drain loaders (one per rank) in turn; returns the batches and a Counter of document keys."""
    batches, keys = [], collections.Counter()
    for loader in loaders:
        for batch in itertools.islice(loader, limit):  # a batch taken from the loader counts as consumed
            batches.append(batch)
            keys.update(k for row in loader.last_keys for k in row)
    return batches, keys


def documents(test_data, *names):
    """{key: token count for text-only documents (with <bos>/<eos>), None for documents with latents}."""
    from data_pipelines.shards import iter_shard_documents
    out = {}
    for n in names:
        for key, segs in iter_shard_documents(test_data[n]):
            text_only = all("tokens" in s for s in segs)
            out[key] = sum(len(s["tokens"]) for s in segs) + 2 if text_only else None
    return out


def assert_each_token_once(keys: collections.Counter, expected: dict):
    """Documents with latents appear whole, once; text documents as token ranges covering each once."""
    whole, spans = collections.Counter(), collections.defaultdict(list)
    for k, n in keys.items():
        if "@" in k:
            doc, r = k.split("@")
            spans[doc] += [tuple(map(int, r.split(":")))] * n
        else:
            whole[k] += n
    assert max(whole.values(), default=1) == 1
    for doc, ranges in spans.items():
        ranges.sort()
        ends = [0] + [b for _, b in ranges]
        assert [a for a, _ in ranges] == ends[:-1], f"{doc}: ranges {ranges} overlap or leave a gap"
        assert ends[-1] == expected[doc], f"{doc}: {ends[-1]} of {expected[doc]} tokens"
    assert set(whole) | set(spans) == set(expected)


def version_2(state: dict) -> dict:
    """A (version 3) loader state in the shape version 2 saved it: datasets by index."""
    records = [state["datasets"][n] for n in state["active"]]
    return {**{k: v for k, v in state.items() if k not in ("active", "datasets")}, "version": 2,
            "fingerprints": [r["fingerprint"] for r in records], "base": [r["base"] for r in records],
            "ledger": [r["ledger"] for r in records]}


def test_tokenizer_special_ids_and_round_trip(test_data):
    tok = load_tokenizer(test_data["tokenizer"])
    for i, piece in enumerate(SPECIAL_TOKENS):
        assert tok.id_to_piece(i) == piece
    assert tok.token_id("boi") == tok.token_id("<boi>") == BOI
    text = "def f(x):\n\treturn x  # ünïcode ✓ 数字\n"
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(KeyError, match="nope"):
        tok.token_id("nope")


def test_train_tokenizer_cli(test_data, tmp_path):
    out = tmp_path / "t.model"
    r = subprocess.run([sys.executable, "-m", "data_pipelines.train_tokenizer", "--input", str(test_data["corpus"]),
                        "--vocab-size", "600", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert load_tokenizer(out).vocab_size == 600


def test_write_shards_digits_writes_1797_samples(test_data):
    manifest = load_manifest(test_data["digits"])
    assert manifest.num_samples == 1797 == sum(manifest.shard_sizes)
    assert len(manifest.shards) == 9 and manifest.encoder["type"] == "pixels"
    assert len(documents(test_data, "digits")) == 1797


def test_write_shards_cli(test_data, tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_pipelines.write_shards", "--source", "photos", "--num-samples",
                        "20", "--crop", "16", "--encoder", "pixels", "--tokenizer", str(test_data["tokenizer"]),
                        "--out", str(tmp_path / "photos"), "--samples-per-shard", "8", "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = load_manifest(tmp_path / "photos")
    assert m.num_samples == 20 and m.shard_sizes == [8, 8, 4]


def test_one_epoch_over_2_ranks_x_2_workers_yields_every_document_once(test_data):
    cfg = data_config(test_data["digits"], test_data["text"], weights=[0.5, 0.5])
    _, keys = run([PackedLoader(cfg, model_config(), 4, rank=r, world_size=2) for r in range(2)])
    assert_each_token_once(keys, documents(test_data, "digits", "text"))
    assert len([k for k in keys if k.startswith("digits")]) == 1797


def test_fewer_shards_than_slots_does_not_hang(test_data, tmp_path):
    from data_pipelines.write_shards import write_shards
    write_shards("digits", str(tmp_path / "d"), str(test_data["tokenizer"]), channels=1, samples_per_shard=1000,
                 progress=False, num_samples=300)  # 1 shard, 4 slots
    _, keys = run([PackedLoader(data_config(tmp_path / "d"), model_config(), 2, rank=r, world_size=2)
                   for r in range(2)])
    assert len(keys) == 300 and max(keys.values()) == 1


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in ("tokens", "doc", "unit", "pos", "latents", "timestep", "text_loss", "latent_loss"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_resume_on_the_same_layout_gives_identical_batches(test_data):
    cfg = data_config(test_data["digits"], test_data["text"], num_epochs=0)
    mc = model_config()

    def loaders():
        return [PackedLoader(cfg, mc, 2, rank=r, world_size=2) for r in range(2)]

    straight, _ = run(loaders(), limit=8)  # 8 batches per rank
    first = loaders()
    run(first, limit=3)
    state = json.loads(json.dumps(PackedLoader.merge_states([ld.state_dict() for ld in first])))
    resumed = loaders()
    for ld in resumed:
        ld.load_state_dict(state)
    after, _ = run(resumed, limit=5)
    assert_same_batches(after, straight[3:8] + straight[11:16])


def test_resume_on_one_rank_yields_exactly_the_unseen_samples(test_data):
    cfg = data_config(test_data["digits"], test_data["text"])
    mc = model_config()
    first = [PackedLoader(cfg, mc, 2, rank=r, world_size=2) for r in range(2)]
    _, seen = run(first, limit=7)
    state = PackedLoader.merge_states([ld.state_dict() for ld in first])
    single = PackedLoader(cfg.replace(num_workers=1), mc, 2, rank=0, world_size=1)
    single.load_state_dict(state)
    _, rest = run([single])
    assert_each_token_once(seen + rest, documents(test_data, "digits", "text"))


def test_resume_with_another_shards_in_flight_and_layout_yields_exactly_the_unseen_samples(test_data):
    cfg = data_config(test_data["digits"], test_data["text"], shards_in_flight=4)
    mc = model_config()
    first = [PackedLoader(cfg, mc, 2, rank=r, world_size=2) for r in range(2)]
    _, seen = run(first, limit=5)
    state = json.loads(json.dumps(PackedLoader.merge_states([ld.state_dict() for ld in first])))
    resumed = [PackedLoader(cfg.replace(num_workers=1, shards_in_flight=2), mc, 2, rank=r, world_size=3)
               for r in range(3)]
    for ld in resumed:
        ld.load_state_dict(state)
    _, rest = run(resumed)
    assert_each_token_once(seen + rest, documents(test_data, "digits", "text"))


def test_a_version_2_state_resumes_with_its_first_dataset_removed_and_continues_it_when_listed_again(test_data):
    """A state saved before datasets had names (by index): resumed on [text] (digits removed: kept, unnamed),
    then on [digits, text] (digits found by its fingerprint): every token of both once."""
    cfg = data_config(test_data["digits"], test_data["text"], num_workers=1)
    mc = model_config()
    first = [PackedLoader(cfg, mc, 2, rank=r, world_size=2) for r in range(2)]
    _, seen = run(first, limit=3)
    state = version_2(json.loads(json.dumps(PackedLoader.merge_states([ld.state_dict() for ld in first]))))
    text_only = PackedLoader(data_config(test_data["text"], num_workers=1), mc, 2)
    text_only.load_state_dict(state)
    _, more = run([text_only], limit=5)
    again = json.loads(json.dumps(text_only.state_dict()))
    assert sorted(again["datasets"]) == ["text", "unnamed-0"] and again["active"] == ["text"]
    both = PackedLoader(cfg, mc, 2)
    both.load_state_dict(again)
    _, rest = run([both])
    assert_each_token_once(seen + more + rest, documents(test_data, "digits", "text"))


def test_a_version_1_state_resumes_as_one_shard_in_flight(test_data):
    """States saved before cross-shard mixing read one shard at a time: they resume (folded) as that."""
    cfg = data_config(test_data["digits"], test_data["text"], num_workers=1, shards_in_flight=1)
    mc = model_config()
    first = [PackedLoader(cfg, mc, 2, rank=r, world_size=2) for r in range(2)]
    _, seen = run(first, limit=4)
    state = version_2(json.loads(json.dumps(PackedLoader.merge_states([ld.state_dict() for ld in first]))))
    del state["layout"]["shards_in_flight"]
    state["version"] = 1
    single = PackedLoader(cfg.replace(shards_in_flight=4), mc, 2, rank=0, world_size=1)
    single.load_state_dict(state)
    _, rest = run([single])
    assert_each_token_once(seen + rest, documents(test_data, "digits", "text"))
    state["layout"]["slots"] = 10  # more slots than the 9 digit shards: version 1 dealt single samples
    with pytest.raises(DataError, match="loader state version 1 is not 3 and cannot be converted"):
        single.load_state_dict(state)


def shards_of_first_batches(test_data, in_flight):
    """For each of 2 ranks, how many digit shards its first batch draws on."""
    from data_pipelines.shards import open_shard
    manifest = load_manifest(test_data["digits"])
    shard_of = {key: i for i in range(len(manifest.shards)) for key, _ in open_shard(manifest, i).samples}
    cfg = data_config(test_data["digits"], num_workers=1, shards_in_flight=in_flight)
    counts = []
    for r in range(2):
        loader = PackedLoader(cfg, model_config(), 4, rank=r, world_size=2)
        _, keys = run([loader], limit=1)
        counts.append(len({shard_of[k] for k in keys}))
    return counts


def test_a_batch_draws_on_shards_in_flight_shards_per_rank(test_data):
    assert shards_of_first_batches(test_data, 1) == [1, 1]  # 9 shards, 2 slots: one shard each
    assert min(shards_of_first_batches(test_data, 4)) == 4


def test_a_state_saved_before_every_slot_handed_out_a_batch_resumes_on_another_layout(test_data):
    """2 ranks x 2 workers, one batch each: each rank's second worker has handed out nothing yet
    (a checkpoint at step 1). Its slot is at its start; on 1 rank every token still comes once."""
    cfg = data_config(test_data["digits"], test_data["text"])
    mc = model_config()
    first = [PackedLoader(cfg, mc, 2, rank=r, world_size=2) for r in range(2)]
    _, seen = run(first, limit=1)
    state = json.loads(json.dumps(PackedLoader.merge_states([ld.state_dict() for ld in first])))
    assert sorted(state["slots"]) == ["0", "1", "2", "3"]
    single = PackedLoader(cfg.replace(num_workers=1), mc, 2, rank=0, world_size=1)
    single.load_state_dict(state)
    _, rest = run([single])
    assert_each_token_once(seen + rest, documents(test_data, "digits", "text"))


def test_mixture_weights_hold_within_3_points(test_data):
    cfg = data_config(test_data["digits"], test_data["text"], weights=[0.7, 0.3], num_epochs=0, num_workers=0,
                      seq_len=128)
    loader = PackedLoader(cfg, model_config(), 4)
    counts = collections.Counter()
    for _ in loader:
        counts.update(k.split("-")[0] for row in loader.last_keys for k in row if "@" not in k or "@0:" in k)
        if sum(counts.values()) >= 2000:
            break
    assert abs(counts["digits"] / sum(counts.values()) - 0.7) < 0.03


def test_packing_fills_95_percent_of_tokens(test_data):
    cfg = data_config(test_data["digits"], test_data["text"], weights=[0.5, 0.5], num_epochs=0, num_workers=0)
    loader = PackedLoader(cfg, model_config(), 4)
    real = total = 0
    for i, batch in enumerate(loader):
        real += int((batch.doc != -1).sum())
        total += batch.doc.numel()
        if i == 30:
            break
    assert real / total >= 0.95


def corrupt_copy(test_data, tmp_path, damage):
    dst = tmp_path / "digits"
    shutil.copytree(test_data["digits"], dst)
    damage(dst)
    return dst


def test_a_truncated_shard_is_skipped_and_counted(test_data, tmp_path):
    def truncate(d):
        path = d / "shard-000003.tar"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    path = corrupt_copy(test_data, tmp_path, truncate)
    loader = PackedLoader(data_config(path, num_workers=0), model_config(), 4)
    _, keys = run([loader])
    bad = loader.slot_states[0]["bad"]
    assert 0 < bad <= 200 and len(keys) + bad == 1797 and max(keys.values()) == 1


def test_bad_samples_of_every_kind_are_counted(test_data, tmp_path):
    import numpy as np
    w = ShardSetWriter(tmp_path / "bad", samples_per_shard=10)
    good = {"segments": [{"text": "a", "tokens": [20, 21]}, {"latent": "lat0.npy", "kind": "image", "shape": [1, 4, 4]}]}
    w.write("ok-0", good, {"lat0.npy": np.zeros((1, 4, 4), np.float16)})
    w.write("missing-npy", good, {})
    w.write("wrong-shape", good, {"lat0.npy": np.zeros((1, 4, 6), np.float16)})
    w.write("ok-1", good, {"lat0.npy": np.zeros((1, 4, 4), np.float16)})
    m = w.close(encoder={"type": "pixels"}, latent_channels=1, tokenizer={"fingerprint": "x", "vocab_size": 100})
    tar = Path(m.shard_path(0))
    tar.write_bytes(tar.read_bytes().replace(b'{"segments":[{"text":"a","tokens":[20,21]}', b'{"segments":[{"text":"a","tokens":[20,21]]', 1))
    loader = PackedLoader(data_config(tmp_path / "bad", num_workers=0), model_config(), 1)
    _, keys = run([loader])
    assert set(keys) == {"ok-1"} and loader.slot_states[0]["bad"] == 3


def test_an_all_corrupt_dataset_raises_a_clear_error(test_data, tmp_path):
    def garbage(d):
        for tar in d.glob("*.tar"):
            tar.write_bytes(b"\x00not a tar" * 100)

    path = corrupt_copy(test_data, tmp_path, garbage)
    loader = PackedLoader(data_config(path, num_workers=0, max_bad_samples=20), model_config(), 4)
    with pytest.raises(DataError, match=r"max_bad_samples=20.*shard-0000\d\d\.tar"):
        run([loader])


def test_a_fingerprint_mismatch_is_refused(test_data, tmp_path):
    cfg = data_config(test_data["digits"], num_workers=0)
    loader = PackedLoader(cfg, model_config(), 2)
    run([loader], limit=2)
    state = loader.state_dict()
    state["datasets"]["digits"]["fingerprint"] = "0" * 16
    with pytest.raises(DataError, match=r"fingerprint differs for .*digits \(dataset 'digits'\): its shards changed"):
        PackedLoader(cfg, model_config(), 2).load_state_dict(state)
    with pytest.raises(DataError, match="fingerprint differs"):  # (a state of the version before names)
        PackedLoader(cfg, model_config(), 2).load_state_dict(version_2(state))


def test_the_same_shards_written_from_another_checkout_have_the_same_fingerprint(test_data, tmp_path):
    """Where the tokenizer and the text files were is recorded but not fingerprinted, so a checkpoint's
    loader state resumes on the same data rebuilt elsewhere; a manifest hashed with them still loads."""
    from data_pipelines.shards import MANIFEST, fingerprint
    from data_pipelines.write_shards import write_shards
    made = []
    for where in ("a", "b"):
        shutil.copy(test_data["tokenizer"], tmp_path / f"tok-{where}.model")
        shutil.copytree(test_data["corpus"], tmp_path / f"corpus-{where}")
        made.append(write_shards("text", str(tmp_path / where), str(tmp_path / f"tok-{where}.model"), num_samples=50,
                                 input=[str(tmp_path / f"corpus-{where}")], max_chars=400, progress=False))
    assert made[0].tokenizer_path != made[1].tokenizer_path and made[0].fingerprint == made[1].fingerprint
    path = tmp_path / "a" / MANIFEST
    raw = json.loads(path.read_text())
    raw["fingerprint"] = fingerprint(raw, with_locations=True)  # as written before
    path.write_text(json.dumps(raw))
    assert load_manifest(tmp_path / "a").fingerprint == raw["fingerprint"]
    raw["tokenizer"]["vocab_size"] += 1
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="fingerprint does not match its contents"):
        load_manifest(tmp_path / "a")


def test_a_shard_set_without_samples_is_a_clear_error(tmp_path):
    ShardSetWriter(tmp_path / "empty", samples_per_shard=10).close(latent_channels=1)
    with pytest.raises(DataError, match="empty: the shard set holds no sample"):
        PackedLoader(data_config(tmp_path / "empty"), model_config(), 2)


def test_latent_channels_mismatch_is_a_clear_error(test_data):
    with pytest.raises(DataError, match="latent_channels"):
        PackedLoader(data_config(test_data["digits"]), model_config(latent_channels=4), 2)


def test_loader_batches_with_images_and_video_feed_the_model(test_data, tmp_path):
    from data_pipelines.write_shards import write_shards
    from model.transformer import UnifiedTransformer
    write_shards("moving_digits", str(tmp_path / "v"), str(test_data["tokenizer"]), channels=1, samples_per_shard=8,
                 num_samples=8, frames=4, canvas=16, progress=False)
    mc = model_config(mode="acdit", block_size=64)  # video: one 8x8-token frame per block
    cfg = data_config(test_data["digits"], tmp_path / "v", num_epochs=0, num_workers=0, seq_len=640)
    batch = next(b for b in itertools.islice(PackedLoader(cfg, mc, 2), 20) if (b.modality == 2).any())
    assert (batch.modality == 1).any()
    assert (batch.timestep[batch.noisy[batch.is_latent]] > 0).any()
    losses = UnifiedTransformer(mc).loss(batch)
    assert torch.isfinite(losses["loss"]) and losses["diffusion_loss"] > 0 and losses["lm_loss"] > 0


def test_caption_dropout_removes_the_caption(test_data):
    from model.special_tokens import BOS, EOI
    cfg = data_config(test_data["digits"], num_workers=0, caption_dropout=1.0, seq_len=64)
    batch = next(iter(PackedLoader(cfg, model_config(), 1)))
    row = batch.tokens[0][batch.doc[0] == 0].tolist()
    assert row[:2] == [BOS, BOI] and row[-2] == EOI  # <bos> <boi> latents <eoi> <eos>: no caption
    kept = next(iter(PackedLoader(cfg.replace(caption_dropout=0.0), model_config(), 1)))
    assert kept.tokens[0][2] != 8 and kept.tokens[0][1] != BOI


def test_a_dataset_of_only_oversized_documents_raises_instead_of_spinning(test_data):
    cfg = data_config(test_data["digits"], num_workers=0, seq_len=16, max_bad_samples=5)  # digits need ~30
    with pytest.raises(DataError, match=r"do not fit data.seq_len=16.*raise data.seq_len"):
        run([PackedLoader(cfg, model_config(), 1)], limit=1)


def test_the_token_ledger_counts_what_was_handed_out_across_a_layout_change(test_data):
    """Per dataset, documents, text targets and latent loss tokens: in the state of 2 ranks x 2 workers,
    folded into 3 ranks x 1 worker, and to the end of the epoch, equal to a recount of the batches."""
    cfg = data_config(test_data["digits"], test_data["text"], shards_in_flight=2)
    mc = model_config()

    def recount(batches):
        return [int(sum(b.text_loss.sum() for b in batches)), int(sum(b.latent_loss.sum() for b in batches))]

    def total(loaders):
        rows = [ld.ledger() for ld in loaders]
        return [[loaders[0].base_ledger[d][k] + sum(r[d][k] for r in rows) for k in range(3)] for d in range(2)]

    first = [PackedLoader(cfg, mc, 2, rank=r, world_size=2) for r in range(2)]
    early, _ = run(first, limit=5)
    ledger = total(first)
    assert [ledger[0][1] + ledger[1][1], ledger[0][2] + ledger[1][2]] == recount(early) and ledger[1][2] == 0
    state = json.loads(json.dumps(PackedLoader.merge_states([ld.state_dict() for ld in first])))
    resumed = [PackedLoader(cfg.replace(num_workers=1), mc, 2, rank=r, world_size=3) for r in range(3)]
    for ld in resumed:
        ld.load_state_dict(state)
    assert resumed[0].base_ledger == ledger
    late, _ = run(resumed)
    ledger = total(resumed)
    assert [ledger[0][1] + ledger[1][1], ledger[0][2] + ledger[1][2]] == recount(early + late)
    assert [ledger[0][0], ledger[1][0]] == [len(documents(test_data, "digits")), len(documents(test_data, "text"))]


RAMP = [{"step": 0, "weights": {"digits": 0.2}}, {"step": 150, "weights": {"digits": 0.8}}]
JUMP = [{"step": 0, "weights": {"digits": 0.1}}, {"step": 110, "weights": {"digits": 1.5}}]


@pytest.mark.parametrize("schedule,interpolate,digits,rows,more", [
    ([], True, lambda s: 0.5, 2, {}), (RAMP, True, lambda s: 0.2 + 0.6 * min(s, 150) / 150, 2, {}),
    (JUMP, False, lambda s: 0.1 if s < 110 else 1.5, 8, dict(num_workers=1, pack_buffer=16))])
def test_token_shares_hold_within_2_points_in_every_50_step_window(test_data, schedule, interpolate, digits, rows,
                                                                   more):
    """data.mix_by=tokens: the loss tokens of each 50-step window (measured by the ledger) are shared as
    the weights say, fixed or scheduled (digits linear from 0.2 to 0.8 by step 150, or 0.1 then 1.5 from
    step 110; text 0.5), past the first 50. A jump is met once the packing buffer is through: the
    slot counts what it handed out, its buffer at the weights of now (a buffer of a few batches here)."""
    cfg = data_config(test_data["digits"], test_data["text"], weights=[0.5, 0.5], mix_by="tokens", num_epochs=0,
                      schedule=schedule, interpolate=interpolate, **more)
    loader = PackedLoader(cfg, model_config(), rows, rank=0, world_size=1)
    ledgers = []
    for batch in itertools.islice(loader, 250):
        ledgers.append([text + latent for _, text, latent in loader.ledger()])
    assert schedule or loader.ledger()[1][2] == 0  # (text has no latent)
    for end in range(100, 251, 25):
        got = [a - b for a, b in zip(ledgers[end - 1], ledgers[end - 51])]
        want = sum(digits(s) / (digits(s) + 0.5) for s in range(end - 50, end)) / 50  # (text: 0.5)
        assert abs(got[0] / sum(got) - want) < 0.02, (end, got, want)


def test_a_state_saved_before_token_mixing_resumes_by_documents(test_data):
    """A state without mix_by, ledger and token targets (written before them) resumes, under a config
    that now mixes by tokens, with the batches its run would have had: by documents."""
    cfg = data_config(test_data["digits"], test_data["text"], num_epochs=0)
    mc = model_config()
    straight, _ = run([PackedLoader(cfg, mc, 2, rank=r, world_size=2) for r in range(2)], limit=8)
    first = [PackedLoader(cfg, mc, 2, rank=r, world_size=2) for r in range(2)]
    run(first, limit=3)
    state = version_2(json.loads(json.dumps(PackedLoader.merge_states([ld.state_dict() for ld in first]))))
    for key in ("mix_by", "ledger"):
        del state[key]
    for slot in state["slots"].values():
        del slot["ledger"], slot["target"]
    resumed = [PackedLoader(cfg.replace(mix_by="tokens"), mc, 2, rank=r, world_size=2) for r in range(2)]
    for ld in resumed:
        ld.load_state_dict(state)
    after, _ = run(resumed, limit=5)
    assert_same_batches(after, straight[3:8] + straight[11:16])
    again = json.loads(json.dumps(PackedLoader.merge_states([ld.state_dict() for ld in resumed])))
    later = PackedLoader(cfg.replace(mix_by="tokens"), mc, 2, rank=0, world_size=2)
    later.load_state_dict(again)
    assert later.cfg.mix_by == "documents"  # and at every later restart


def test_the_schedule_goes_on_from_the_saved_step_after_a_layout_change(test_data):
    """Digits only before step 10, text only from it: 2 slots run to step 10, then 1 rank with
    grad_accum 2 resumes at step 10 and reads text only; an evaluation loader of the same config reads its
    own sets by their weights, whatever the schedule."""
    cfg = data_config(test_data["digits"], test_data["text"], num_epochs=0, mix_by="tokens",
                      schedule=[{"step": 0, "weights": {"text": 0}}, {"step": 10, "weights": {"digits": 0, "text": 1}}],
                      interpolate=False)
    mc = model_config()
    first = PackedLoader(cfg, mc, 2, rank=0, world_size=1)
    run([first], limit=10)
    assert first.ledger()[1] == [0, 0, 0]  # no text before step 10 (each of the 2 slots' batches: 2 steps)
    state = json.loads(json.dumps(PackedLoader.merge_states([first.state_dict()])))
    resumed = PackedLoader(cfg.replace(num_workers=1), mc, 2, rank=0, world_size=1, batches_per_step=2)
    resumed.load_state_dict(state, step=10)
    before = resumed.base_ledger[0][2]
    run([resumed], limit=6)
    assert resumed.ledger()[0] == [0, 0, 0] and resumed.ledger()[1][1] > 0 and resumed.base_ledger[0][2] == before
    held_out = PackedLoader(cfg, mc, 2, datasets=[cfg.datasets[1], cfg.datasets[0]], num_epochs=1)
    run([held_out], limit=8)  # (steps 0-7 of the schedule, were it applied: text only)
    assert held_out.ledger()[0][1] > 0 and held_out.ledger()[1][2] > 0  # both sets read
