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
from model.weights import WeightsError, load_weights, state_entries, write_weights

CONFIG_FILE = "config.json"


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


def at_rows(h: torch.Tensor, rows: torch.Tensor, scale: Optional[torch.Tensor] = None,
            shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """h (B,S,D) with the N flat rows `rows` replaced by h[rows] * scale + shift (N,D each); the
    other rows are left exactly as they are."""
    flat = h.reshape(-1, h.shape[-1])
    picked = flat.index_select(0, rows)
    picked = picked * scale if scale is not None else picked
    picked = picked + shift if shift is not None else picked
    return flat.index_copy(0, rows, picked).view_as(h)


class Block(nn.Module):
    """Pre-norm Llama block; latent tokens get adaLN-Zero modulation.

    Modulation of a latent token in layer l: (shift, scale, gate) x (attn, ffn) =
    `cond + ada_table[l]`, where `cond` = one linear map of the token's timestep
    embedding shared by all layers (adaLN-single, PixArt-alpha) and `ada_table` a learned
    per-layer offset. Both start at zero, so gates start at 0 (adaLN-Zero). Text tokens
    are not touched: a plain Llama block. The modulation is applied to the latent rows
    only (gathered and scattered back), so the ops and their order are the same whatever
    the batch holds, zero latent tokens included: data-parallel ranks then produce their
    gradients in the same order, which ZeRO-2's reduction buckets rely on.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg)
        self.ada_table = nn.Parameter(torch.zeros(6, cfg.dim))

    def forward(self, x, rope, bias: AttentionBias, cond: torch.Tensor, rows: torch.Tensor,
                past: Optional[tuple] = None):
        """x B,S,D; cond N,6,D for the N latent tokens at flat positions `rows` (N,) of x;
        `past`: cached (k, v) of this layer. Returns (x, (k, v) of these tokens)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (cond + self.ada_table).unbind(1)
        a, kv = self.attn(at_rows(self.attn_norm(x), rows, 1 + scale1, shift1), rope, bias, past)
        x = x + at_rows(a, rows, gate1)
        h = at_rows(self.ffn_norm(x), rows, 1 + scale2, shift2)
        return x + at_rows(self.ffn(h), rows, gate2), kv


def loss_token_counts(batch: PackedBatch) -> torch.Tensor:
    """(text targets, latent loss tokens) of a batch: the tokens that `UnifiedTransformer.loss` sums over."""
    return torch.stack([batch.text_loss.sum(), batch.latent_loss.sum()])


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
        self.rotary = Rotary(cfg)
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
                generator: Optional[torch.Generator] = None, return_loss: bool = False,
                noise: Optional[torch.Tensor] = None, normalizer: Optional[tuple] = None):
        """Run the packed batch -> ModelOutput; `latent_input` (N,P) replaces `batch.latents` as the
        latent tokens fed in (the noised copy during sampling). With `return_loss=True`: the
        training losses of `loss()` instead (the form a DeepSpeed engine calls)."""
        if return_loss:
            return self.loss(batch, generator, noise, normalizer)
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
        rows = batch.is_latent.flatten().nonzero().squeeze(1)  # flat positions of the latent tokens
        x = self.tok_emb(batch.tokens)
        dtype = x.dtype
        # The latent modules run in every pass, even over zero latent tokens, and the ops are the
        # same whatever the batch holds: under ZeRO-3 a module's forward is a collective (it gathers
        # the parameters), so every rank must run the same modules; in training every parameter
        # gets a (zero) gradient, in the same order on every rank (ZeRO's reduction buckets).
        latent_x = self.latent_in(latent_input.to(self.latent_in.weight.dtype)).to(dtype)
        x = x.reshape(-1, x.shape[-1]).index_copy(0, rows, latent_x).view_as(x)  # replaces the placeholder
        c = F.silu(self.time_embed(batch.timestep))
        cond = self.ada(c).view(-1, 6, x.shape[-1]).to(dtype)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        rope = self.rotary(batch.pos)
        kv = cache.key_arrays(batch) if cache is not None else None
        backend = self.attention_backend(x.device, inference=cache is not None or not torch.is_grad_enabled())
        bias = build_attention_bias(batch.doc, batch.unit, batch.noisy, backend, kv)
        new_kv = []
        for i, blk in enumerate(self.blocks):
            past = cache.layers[i] if cache is not None else None
            if self.activation_checkpointing and self.training:
                x, layer_kv = checkpoint(blk, x, rope, bias, cond, rows, past, use_reentrant=False)
            else:
                x, layer_kv = blk(x, rope, bias, cond, rows, past)
            new_kv.append(layer_kv)
        h = self.norm(x)
        pred = self.latent_out(h.reshape(-1, h.shape[-1]).index_select(0, rows) * (1 + scale) + shift)
        return ModelOutput(h, pred), new_kv

    def logits(self, batch: PackedBatch) -> torch.Tensor:
        """B,S,V next-token logits at every position (tests, generation)."""
        return self.lm_head(self(batch).hidden)

    def loss(self, batch: PackedBatch, generator: Optional[torch.Generator] = None,
             noise: Optional[torch.Tensor] = None, normalizer: Optional[tuple] = None) -> dict:
        """Total loss = lm_weight * CE(text) + diffusion_weight * MSE(latent), plus each part.

        Each part is a sum over its tokens (`loss_token_counts`) divided by `normalizer` =
        (text targets, latent loss tokens) counted over the whole optimizer step (every
        micro-batch, every rank), so that a token weighs the same whatever it was packed with;
        by default this batch's own counts. Returns `loss` (to backpropagate), `lm_loss` and
        `diffusion_loss` (this batch's means, 0 without such tokens) and `lm_sum`,
        `diffusion_sum` (detached sums, for token-weighted logging). The noise (N,P) is `noise`,
        else drawn from `generator` (CPU) so that a run is reproducible."""
        cfg = self.cfg
        x0 = batch.latents if batch.latents.shape[0] else batch.latents.new_zeros(0, cfg.latent_patch_dim)
        is_noisy = batch.noisy[batch.is_latent]
        eps = torch.randn(x0.shape, generator=generator) if noise is None else noise
        xt, target = self.diffusion.noise(x0, eps.to(x0.device, x0.dtype), batch.timestep)
        out, _ = self._run(batch, torch.where(is_noisy[:, None], xt, x0))
        sel = batch.text_loss
        labels = torch.roll(batch.tokens, shifts=-1, dims=1)[sel]
        # the LM head runs even with no text target (ZeRO-3: the same modules on every rank)
        lm_sum = F.cross_entropy(self.lm_head(out.hidden[sel]).float(), labels, reduction="sum")
        lsel = batch.latent_loss[batch.is_latent]
        diffusion_sum = (out.latent_pred[lsel].float() - target[lsel].float()).pow(2).mean(-1).sum()
        own = loss_token_counts(batch).clamp(min=1)  # tensors: no host sync
        n_text, n_latent = (own[0], own[1]) if normalizer is None else (max(normalizer[0], 1), max(normalizer[1], 1))
        total = cfg.lm_weight * lm_sum / n_text + cfg.diffusion_weight * diffusion_sum / n_latent
        lm_sum, diffusion_sum = lm_sum.detach(), diffusion_sum.detach()
        return {"loss": total, "lm_loss": lm_sum / own[0], "diffusion_loss": diffusion_sum / own[1],
                "lm_sum": lm_sum, "diffusion_sum": diffusion_sum}

    # ---- saved folders -------------------------------------------------------------------
    def save_pretrained(self, directory, dtype: Optional[torch.dtype] = None, max_shard_bytes: int = 5 * 10**9) -> Path:
        """Write `config.json` + the weights (model.weights: one safetensors file, or shards + index)."""
        state = self.state_dict()
        write_weights(directory, state_entries(state, dtype), state.__getitem__, max_shard_bytes)
        return save_model_config(directory, self.cfg)

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state: dict) -> "UnifiedTransformer":
        """A model holding `state`'s tensors themselves (no random init, no copy). Missing, unexpected
        or wrongly shaped tensors: WeightsError naming the first."""
        with torch.device("meta"):
            model = cls(cfg)
        check_state_shapes(model, {k: v.shape for k, v in state.items()})
        model.load_state_dict(state, strict=True, assign=True)
        model.diffusion = Diffusion(cfg)  # its scheduler tables were made on meta
        return model

    @classmethod
    def from_pretrained(cls, directory, device="cpu", dtype: Optional[torch.dtype] = None):
        """Load a folder written by `save_pretrained` (config is checked strictly)."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{directory / CONFIG_FILE}: missing (not a save_pretrained folder?)")
        cfg = ModelConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
        model = cls.from_state_dict(cfg, load_weights(directory, device))
        if dtype is not None:
            model.to(dtype)
        return model.eval()


def save_model_config(directory, cfg: ModelConfig) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return directory


def check_state_shapes(model: nn.Module, shapes: dict) -> None:
    """WeightsError naming the first tensor that `model` lacks, misses or has in another shape."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, shape in own.items():
        if name not in shapes:
            raise WeightsError(f"{name}: missing from the weights")
        if tuple(shapes[name]) != shape:
            raise WeightsError(f"{name}: shape {tuple(shapes[name])} in the weights, the model's is {shape}")
    extra = [k for k in shapes if k not in own]
    if extra:
        raise WeightsError(f"{extra[0]}: in the weights, not a tensor of this model")
