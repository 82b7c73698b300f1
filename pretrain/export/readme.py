"""The README.md of a release folder: provenance, how to sample, and how to read the weights with
plain safetensors and what each tensor is, for users without this project."""
from __future__ import annotations

import re

from model.model_config import ModelConfig

MEANING = {  # tensor name (layer index as {i}) -> what it is
    "tok_emb.weight": "token embedding, one row per token id",
    "blocks.{i}.attn_norm.weight": "RMSNorm weight before attention",
    "blocks.{i}.attn.wq.weight": "query projection (nn.Linear layout: out x in)",
    "blocks.{i}.attn.wk.weight": "key projection (grouped-query: n_kv_heads x head_dim rows)",
    "blocks.{i}.attn.wv.weight": "value projection",
    "blocks.{i}.attn.wo.weight": "attention output projection",
    "blocks.{i}.attn.q_norm.weight": "RMSNorm weight on each query head (qk_norm)",
    "blocks.{i}.attn.k_norm.weight": "RMSNorm weight on each key head (qk_norm)",
    "blocks.{i}.ffn_norm.weight": "RMSNorm weight before the feed-forward",
    "blocks.{i}.ffn.w1.weight": "SwiGLU gate: w2(silu(w1 x) * w3 x)",
    "blocks.{i}.ffn.w3.weight": "SwiGLU up projection",
    "blocks.{i}.ffn.w2.weight": "SwiGLU down projection",
    "blocks.{i}.ada_table": "this block's learned offsets (shift, scale, gate before attention; the same "
                            "before the feed-forward) added to the shared adaLN output; latent tokens only",
    "norm.weight": "final RMSNorm weight",
    "lm_head.weight": "next-token logits, one row per token id",
    "latent_in.weight": "patch to hidden: a patch is latent_channels x patch_size x patch_size values",
    "latent_in.bias": "",
    "time_embed.mlp.0.weight": "timestep embedding: 256 sinusoidal features to hidden",
    "time_embed.mlp.0.bias": "",
    "time_embed.mlp.2.weight": "timestep embedding, second layer (after SiLU)",
    "time_embed.mlp.2.bias": "",
    "ada.weight": "shared adaLN: silu(timestep embedding) to 6 x dim (shift, scale, gate, twice)",
    "ada.bias": "",
    "final_ada.weight": "final shift and scale of latent tokens before latent_out",
    "final_ada.bias": "",
    "latent_out.weight": "hidden to the diffusion prediction of a patch",
    "latent_out.bias": "",
}

LOAD = '''```python
import json
from pathlib import Path

from safetensors.torch import load_file

folder = Path(".")  # this folder
index = folder / "model.safetensors.index.json"  # present when the weights are sharded
files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
weights = {name: tensor for f in files for name, tensor in load_file(folder / f).items()}
config = json.loads((folder / "config.json").read_text())
```'''


def render(cfg: ModelConfig, info: dict, shapes: dict[str, tuple]) -> str:
    """README.md for a release of a model `cfg` whose tensors have `shapes` (name -> shape)."""
    p = info.get("provenance", {})
    lines = ["# monofusion release", "",
             f"A {cfg.mode} UnifiedTransformer (dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
             f"{cfg.n_kv_heads} key/value heads, vocabulary {cfg.vocab_size}, objective {cfg.objective}).", ""]
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in p.items()]
    lines += ["", "Sample with monofusion: `python -m pretrain.sample --model THIS_FOLDER --prompt \"...\" "
              "--out out.png`", "", "## Reading the weights without monofusion", "",
              "The weights are safetensors (fp32 or bf16); `config.json` holds the sizes, `release.json` the "
              "latent encoder and latent shapes, `tokenizer.model` (sentencepiece) or `tokenizer.json` (Hugging Face tokenizers) the tokenizer: ids 0-8 are "
              "`<pad> <unk> <bos> <eos> <boi> <eoi> <bov> <eov> <latent>`.", "", LOAD, "",
              f"Every linear layer is stored as torch.nn.Linear does (out x in; y = x W^T + b). Attention uses "
              f"rotary position embedding (rotate-half convention, base {cfg.rope_theta:g}, scaling "
              f"{cfg.rope_scaling}); for text its positions are 0, 1, 2, ... and the text path is a Llama "
              f"(`python -m pretrain.convert export-llama` writes it as one).", "",
              "| tensor | shape | what it is |", "| --- | --- | --- |"]
    seen = set()
    for name, shape in shapes.items():
        pattern = re.sub(r"^blocks\.\d+\.", "blocks.{i}.", name)
        if pattern in seen:
            continue
        seen.add(pattern)
        shown = pattern.replace("{i}", f"{{0..{cfg.n_layers - 1}}}")
        lines.append(f"| `{shown}` | {list(shape)} | {MEANING.get(pattern, '')} |")
    return "\n".join(lines) + "\n"
