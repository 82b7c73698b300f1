"""import-llama / export-llama against transformers' own LlamaForCausalLM (tiny, random, saved locally),
and a training run started from an imported Llama."""
import dataclasses
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
PIECES, VOCAB = 400, 404  # the Llama's embedding has rows past its tokenizer's pieces, as some do


def hf_tokenizer(corpus, out):
    """A sentencepiece model trained as Llama's are (<unk>=0, <s>=1, </s>=2, no pad; no normalisation,
    spaces kept, a '▁' before the text), which transformers' conversion assumes."""
    import sentencepiece as spm
    from data_pipelines.sources import iter_text_files, text_lines
    lines = [line for line in text_lines(iter_text_files([corpus])) if line.strip()][:3000]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(out / "tokenizer"),
                                   vocab_size=PIECES, model_type="bpe", byte_fallback=True,
                                   character_coverage=0.995, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True, minloglevel=2)
    return out / "tokenizer.model"


@pytest.fixture(scope="module")
def tiny_llamas(test_data, tmp_path_factory):
    """{tied: folder}: a tiny random Llama (GQA, rope_theta 5e5, vocabulary padded past the pieces),
    with untied embeddings in sharded safetensors, and with tied ones in one file."""
    root = tmp_path_factory.mktemp("llama")
    tok = hf_tokenizer(test_data["corpus"], root)
    folders = {}
    for tied in (False, True):
        torch.manual_seed(int(tied))
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                       max_position_embeddings=256, tie_word_embeddings=tied, rms_norm_eps=1e-5)
        model = transformers.LlamaForCausalLM(cfg).eval()
        folders[tied] = root / f"tied={tied}"
        model.save_pretrained(folders[tied], max_shard_size="100KB" if not tied else "50MB")
        shutil.copyfile(tok, folders[tied] / "tokenizer.model")
    return folders


def our_logits(model, ids):
    from model.generate import text_batch
    from model.layout import LayoutSpec
    with torch.no_grad():
        return model.logits(text_batch(ids, 0, LayoutSpec.from_model_config(model.cfg), "cpu"))[0]


def hf_ids(folder, text="The Python tutorial: a for statement iterates over the items of any sequence."):
    import sentencepiece as spm
    return [1] + spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).encode(text)


def logit_gap(ours, theirs, folder, new_id) -> float:
    """Largest difference between our logits and transformers' on a sentence of the Llama's tokenizer
    (our ids and rows are the adopted tokenizer's)."""
    rows = new_id + [i + (ours.cfg.vocab_size - VOCAB) for i in range(len(new_id), VOCAB)]
    ids = hf_ids(folder)
    with torch.no_grad():
        want = theirs(torch.tensor([ids])).logits[0]
    return float((our_logits(ours, [new_id[i] for i in ids])[:, rows] - want).abs().max())


@pytest.mark.parametrize("tied", [False, True])
def test_imported_llama_gives_transformers_logits(tiny_llamas, tmp_path, tied):
    from data_pipelines.tokenizer import adopt_sentencepiece, load_tokenizer
    from model.transformer import UnifiedTransformer
    from pretrain.convert import main
    folder = tiny_llamas[tied]
    if not tied:
        assert (folder / "model.safetensors.index.json").is_file()  # sharded input
    assert main(["import-llama", str(folder), str(tmp_path / "release"), "model.latent_channels=1",
                 "model.patch_size=2", "model.objective=flow"]) == 0
    ours = UnifiedTransformer.from_pretrained(tmp_path / "release")
    assert ours.cfg.latent_channels == 1 and ours.cfg.rope_theta == 500000.0 and ours.cfg.n_kv_heads == 2
    _, new_id = adopt_sentencepiece(folder / "tokenizer.model", tmp_path / "again.model")
    assert logit_gap(ours, transformers.LlamaForCausalLM.from_pretrained(folder).eval(), folder, new_id) < 1e-4
    # the release's tokenizer is the Llama's with the reserved tokens first: the same text, the same pieces
    tok = load_tokenizer(tmp_path / "release" / "tokenizer.model")
    assert tok.encode("a for statement") == [new_id[i] for i in hf_ids(folder, "a for statement")[1:]]


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


@pytest.mark.parametrize("rope,knobs", [
    ({"rope_parameters": dict(LLAMA3, rope_theta=500000.0)}, dict(rope_scaling="llama3", rope_factor=8.0)),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0}},
     dict(rope_scaling="linear", rope_factor=4.0)),
    # both set (an edited config): transformers reads rope_scaling, and so does the import
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "rope_scaling": dict(LLAMA3, factor=2.0)},
     dict(rope_scaling="llama3", rope_factor=2.0, rope_theta=10000.0))])
def test_scaled_rotary_round_trips_with_transformers_logits(tiny_llamas, tmp_path, rope, knobs):
    from data_pipelines.tokenizer import adopt_sentencepiece
    from model.transformer import UnifiedTransformer
    from pretrain.convert import main
    folder = tmp_path / "llama"
    shutil.copytree(tiny_llamas[True], folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_theta", None)
    config.pop("rope_scaling", None)
    (folder / "config.json").write_text(json.dumps({**config, **rope}))
    theirs = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    _, new_id = adopt_sentencepiece(folder / "tokenizer.model", tmp_path / "again.model")
    assert main(["import-llama", str(folder), str(tmp_path / "release")]) == 0
    ours = UnifiedTransformer.from_pretrained(tmp_path / "release")
    assert {k: getattr(ours.cfg, k) for k in knobs} == knobs
    gap = logit_gap(ours, theirs, folder, new_id)
    plain = UnifiedTransformer.from_state_dict(dataclasses.replace(ours.cfg, rope_scaling="none"), ours.state_dict())
    assert gap < 1e-5 and logit_gap(plain, theirs, folder, new_id) > 1e-3  # the scaling matters to these logits
    assert main(["export-llama", str(tmp_path / "release"), str(tmp_path / "hf")]) == 0
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = [2, 40, 77, 120, 400, 9, 11, 300, 301, 5, 17, 250]
    with torch.no_grad():
        assert (our_logits(ours, ids) - back(torch.tensor([ids])).logits[0]).abs().max() < 1e-4


def test_an_unknown_rope_type_or_a_missing_field_is_named(tiny_llamas, tmp_path, capsys):
    from pretrain.convert import main
    for params, what in (({"rope_type": "yarn", "factor": 2.0}, "rope_type='yarn' is not supported"),
                         ({"rope_type": "llama3", "factor": 8.0}, "rope_type='llama3' without low_freq_factor")):
        folder = tmp_path / params["rope_type"]
        shutil.copytree(tiny_llamas[True], folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "rope_parameters": params}))
        assert main(["import-llama", str(folder), str(tmp_path / f"release-{params['rope_type']}")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and what in err[0], err


def test_an_empty_or_unreadable_tokenizer_is_named_and_nothing_is_written(tiny_llamas, tmp_path, capsys):
    from pretrain.convert import main
    for content, what in ((b"", "no pieces; 0 bytes"), (b"\xff" * 64, "not a sentencepiece model")):
        folder = tmp_path / f"llama-{len(content)}"
        shutil.copytree(tiny_llamas[True], folder)
        (folder / "tokenizer.model").write_bytes(content)
        assert main(["import-llama", str(folder), str(tmp_path / "release")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{folder / 'tokenizer.model'}: " in err[0] and what in err[0], err
        assert not (tmp_path / "release").exists() and not list(tmp_path.glob(".release.tmp*"))


def test_exported_model_loads_in_transformers_with_the_same_logits(tiny_llamas, tmp_path):
    from model.transformer import UnifiedTransformer
    from pretrain.convert import main
    assert main(["import-llama", str(tiny_llamas[False]), str(tmp_path / "release")]) == 0
    assert main(["export-llama", str(tmp_path / "release"), str(tmp_path / "hf")]) == 0
    ours = UnifiedTransformer.from_pretrained(tmp_path / "release")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = [2, 40, 77, 120, 400, 9, 11]
    with torch.no_grad():
        want = theirs(torch.tensor([ids])).logits[0]
    assert (our_logits(ours, ids) - want).abs().max() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.convert_tokens_to_ids(["<bos>", "<eos>", "<pad>"]) == [2, 3, 0]


@pytest.mark.parametrize("tokenizer", ["adopted", "project"])
def test_exported_tokenizer_encodes_as_ours(tiny_llamas, test_data, tmp_path, tokenizer):
    """An adopted Llama tokenizer puts '▁' before the text, the project's do not: transformers must
    encode as the release's own tokenizer does, either way."""
    from data_pipelines.tokenizer import load_tokenizer
    from model.model_config import ModelConfig
    from model.transformer import UnifiedTransformer
    from pretrain.convert import main
    from pretrain.export.release import save_release
    if tokenizer == "adopted":
        assert main(["import-llama", str(tiny_llamas[True]), str(tmp_path / "release")]) == 0
    else:
        model = UnifiedTransformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=1000))
        save_release(model, tmp_path / "release", {"encoder": None, "latent_shapes": {}}, test_data["tokenizer"])
    assert main(["export-llama", str(tmp_path / "release"), str(tmp_path / "hf")]) == 0
    ours = load_tokenizer(tmp_path / "release" / "tokenizer.model")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ("a handwritten digit seven", "The for statement iterates over items."):
        assert theirs(text)["input_ids"] == [2] + ours.encode(text)


def test_export_refuses_a_model_a_llama_cannot_hold(tmp_path, capsys):
    from model.model_config import ModelConfig
    from model.transformer import UnifiedTransformer
    from pretrain.convert import main
    UnifiedTransformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, qk_norm=True)).save_pretrained(
        tmp_path / "release")
    assert main(["export-llama", str(tmp_path / "release"), str(tmp_path / "hf")]) == 2
    assert "qk_norm=True" in capsys.readouterr().err and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("field,value", [("hidden_act", "gelu"), ("attention_bias", True), ("mlp_bias", True)])
def test_an_hf_config_that_is_not_llama_names_the_field(tiny_llamas, tmp_path, capsys, field, value):
    from pretrain.convert import main
    folder = tmp_path / "llama"
    shutil.copytree(tiny_llamas[True], folder)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["import-llama", str(folder), str(tmp_path / "release")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{field}={value!r} is not Llama-compatible" in err[0], err
    assert not (tmp_path / "release").exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_a_run_starts_from_an_imported_llama_and_refuses_other_shards(tiny_llamas, test_data, tmp_path):
    """init_from: the run starts from the release's weights (at lr 0 its checkpoint holds them
    unchanged); shards written with the demo tokenizer are refused with one line."""
    from data_pipelines.write_shards import write_shards
    from pretrain.convert import main
    from tests.launch import metrics, torchrun
    release = tmp_path / "release"
    assert main(["import-llama", str(tiny_llamas[False]), str(release), "model.latent_channels=1"]) == 0
    common = dict(encoder="pixels", channels=1, progress=False)
    write_shards("digits", str(tmp_path / "digits"), str(release / "tokenizer.model"), num_samples=64, **common)
    write_shards("text", str(tmp_path / "text"), str(release / "tokenizer.model"), num_samples=64,
                 input=[str(test_data["corpus"])], max_chars=400, **common)
    cfg = json.loads((release / "config.json").read_text())
    model = [f"model.{k}={v}" for k, v in cfg.items() if k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                                                               "vocab_size", "rope_theta", "norm_eps")]
    data = f"data.datasets=[{{path: {tmp_path / 'digits'}, weight: 0.5}}, {{path: {tmp_path / 'text'}, weight: 0.5}}]"
    base = ["--config", "configs/tiny-cpu.yaml", "wandb.mode=disabled", "train.max_steps=2", "train.log_interval=1",
            "data.num_workers=0", "train.eval_interval=0", "model.qk_norm=false", "model.patch_size=2", *model]
    r = torchrun(2, [*base, f"run.dir={tmp_path / 'run'}", data, f"train.init_from={release}", "train.lr=0"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(metrics(tmp_path / "run")) == [1, 2]
    from model.weights import load_weights
    from pretrain.checkpoint.reader import CheckpointReader
    want, got = load_weights(release), CheckpointReader(tmp_path / "run/checkpoints/step_00000002").state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    from data_pipelines.tokenizer import train_tokenizer
    other = train_tokenizer(["a handwritten digit " + w for w in ("one", "two", "three")] * 50, tmp_path / "o.model", 300)
    write_shards("digits", str(tmp_path / "other-digits"), str(other.path), num_samples=8, **common)
    r = torchrun(2, [*base, f"run.dir={tmp_path / 'other'}", f"data.datasets.0.path={tmp_path / 'other-digits'}",
                     f"data.datasets.1.path={tmp_path / 'text'}", f"train.init_from={release}"])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert r.returncode != 0 and errors and all("was tokenized with" in e and "--tokenizer" in e for e in errors), \
        r.stderr[-3000:]
