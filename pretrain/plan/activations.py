"""Activation memory of one micro-batch: what autograd keeps from the forward for the backward, per
attention back-end, with and without activation checkpointing, and the backward's own peak on top.

Counted in elements from the ops of `model.transformer`: in fp32 and eager mode, tests/test_plan.py
checks a layer's count against the tensors autograd saves, exactly, for several shapes. In bf16 the
CPU's RMSNorm keeps its input and output in fp32 (a layer keeps 16% more than counted, measured); CUDA's fused
RMSNorm keeps only its input and statistics (less than counted). torch.compile (train.compile)
changes what is kept; neither GPU case is measured here. Per layer, with T = rows x seq_len
tokens, N latent tokens, D = dim, F = ffn_dim, H heads, Hkv x head_dim the key/value width:
  9 T D   block input, the two RMSNorm inputs and outputs, the q/k/v, wo and w1/w3 inputs, the attention
          output and q
  2 T Hkv hd  k and v (after rotary)
  4 T F   w1 and w3 outputs, the SiLU output and the w2 input
  16 N D  the adaLN gathers, scales and gates of the latent rows
  T H     the attention's log-sum-exp; 3 T the RMSNorm statistics and the rows-with-a-key mask
  B S^2   sdpa only: the dense mask as the float bias the kernel takes (flex keeps a block mask, small)
Outside the layers: the embedding indices, the final norm, rotary tables, the timestep MLP and adaLN
conditioning of the latent tokens, the LM head input and its log-softmax (X text targets x vocab, fp32).
With activation checkpointing a layer keeps only its input (T D); the layer being recomputed in the
backward holds its full set meanwhile.
"""
from __future__ import annotations

from pretrain.plan.sizes import word_bytes

TIME_FREQ_DIM = 256  # model.diffusion.TimestepEmbedder's sinusoid width


def layer_elements(m, rows: int, seq_len: int, latent: int, backend: str) -> dict[str, float]:
    """Elements one block keeps for its backward (no checkpointing), by the word they are kept in:
    `act` (the activation dtype) and `fp32` (statistics the kernels keep in fp32)."""
    T, N, D, F = rows * seq_len, latent, m.dim, m.ffn_dim
    act = 9 * T * D + 2 * T * m.n_kv_heads * m.head_dim + 4 * T * F + 16 * N * D
    fp32 = T * m.n_heads + 3 * T
    if backend == "sdpa":
        act += rows * seq_len * seq_len
    return {"act": act, "fp32": fp32}


def activation_bytes(m, rows: int, seq_len: int, latent: int, text_targets: int, backend: str, precision: str,
                     checkpointing: bool) -> dict[str, float]:
    """Bytes of one micro-batch's activations at the backward's start (`saved`), and the backward's
    peak above them (`backward`: one layer's gradients in flight over the larger of the loss's gradients
    over the vocabulary and, with checkpointing, the recomputed layer). `mask`: the attention mask as built (bool, B x S^2, for
    sdpa; the flex block mask is a few KB)."""
    word = word_bytes(precision)
    T, N, X, D = rows * seq_len, latent, text_targets, m.dim
    layer = layer_elements(m, rows, seq_len, latent, backend)
    layer_bytes = word * layer["act"] + 4 * layer["fp32"]
    outside = (word * (2 * T * D + 2 * T * m.head_dim + 8 * N * D + X * D + N * (TIME_FREQ_DIM + m.latent_patch_dim))
               + 4 * X * m.vocab_size + 8 * (2 * T + X) + 4 * T)
    mask = rows * seq_len * seq_len if backend == "sdpa" else 0
    kept = word * T * D if checkpointing else layer_bytes
    saved = m.n_layers * kept + outside + mask
    # a layer's gradients in flight, over the larger of the loss's backward (first: the gradient of the
    # NLL and of the log-softmax, both X x vocab in fp32, beside the saved log-softmax) and a recomputed layer
    work = word * (4 * T * D + 2 * T * m.ffn_dim)
    return {"saved": saved, "backward": work + max(8 * X * m.vocab_size, layer_bytes if checkpointing else 0),
            "mask": mask}
