"""Hugging Face Llama folders in and out: the text path of the UnifiedTransformer is a Llama.

    python -m pretrain.convert import-llama HF_DIR OUT [model.latent_channels=4 model.patch_size=2 ...]
    python -m pretrain.convert export-llama RELEASE OUT

`import-llama` reads a `LlamaForCausalLM` folder (config.json, safetensors, sharded or not; GQA;
tied or untied embeddings; rope_theta) into a release folder: the backbone and LM head come
from it, the latent parts (patch projection, timestep embedding, adaLN, latent head) are
freshly initialised. Its tokenizer (`tokenizer.json`, e.g. a byte-level BPE, as transformers
reads it; else the sentencepiece `tokenizer.model` with the tokens `added_tokens.json` or
`tokenizer_config.json` add) becomes the release's with the project's reserved tokens put first and the config's bos/eos/pad
renamed to them (data_pipelines.tokenizer): the embedding and LM-head rows move with their tokens,
the rows of the new reserved tokens are initialised. Shards for training on it are written with
that tokenizer (`--tokenizer RELEASE/tokenizer.model` or `.json`). `export-llama` writes the text
path of a release as a folder `LlamaForCausalLM.from_pretrained` and `AutoTokenizer` load.
Tensors are streamed, one at a time.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import torch

from model.config_system import ConfigError, InputMissing
from model.model_config import ModelConfig
from model.special_tokens import BOS, EOS, PAD, SPECIAL_TOKENS
from model.weights import ByteProgress, Entry, LazyWeights, WeightsError, state_entries, write_weights
from pretrain.export.staging import staged_folder

HF_CONFIG, HF_TOKENIZER_CONFIG, HF_ADDED_TOKENS = "config.json", "tokenizer_config.json", "added_tokens.json"
VOCAB_ROWS = ("tok_emb.weight", "lm_head.weight")  # rows indexed by token id


def llama_names(n_layers: int) -> dict[str, str]:
    """Our parameter name -> the Hugging Face Llama one, for the whole text path."""
    names = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    per_layer = {"attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
                 "attn.wo": "self_attn.o_proj", "ffn.w1": "mlp.gate_proj", "ffn.w3": "mlp.up_proj",
                 "ffn.w2": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(n_layers):
        for ours, theirs in per_layer.items():
            names[f"blocks.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


ROPE_FIELDS = {"linear": {"factor": "rope_factor"},
               "llama3": {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
                          "high_freq_factor": "rope_high_freq_factor",
                          "original_max_position_embeddings": "rope_original_max_seq_len"}}  # theirs -> our knob


def rope_knobs(hf: dict, where: Path) -> dict:
    """Our rotary knobs for a Hugging Face config, read as transformers reads it: `rope_scaling` (the
    older name) wins over `rope_parameters` when both are set, a `rope_theta` inside it over the
    top-level one, and llama3's original context length is the top-level
    `original_max_position_embeddings`, else the one inside, else `max_position_embeddings`."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    knobs = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind == "default":
        return knobs
    if kind not in ROPE_FIELDS:
        raise ConfigError(f"{where}: rope_type={kind!r} is not supported (default, linear and llama3 are)")
    if kind == "llama3":
        params["original_max_position_embeddings"] = hf.get(
            "original_max_position_embeddings", params.get("original_max_position_embeddings",
                                                           hf.get("max_position_embeddings", 2048)))
    for theirs, ours in ROPE_FIELDS[kind].items():
        if theirs not in params:
            raise ConfigError(f"{where}: rope_type={kind!r} without {theirs}")
        knobs[ours] = type(getattr(ModelConfig(), ours))(params[theirs])
    return dict(knobs, rope_scaling=kind)


def rope_parameters(cfg: ModelConfig) -> dict:
    """The Hugging Face `rope_parameters` of our rotary knobs."""
    params = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    for theirs, ours in ROPE_FIELDS.get(cfg.rope_scaling, {}).items():
        params[theirs] = getattr(cfg, ours)
    return params


def model_config_from_llama(hf: dict, where: Path, **latent) -> ModelConfig:
    """Our ModelConfig for a Hugging Face Llama config (its fields checked; `latent`: our own knobs)."""
    def need(field, ok, why):
        if not ok:
            raise ConfigError(f"{where}: {field}={hf.get(field)!r} is not Llama-compatible ({why})")
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if field not in hf:
            raise ConfigError(f"{where}: no {field} (not a Llama config)")
    need("model_type", hf.get("model_type") == "llama", "expected 'llama'")
    need("hidden_act", hf.get("hidden_act", "silu") == "silu", "SwiGLU needs silu")
    need("attention_bias", not hf.get("attention_bias", False), "no biases")
    need("mlp_bias", not hf.get("mlp_bias", False), "no biases")
    heads = hf["num_attention_heads"]
    need("head_dim", hf.get("head_dim") in (None, hf["hidden_size"] // heads), "must be hidden_size / heads")
    return ModelConfig(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
                       n_kv_heads=hf.get("num_key_value_heads") or heads, ffn_dim=hf["intermediate_size"],
                       vocab_size=hf["vocab_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                       **rope_knobs(hf, where),
                       max_seq_len=hf.get("max_position_embeddings", 4096), **latent)


def import_llama(hf_dir: str | Path, out: str | Path, seed: int = 0, progress: bool = False, **latent) -> Path:
    """A release folder whose text path is the Llama in `hf_dir` (see the module doc)."""
    from model.transformer import UnifiedTransformer
    from pretrain.export.release import stamp, write_release
    hf_dir = Path(hf_dir)
    if not (hf_dir / HF_CONFIG).is_file():
        raise InputMissing(f"{hf_dir / HF_CONFIG}: missing (not a Hugging Face model folder)")
    hf = json.loads((hf_dir / HF_CONFIG).read_text())
    theirs = LazyWeights(hf_dir)
    scratch = Path(tempfile.mkdtemp(prefix="import-llama-"))
    try:
        tokenizer, new_id, source = adopt_hf_tokenizer(hf_dir, hf, scratch)
        added = tokenizer.vocab_size - len(new_id)  # reserved tokens the source had no piece for
        base = model_config_from_llama(hf, hf_dir / HF_CONFIG, **latent)
        if hf["vocab_size"] < len(new_id):
            raise ConfigError(f"{hf_dir / HF_CONFIG}: vocab_size={hf['vocab_size']} is smaller than the "
                              f"tokenizer's {len(new_id)} pieces")
        cfg = dataclasses.replace(base, vocab_size=hf["vocab_size"] + added)
        rows = list(new_id) + [i + added for i in range(len(new_id), hf["vocab_size"])]  # rows past the pieces
        names = llama_names(cfg.n_layers)
        if "lm_head.weight" not in theirs:
            if not hf.get("tie_word_embeddings", False):
                raise WeightsError("lm_head.weight: missing from the Hugging Face weights (and not tied)")
            names["lm_head.weight"] = "model.embed_tokens.weight"
        torch.manual_seed(seed)
        fresh = _fresh_latent_parts(cfg)

        def get(name: str) -> torch.Tensor:
            if name not in names:
                return fresh[name]
            t = theirs.get(names[name]).float()
            if name in VOCAB_ROWS:  # rows move with their pieces; the new reserved tokens get fresh rows
                if t.shape[0] != len(rows):
                    raise WeightsError(f"{names[name]}: {t.shape[0]} rows, config.json's vocab_size is {len(rows)}")
                out_rows = torch.randn(cfg.vocab_size, t.shape[1], generator=torch.Generator().manual_seed(seed))
                out_rows *= cfg.init_std
                out_rows[torch.tensor(rows)] = t
                return out_rows
            return t

        with torch.device("meta"):
            shell = UnifiedTransformer(cfg)
        entries = state_entries(shell.state_dict(), torch.float32)
        info = {"encoder": None, "latent_shapes": {},
                "provenance": stamp({"source": f"import-llama {hf_dir.resolve()}", "step": 0, "tokens_seen": 0,
                                     "weights": "imported", "tokenizer": f"{source} with the "
                                     f"project's reserved tokens first ({added} added)"})}
        with ByteProgress(entries, "import-llama", progress) as bar:
            return write_release(out, cfg, entries, get, info, tokenizer.path, progress=bar)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def adopt_hf_tokenizer(hf_dir: Path, hf: dict, scratch: Path):
    """(tokenizer, new_id[old_id], source file) of a Hugging Face folder's tokenizer, adopted into
    `scratch`: its `tokenizer.json` (what transformers' AutoTokenizer reads when it is there), else
    its sentencepiece `tokenizer.model` with the tokens the folder adds. The config's eos, bos and
    pad ids (eos first, when one id is both) become the reserved `<eos>`, `<bos>`, `<pad>` (in a
    sentencepiece model, after its own unk/bos/eos pieces)."""
    from data_pipelines.tokenizer import JSON_FILE, SENTENCEPIECE_FILE, adopt_sentencepiece
    from data_pipelines.tokenizer_json import adopt_tokenizer_json
    roles = {}
    for role in ("eos", "bos", "pad"):
        ids = hf.get(f"{role}_token_id")
        ids = ids[:1] if isinstance(ids, list) else [ids]  # a list of end ids: the first is the end of text
        if ids and isinstance(ids[0], int) and ids[0] not in roles:
            roles[ids[0]] = f"<{role}>"
    if (hf_dir / JSON_FILE).is_file():
        return *adopt_tokenizer_json(hf_dir / JSON_FILE, scratch / JSON_FILE, roles), hf_dir / JSON_FILE
    if (hf_dir / SENTENCEPIECE_FILE).is_file():
        return (*adopt_sentencepiece(hf_dir / SENTENCEPIECE_FILE, scratch / SENTENCEPIECE_FILE, roles,
                                     added_tokens(hf_dir)), hf_dir / SENTENCEPIECE_FILE)
    raise InputMissing(f"{hf_dir}: no {SENTENCEPIECE_FILE} or {JSON_FILE} (import-llama needs the tokenizer: "
                       "the project's shards are written with it)")


def added_tokens(hf_dir: Path) -> dict[int, str]:
    """id -> text of the tokens a Hugging Face folder adds to its sentencepiece model
    (`added_tokens.json`, and `tokenizer_config.json`'s `added_tokens_decoder`)."""
    found = {}
    for name, read in ((HF_ADDED_TOKENS, lambda d: {int(i): t for t, i in d.items()}),
                       (HF_TOKENIZER_CONFIG, lambda d: {int(i): a["content"] for i, a in
                                                        (d.get("added_tokens_decoder") or {}).items()})):
        if (hf_dir / name).is_file():
            try:
                for i, text in read(json.loads((hf_dir / name).read_text())).items():
                    if found.setdefault(i, text) != text:
                        raise ValueError(f"{hf_dir / name}: id {i} is {text!r}, elsewhere {found[i]!r}")
            except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
                raise ValueError(f"{hf_dir / name}: not a Hugging Face tokenizer file ({e})") from None
    return found


def _fresh_latent_parts(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The freshly initialised tensors that a Llama lacks (latent in/out, timestep embedding, adaLN),
    made by the model's own initialisation on a copy with no blocks and one token."""
    from model.transformer import UnifiedTransformer
    small = UnifiedTransformer(dataclasses.replace(cfg, n_layers=1, vocab_size=1))
    state = small.state_dict()
    fresh = {k: v for k, v in state.items() if not k.startswith(("blocks.", "tok_emb.", "lm_head.", "norm."))}
    for i in range(cfg.n_layers):
        fresh[f"blocks.{i}.ada_table"] = state["blocks.0.ada_table"]
    return fresh


def export_llama(release: str | Path, out: str | Path, dtype: str = "fp32", progress: bool = False) -> Path:
    """The text path of a release folder as a Hugging Face Llama folder (safetensors + config.json +
    the release's tokenizer, of either back-end); OUT is complete or absent."""
    from data_pipelines.tokenizer import find_tokenizer
    from model.transformer import CONFIG_FILE
    release, out = Path(release), Path(out)
    if not (release / CONFIG_FILE).is_file():
        raise InputMissing(f"{release / CONFIG_FILE}: missing (not a release folder)")
    cfg = ModelConfig.from_dict(json.loads((release / CONFIG_FILE).read_text()))
    if cfg.qk_norm:
        raise ConfigError(f"{release / CONFIG_FILE}: qk_norm=True: a Llama has no query/key norms")
    ours = LazyWeights(release)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    names = llama_names(cfg.n_layers)
    entries = [Entry(theirs, ours.shape(name), torch_dtype) for name, theirs in names.items()]
    back = {theirs: name for name, theirs in names.items()}
    with staged_folder(out) as tmp:
        with ByteProgress(entries, "export-llama", progress) as bar:
            write_weights(tmp, entries, lambda theirs: ours.get(back[theirs]), progress=bar)
        (tmp / HF_CONFIG).write_text(json.dumps(llama_config(cfg, dtype), indent=2) + "\n")
        tokenizer = find_tokenizer(release)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / tokenizer.name)
            (tmp / HF_TOKENIZER_CONFIG).write_text(json.dumps(hf_tokenizer_config(tokenizer), indent=2) + "\n")
    return out


def hf_tokenizer_config(tokenizer: Path) -> dict:
    """The `tokenizer_config.json` that makes transformers' AutoTokenizer encode as the release's
    tokenizer does, with `<bos>` first (the JSON back-end's post-processor adds it). A JSON
    tokenizer names only the roles whose text is matched in text (an adopted source's own tokens):
    transformers would make a named one matched."""
    from data_pipelines.tokenizer import JSON_FILE, adds_prefix_space, load_tokenizer
    names = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}
    if tokenizer.name == JSON_FILE:
        tok = load_tokenizer(tokenizer)
        matched = {a.content for a in tok.hf.get_added_tokens_decoder().values()}
        roles = {key: tok.id_to_piece(SPECIAL_TOKENS.index(name)) for key, name in names.items()}
        return {"tokenizer_class": "PreTrainedTokenizerFast", **{k: v for k, v in roles.items() if v in matched}}
    return {"tokenizer_class": "LlamaTokenizer", **names, "add_bos_token": True, "add_eos_token": False,
            "legacy": False, "add_prefix_space": adds_prefix_space(tokenizer)}


def llama_config(cfg: ModelConfig, dtype: str = "fp32") -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
            "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "rope_parameters": rope_parameters(cfg),
            "max_position_embeddings": cfg.max_seq_len, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
            "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD,
            "dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype]}
