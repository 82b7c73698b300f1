"""UnifiedTransformer: one Llama-style decoder for next-token text and diffusion on latents.

Text tokens go through an unmodified Llama block stack (RMSNorm, SwiGLU, rotary over the
3 axes of `pos`, no biases), so HF Llama weights import. Latent tokens enter through a
linear patch projection and leave through a zero-initialised linear head; inside every
block they are modulated by their own timestep (adaLN-Zero, see `Block`). Attention
follows the one rule of `model.attention` for every token.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.attention import AttentionBias, attend, build_attention_bias, resolve_backend
from model.diffusion import Diffusion, TimestepEmbedder
from model.kv_cache import KVCache, extend_cache
from model.model_config import ModelConfig
from model.packed_batch import PackedBatch
from model.rope import Rotary, apply_rotary

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x, rope, bias: AttentionBias, past: Optional[tuple] = None):
        """-> (output, (k, v) of these tokens); `past` = cached (k, v) placed before them."""
        B, S, _ = x.shape
        q = self.q_norm(self.wq(x).view(B, S, self.n_heads, self.hd)).transpose(1, 2)
        k = self.k_norm(self.wk(x).view(B, S, self.n_kv, self.hd)).transpose(1, 2)
        v = self.wv(x).view(B, S, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        k_all, v_all = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        out = attend(q, k_all, v_all, bias)
        return self.wo(out.transpose(1, 2).reshape(B, S, -1)), (k, v)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm Llama block; latent tokens get adaLN-Zero modulation.

    Modulation of a latent token in layer l: (shift, scale, gate) x (attn, ffn) =
    `cond + ada_table[l]`, where `cond` = one linear map of the token's timestep
    embedding shared by all layers (adaLN-single, PixArt-alpha) and `ada_table` a learned
    per-layer offset. Both start at zero, so gates start at 0 (adaLN-Zero). Text tokens
    have shift = scale = 0 and gate = 1: a plain Llama block.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg)
        self.ada_table = nn.Parameter(torch.zeros(6, cfg.dim))

    def forward(self, x, rope, bias: AttentionBias, cond: Optional[torch.Tensor] = None,
                latent_mask: Optional[torch.Tensor] = None, past: Optional[tuple] = None):
        """x B,S,D; cond B,S,6,D (zero at text) and latent_mask B,S,1 float, or None (no latent token);
        `past`: cached (k, v) of this layer. Returns (x, (k, v) of these tokens)."""
        if cond is None:
            a, kv = self.attn(self.attn_norm(x), rope, bias, past)
            x = x + a
            x = x + self.ffn(self.ffn_norm(x))
            if self.training:  # a zero that keeps ada_table in the graph (see UnifiedTransformer._run)
                x = x + self.ada_table.sum() * 0.0
            return x, kv
        mod = (cond + self.ada_table) * latent_mask[..., None]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(2)
        text = 1.0 - latent_mask
        a, kv = self.attn(self.attn_norm(x) * (1 + scale1) + shift1, rope, bias, past)
        x = x + (gate1 + text) * a
        h = self.ffn_norm(x) * (1 + scale2) + shift2
        return x + (gate2 + text) * self.ffn(h), kv


class ModelOutput(NamedTuple):
    hidden: torch.Tensor        # B,S,D after the final norm (text positions feed the LM head)
    latent_pred: torch.Tensor   # N,P prediction at every latent token (epsilon or velocity)


class UnifiedTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        resolve_backend(cfg.attention, "cpu")  # validate the name early
        D, P = cfg.dim, cfg.latent_patch_dim
        self.tok_emb = nn.Embedding(cfg.vocab_size, D)
        self.latent_in = nn.Linear(P, D)
        self.time_embed = TimestepEmbedder(D)
        self.ada = nn.Linear(D, 6 * D)          # shared adaLN projection (zero init)
        self.final_ada = nn.Linear(D, 2 * D)    # final-layer shift/scale for latents (zero init)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(D, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
        self.latent_out = nn.Linear(D, P)       # zero init
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.diffusion = Diffusion(cfg)
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.cfg.init_std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.RMSNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
        for m in (self.ada, self.final_ada, self.latent_out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        for blk in self.blocks:
            nn.init.zeros_(blk.ada_table)

    def compile_blocks(self) -> None:
        """torch.compile each block's forward. Not the block's __call__: module hooks (ZeRO-3's
        parameter gathering) stay outside the compiled graph, which they would break up."""
        for blk in self.blocks:
            blk.forward = torch.compile(blk.forward)

    def params_by_use(self) -> dict[str, int]:
        """Parameter counts by the tokens whose matmuls use them (for FLOP counts): `every` token
        (blocks, final norm), `text` loss positions (LM head), `latent` tokens (in/out projections,
        timestep embedding, adaLN). The embedding is a lookup and counts nowhere."""
        def count(*modules):
            return sum(p.numel() for m in modules for p in m.parameters())
        return {"every": count(self.blocks, self.norm), "text": count(self.lm_head),
                "latent": count(self.latent_in, self.time_embed, self.ada, self.final_ada, self.latent_out)}

    def num_params(self, exclude_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embeddings else n

    # ---- forward -------------------------------------------------------------------------
    def attention_backend(self, device, inference: bool = False) -> str:
        return resolve_backend(self.cfg.attention, device, inference)

    def forward(self, batch: PackedBatch, latent_input: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None, return_loss: bool = False):
        """Run the packed batch -> ModelOutput; `latent_input` (N,P) replaces `batch.latents` as the
        latent tokens fed in (the noised copy during sampling). With `return_loss=True`: the
        training losses of `loss()` instead (the form a DeepSpeed engine calls)."""
        if return_loss:
            return self.loss(batch, generator)
        return self._run(batch, latent_input)[0]

    def step(self, batch: PackedBatch, latent_input: Optional[torch.Tensor] = None,
             cache: Optional[KVCache] = None, extend: bool = False) -> tuple[ModelOutput, Optional[KVCache]]:
        """Run new tokens after the cached ones (generation). Returns the output and the cache,
        extended by these tokens when `extend` (else unchanged)."""
        out, new = self._run(batch, latent_input, cache)
        return out, (extend_cache(cache, new, batch) if extend else cache)

    def _run(self, batch: PackedBatch, latent_input: Optional[torch.Tensor],
             cache: Optional[KVCache] = None) -> tuple[ModelOutput, list]:
        batch.validate(self.cfg.latent_patch_dim)
        latent_input = batch.latents if latent_input is None else latent_input
        if latent_input.shape[0] == 0:  # a text-only batch may carry a (0, 0) tensor
            latent_input = latent_input.new_zeros(0, self.cfg.latent_patch_dim)
        lat = batch.is_latent
        x = self.tok_emb(batch.tokens)
        dtype = x.dtype
        cond = final_mod = latent_mask = None
        # Training always runs the latent path, even over zero latent tokens, so that every
        # parameter gets a (zero) gradient on every rank: data-parallel reductions (ZeRO
        # buckets) must see the same parameters on all ranks.
        if latent_input.shape[0] or self.training:
            x = x.index_put((lat,), self.latent_in(latent_input.to(self.latent_in.weight.dtype)).to(dtype))
            c = F.silu(self.time_embed(batch.timestep))
            B, S, D = x.shape
            ada = self.ada(c).view(-1, 6, D).to(dtype)
            if latent_input.shape[0]:
                cond = x.new_zeros(B, S, 6, D).index_put((lat,), ada)
                latent_mask = lat[..., None].to(dtype)
            else:  # no latent token: plain blocks, with zeros that keep the latent parameters in the graph
                x = x + ada.sum() * 0.0
            final_mod = self.final_ada(c).chunk(2, dim=-1)
        rope = self.rotary(batch.pos)
        kv = cache.key_arrays(batch) if cache is not None else None
        backend = self.attention_backend(x.device, inference=cache is not None or not torch.is_grad_enabled())
        bias = build_attention_bias(batch.doc, batch.unit, batch.noisy, backend, kv)
        new_kv = []
        for i, blk in enumerate(self.blocks):
            past = cache.layers[i] if cache is not None else None
            if self.activation_checkpointing and self.training:
                x, layer_kv = checkpoint(blk, x, rope, bias, cond, latent_mask, past, use_reentrant=False)
            else:
                x, layer_kv = blk(x, rope, bias, cond, latent_mask, past)
            new_kv.append(layer_kv)
        h = self.norm(x)
        if final_mod is None:
            return ModelOutput(h, h.new_zeros(0, self.cfg.latent_patch_dim)), new_kv
        shift, scale = final_mod
        pred = self.latent_out(h[lat] * (1 + scale) + shift)
        return ModelOutput(h, pred), new_kv

    def logits(self, batch: PackedBatch) -> torch.Tensor:
        """B,S,V next-token logits at every position (tests, generation)."""
        return self.lm_head(self(batch).hidden)

    def loss(self, batch: PackedBatch, generator: Optional[torch.Generator] = None) -> dict:
        """Total loss = lm_weight * CE(text) + diffusion_weight * MSE(latent), plus each part.

        The noise is drawn from `generator` (CPU) so that a run is reproducible."""
        cfg = self.cfg
        x0 = batch.latents if batch.latents.shape[0] else batch.latents.new_zeros(0, cfg.latent_patch_dim)
        noisy = batch.noisy[batch.is_latent]
        eps = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        xt, target = self.diffusion.noise(x0, eps, batch.timestep)
        out, _ = self._run(batch, torch.where(noisy[:, None], xt, x0))
        zero = out.hidden.sum() * 0.0  # keeps every output in the graph when a part is empty
        sel = batch.text_loss
        if sel.any():
            labels = torch.roll(batch.tokens, shifts=-1, dims=1)[sel]
            lm_loss = F.cross_entropy(self.lm_head(out.hidden[sel]).float(), labels)
        else:
            lm_loss = zero + self.lm_head.weight.sum() * 0.0
        lsel = batch.latent_loss[batch.is_latent]
        if lsel.any():
            diffusion_loss = F.mse_loss(out.latent_pred[lsel].float(), target[lsel].float())
        else:
            diffusion_loss = zero + out.latent_pred.sum() * 0.0 + self.latent_out.weight.sum() * 0.0
        total = cfg.lm_weight * lm_loss + cfg.diffusion_weight * diffusion_loss
        return {"loss": total, "lm_loss": lm_loss.detach(), "diffusion_loss": diffusion_loss.detach()}

    # ---- release folder ------------------------------------------------------------------
    def save_pretrained(self, directory, dtype: Optional[torch.dtype] = None) -> Path:
        """Write `config.json` + `model.safetensors` to `directory`."""
        from safetensors.torch import save_file
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().cpu()
                 for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        (directory / CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory, device="cpu", dtype: Optional[torch.dtype] = None):
        """Load a folder written by `save_pretrained` (config is checked strictly)."""
        from safetensors.torch import load_file
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name}: missing (not a save_pretrained folder?)")
        cfg = ModelConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
        with torch.device("meta"):
            model = cls(cfg)
        state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
        model.load_state_dict(state, strict=True, assign=True)
        model.diffusion = Diffusion(cfg)  # its scheduler tables were made on meta
        if dtype is not None:
            model.to(dtype)
        return model.eval()
