"""import-llama / export-llama of a Llama 3-style model (byte-level BPE `tokenizer.json` built with the
`tokenizers` library, `rope_type: llama3`, added tokens) and of a sentencepiece Llama with added tokens,
against transformers' own LlamaForCausalLM and AutoTokenizer."""
import json
import shutil

import pytest
import torch

from tests.test_llama import our_logits, tiny_llamas  # noqa: F401  (tiny_llamas: a fixture)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
BOT, EOT, CHAT = "<|begin_of_text|>", "<|end_of_text|>", ["<|im_start|>", "<|im_end|>"]
TEXT = "<|im_start|>user The for statement iterates over items, ü ∑ 日本.<|im_end|>"
TEXTS = [TEXT, "user: a for statement", "a <|im_start|> b", "x<|im_end|>\ny  z", " two  spaces first",
         "the reserved names <pad> <eos> <bos> <unk> in text", f"{BOT}renamed tokens keep their text{EOT}"]
RESERVED_TEXT = TEXTS[-2]


def bpe_tokenizer(corpus, out, size=360):
    """A Llama 3-like tokenizer.json: byte-level BPE, begin/end of text and chat tokens added after the
    vocabulary, a post-processor that puts the begin token first."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from data_pipelines.sources import iter_text_files, text_lines
    lines = [line for line in text_lines(iter_text_files([corpus])) if line.strip()][:3000]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=size, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([BOT, EOT, *CHAT])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOT} $A", special_tokens=[(BOT, tok.token_to_id(BOT))])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                           "bos_token": BOT, "eos_token": EOT}))
    return tok


@pytest.fixture(scope="module")
def llama3(test_data, tmp_path_factory):
    """A tiny random Llama 3: byte-level BPE, llama3 rotary scaling, 4 rows past the tokenizer's tokens."""
    folder = tmp_path_factory.mktemp("llama3")
    tok = bpe_tokenizer(test_data["corpus"], folder)
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size() + 4, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        bos_token_id=tok.token_to_id(BOT), eos_token_id=tok.token_to_id(EOT), tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def rows_of(new_id, ours_vocab, theirs_vocab):
    """Our row of each of their rows (rows past the tokenizer's tokens keep their order after ours)."""
    return new_id + [i + (ours_vocab - theirs_vocab) for i in range(len(new_id), theirs_vocab)]


def check_round_trip(source, release, exported, new_id, text=TEXT):
    """Our logits are the source model's (rows moved with their tokens); the exported folder gives
    transformers the same logits on our ids; AutoTokenizer of either folder encodes as ours does."""
    from data_pipelines.tokenizer import SENTENCEPIECE_FILE, adds_prefix_space, find_tokenizer, load_tokenizer
    from model.special_tokens import SPECIAL_TOKENS
    from model.transformer import UnifiedTransformer
    ours = UnifiedTransformer.from_pretrained(release)
    theirs = transformers.LlamaForCausalLM.from_pretrained(source).eval()
    tok, source_tok = load_tokenizer(find_tokenizer(release)), transformers.AutoTokenizer.from_pretrained(source)
    source_ids = [new_id.index(2)] + source_tok(text, add_special_tokens=False)["input_ids"]  # bos first
    assert [new_id[i] for i in source_ids] == [2] + tok.encode(text)  # the same tokens, renumbered
    rows = rows_of(new_id, ours.cfg.vocab_size, theirs.config.vocab_size)
    with torch.no_grad():
        want = theirs(torch.tensor([source_ids])).logits[0]
        assert (our_logits(ours, [new_id[i] for i in source_ids])[:, rows] - want).abs().max() < 1e-4
        back = transformers.LlamaForCausalLM.from_pretrained(exported).eval()
        ids = [2] + tok.encode(text)
        assert (our_logits(ours, ids) - back(torch.tensor([ids])).logits[0]).abs().max() < 1e-4
    exported_tok = transformers.AutoTokenizer.from_pretrained(exported)
    prefix = tok.path.name == SENTENCEPIECE_FILE and adds_prefix_space(tok.path)
    byte_level = tok.path.name != SENTENCEPIECE_FILE and json.loads(tok.path.read_text())["decoder"]["type"] == "ByteLevel"
    matched = (SPECIAL_TOKENS if prefix else  # reserved tokens matched in text
               [a.content for i, a in tok.hf.get_added_tokens_decoder().items() if i < len(SPECIAL_TOKENS)])
    for text in TEXTS:
        if not (prefix and text == RESERVED_TEXT):  # transformers matches a sentencepiece Llama's control
            # pieces in text: the names that replaced its <s> </s> are matched there, its old ones not
            assert [new_id[i] for i in source_tok(text, add_special_tokens=False)["input_ids"]] == tok.encode(text), text
        assert exported_tok(text)["input_ids"] == [2] + tok.encode(text), text
        # the reserved ids (the renamed begin/end of text, ...) are dropped by decoding; a Llama's '▁'
        # prefix makes decoding unsure of spaces next to the text's start and its added tokens
        want, got = text, tok.decode(tok.encode(text))
        for name in matched:
            want = want.replace(name, "")
        assert got == want if byte_level else got.replace(" ", "") == want.replace(" ", "")


def test_a_llama3_with_a_bpe_tokenizer_round_trips(llama3, tmp_path):
    from data_pipelines.tokenizer_json import adopt_tokenizer_json
    from pretrain.convert import main
    assert main(["import-llama", str(llama3), str(tmp_path / "release"), "model.latent_channels=1"]) == 0
    assert (tmp_path / "release/tokenizer.json").is_file() and not (tmp_path / "release/tokenizer.model").exists()
    config = json.loads((tmp_path / "release/config.json").read_text())
    assert config["rope_scaling"] == "llama3" and config["rope_factor"] == 8.0
    source = tokenizers.Tokenizer.from_file(str(llama3 / "tokenizer.json"))
    _, new_id = adopt_tokenizer_json(llama3 / "tokenizer.json", tmp_path / "again.json",
                                     {source.token_to_id(BOT): "<bos>", source.token_to_id(EOT): "<eos>"})
    assert new_id[source.token_to_id(BOT)] == 2 and new_id[source.token_to_id(EOT)] == 3
    assert main(["export-llama", str(tmp_path / "release"), str(tmp_path / "hf")]) == 0
    check_round_trip(llama3, tmp_path / "release", tmp_path / "hf", new_id)


def test_a_sentencepiece_llama_keeps_the_tokens_its_folder_adds(tiny_llamas, tmp_path):
    """added_tokens.json / tokenizer_config.json's added_tokens_decoder: the tokens move with their
    rows and are matched in text as transformers matches them."""
    from data_pipelines.tokenizer import adopt_sentencepiece
    from pretrain.convert import main
    folder = tmp_path / "llama"
    shutil.copytree(tiny_llamas[True], folder)
    (folder / "added_tokens.json").write_text(json.dumps({CHAT[0]: 400, CHAT[1]: 401}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        "0": {"content": "<unk>", "special": True}, "400": {"content": CHAT[0], "special": True},
        "401": {"content": CHAT[1], "special": True}}, "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True}))
    assert main(["import-llama", str(folder), str(tmp_path / "release")]) == 0
    _, new_id = adopt_sentencepiece(folder / "tokenizer.model", tmp_path / "again.model", {},
                                    {400: CHAT[0], 401: CHAT[1]})
    assert len(new_id) == 402 and new_id[400] == 9 + 400 - 3  # 400 pieces (3 become reserved), 2 added tokens
    assert main(["export-llama", str(tmp_path / "release"), str(tmp_path / "hf")]) == 0
    check_round_trip(folder, tmp_path / "release", tmp_path / "hf", new_id)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_llama3_trains_on_2_ranks_under_zero3_and_exports_unchanged(llama3, test_data, tmp_path):
    """import -> shards written with its tokenizer.json -> 2 ranks, ZeRO-3, workers and evaluation on,
    lr 0 -> the checkpoint holds the imported weights and carries the tokenizer -> to-release ->
    export-llama: transformers' logits and AutoTokenizer as the source's."""
    from data_pipelines.tokenizer_json import adopt_tokenizer_json
    from data_pipelines.write_shards import write_shards
    from model.weights import load_weights
    from pretrain.checkpoint.reader import CheckpointReader
    from pretrain.convert import main
    from tests.launch import metrics, torchrun
    release = tmp_path / "release"
    assert main(["import-llama", str(llama3), str(release), "model.latent_channels=1", "model.patch_size=2",
                 "model.objective=flow"]) == 0
    tok = str(release / "tokenizer.json")
    common = dict(encoder="pixels", channels=1, progress=False)
    write_shards("digits", str(tmp_path / "digits"), tok, num_samples=64, **common)
    write_shards("digits", str(tmp_path / "heldout"), tok, num_samples=16, split="heldout", **common)
    write_shards("text", str(tmp_path / "text"), tok, num_samples=64, input=[str(test_data["corpus"])],
                 max_chars=400, **common)
    cfg = json.loads((release / "config.json").read_text())
    model = [f"model.{k}={v}" for k, v in cfg.items() if k in (
        "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "rope_theta", "norm_eps", "rope_scaling",
        "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_seq_len")]
    r = torchrun(2, ["--config", "configs/tiny-cpu.yaml", "wandb.mode=disabled", "train.max_steps=2",
                     "train.log_interval=1", "train.eval_interval=2", "train.zero_stage=3", "model.qk_norm=false",
                     "model.patch_size=2", *model, f"run.dir={tmp_path / 'run'}", f"train.init_from={release}",
                     "train.lr=0", "train.sample_prompts=[a handwritten digit one]", "train.samples_per_prompt=1",
                     "train.sample_steps=2",
                     f"data.datasets=[{{path: {tmp_path / 'digits'}, weight: 0.5}}, {{path: {tmp_path / 'text'}, weight: 0.5}}]",
                     f"data.eval_datasets=[{{path: {tmp_path / 'heldout'}}}]"])
    assert r.returncode == 0, r.stderr[-3000:]
    logged = metrics(tmp_path / "run")
    assert sorted(logged) == [1, 2] and any(k.startswith("eval/") for k in logged[2]), logged
    for record in logged.values():  # the token ledger: every loss token trained on, by dataset
        assert record["data/digits/tokens"] + record["data/text/tokens"] == record["text_tokens"] + record["latent_tokens"]
        assert record["data/digits/share"] + record["data/text/share"] == pytest.approx(1.0)
    ckpt = tmp_path / "run/checkpoints/step_00000002"
    want, got = load_weights(release), CheckpointReader(ckpt).state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert (ckpt / "tokenizer.json").read_bytes() == (release / "tokenizer.json").read_bytes()
    assert main(["to-release", str(tmp_path / "run"), str(tmp_path / "trained")]) == 0
    assert main(["export-llama", str(tmp_path / "trained"), str(tmp_path / "hf")]) == 0
    source = tokenizers.Tokenizer.from_file(str(llama3 / "tokenizer.json"))
    _, new_id = adopt_tokenizer_json(llama3 / "tokenizer.json", tmp_path / "again.json",
                                     {source.token_to_id(BOT): "<bos>", source.token_to_id(EOT): "<eos>"})
    check_round_trip(llama3, tmp_path / "trained", tmp_path / "hf", new_id)


def _wordpiece(path):
    from tokenizers import models
    tokenizers.Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(path))


def _hole(path):
    doc = json.loads(path.read_text())
    doc["model"]["vocab"] = {t: i + (i >= 100) for t, i in doc["model"]["vocab"].items()}
    doc["added_tokens"] = [dict(a, id=a["id"] + 1) for a in doc["added_tokens"]]
    path.write_text(json.dumps(doc))


def _twice(path):  # an added token repeating a vocabulary word at another id
    doc = json.loads(path.read_text())
    word = next(t for t, i in doc["model"]["vocab"].items() if i == 300)
    doc["added_tokens"].append(dict(doc["added_tokens"][-1], id=max(a["id"] for a in doc["added_tokens"]) + 1,
                                    content=word))
    path.write_text(json.dumps(doc))


def _bad_merge(path):  # a merge of pieces the vocabulary lacks: tokenizers itself refuses the file
    doc = json.loads(path.read_text())
    doc["model"]["merges"][0] = ["zzzq", "qqqz"]
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("break_it,what", [
    (lambda p: p.write_bytes(b""), "tokenizer.json: not a tokenizers JSON file"),
    (lambda p: p.write_bytes(b"\xff\xfe{"), "tokenizer.json: not a tokenizers JSON file"),
    (_wordpiece, "a 'WordPiece' tokenizer model; only BPE"),
    (_hole, "no token has id 100"),
    (_twice, "has two ids"),
    (_bad_merge, "not a tokenizers JSON file (Token `zzzq` out of vocabulary")])
def test_a_tokenizer_json_that_cannot_be_adopted_is_one_line_naming_it(llama3, tmp_path, capsys, break_it, what):
    from pretrain.convert import main
    folder = tmp_path / "llama"
    shutil.copytree(llama3, folder)
    break_it(folder / "tokenizer.json")
    assert main(["import-llama", str(folder), str(tmp_path / "release")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(folder) in err[0] and what in err[0], err
    assert not (tmp_path / "release").exists()


def test_added_tokens_that_leave_a_gap_are_refused(tiny_llamas, tmp_path, capsys):
    from pretrain.convert import main
    folder = tmp_path / "llama"
    shutil.copytree(tiny_llamas[True], folder)
    (folder / "added_tokens.json").write_text(json.dumps({CHAT[0]: 401}))
    assert main(["import-llama", str(folder), str(tmp_path / "release")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[401] do not follow its 400 pieces without a gap" in err[0], err


def test_an_adopted_tokenizer_json_drops_padding_and_truncation_and_ignores_roles_past_it(llama3, tmp_path):
    """A source that pads and truncates (its pad id would now be another token's), and a config
    whose pad id is -1 or a row past the tokenizer: the adopted tokenizer encodes every token."""
    from data_pipelines.tokenizer_json import adopt_tokenizer_json
    source = tokenizers.Tokenizer.from_file(str(llama3 / "tokenizer.json"))
    source.enable_truncation(8)
    source.enable_padding(length=12, pad_id=301, pad_token=source.id_to_token(301))
    source.save(str(tmp_path / "tokenizer.json"))
    text = " ".join(["the for statement iterates over items"] * 4)
    size = source.get_vocab_size()
    for pad in (-1, size + 2):
        tok, new_id = adopt_tokenizer_json(tmp_path / "tokenizer.json", tmp_path / f"out{pad}.json",
                                           {source.token_to_id(EOT): "<eos>", pad: "<pad>"})
        source.no_truncation()
        source.no_padding()
        assert tok.encode(text) == [new_id[i] for i in source.encode(text, add_special_tokens=False).ids]
        assert len(new_id) == size and tok.vocab_size == size + 9 - 1


def test_a_llama_folder_with_both_files_is_adopted_from_the_tokenizer_json_transformers_wrote(tiny_llamas, tmp_path):
    """A Llama 2-style folder as transformers saves it (tokenizer.model and the tokenizer.json it
    converted, with added tokens): the release's tokenizer is the JSON, which AutoTokenizer reads."""
    from data_pipelines.tokenizer_json import adopt_tokenizer_json
    from pretrain.convert import main
    folder = tmp_path / "llama"
    shutil.copytree(tiny_llamas[True], folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    theirs.add_special_tokens({"additional_special_tokens": CHAT})
    theirs.save_pretrained(folder)
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer.model").is_file()
    assert main(["import-llama", str(folder), str(tmp_path / "release")]) == 0
    assert (tmp_path / "release/tokenizer.json").is_file() and not (tmp_path / "release/tokenizer.model").exists()
    _, new_id = adopt_tokenizer_json(folder / "tokenizer.json", tmp_path / "again.json", {2: "<eos>", 1: "<bos>"})
    assert main(["export-llama", str(tmp_path / "release"), str(tmp_path / "hf")]) == 0
    check_round_trip(folder, tmp_path / "release", tmp_path / "hf", new_id)
