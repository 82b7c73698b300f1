"""ModelConfig: sizes of the network, its latent interface, objective and layout mode."""
from __future__ import annotations

import dataclasses
from typing import Literal

from model.config_system import Config, ConfigError, knob


@dataclasses.dataclass
class ModelConfig(Config):
    # Llama-style backbone
    dim: int = knob(256, "hidden size")
    n_layers: int = knob(4, "number of transformer blocks")
    n_heads: int = knob(4, "attention heads")
    n_kv_heads: int = knob(0, "key/value heads for grouped-query attention (0 = n_heads)")
    ffn_dim: int = knob(0, "SwiGLU hidden size (0 = 8/3*dim rounded up to a multiple of 64)")
    vocab_size: int = knob(512, "text vocabulary size (tokenizer pieces)")
    norm_eps: float = knob(1e-5, "RMSNorm epsilon")
    rope_theta: float = knob(10000.0, "rotary base frequency")
    rope_scaling: Literal["none", "linear", "llama3"] = knob(
        "none", "rotary frequency scaling, as Hugging Face's rope_type: linear (all divided by rope_factor) or "
                "llama3 (Llama 3.1's: low frequencies divided, high ones kept, smoothed between)")
    rope_factor: float = knob(1.0, "linear/llama3: the factor low rotary frequencies are divided by")
    rope_low_freq_factor: float = knob(1.0, "llama3: wavelengths past original_max_seq_len / this are divided")
    rope_high_freq_factor: float = knob(4.0, "llama3: wavelengths under original_max_seq_len / this are kept")
    rope_original_max_seq_len: int = knob(8192, "llama3: the context length the unscaled frequencies were trained at")
    qk_norm: bool = knob(False, "RMSNorm on queries and keys per head (ACDiT)")
    max_seq_len: int = knob(4096, "longest sequence the model is trained/sampled with")
    init_std: float = knob(0.02, "std of the normal init of linear and embedding weights")
    attention: Literal["auto", "flex", "sdpa"] = knob(
        "auto", "attention back-end: flex (FlexAttention block mask), sdpa (dense mask), "
        "auto = flex for training on CUDA, sdpa otherwise")
    # latent interface
    latent_channels: int = knob(4, "channels of the (VAE) latent")
    patch_size: int = knob(2, "spatial patch size over the latent (video: per frame)")
    # diffusion objective
    objective: Literal["ddpm", "flow"] = knob("ddpm", "ddpm: discrete noise levels (target: `prediction`); "
                                                      "flow: rectified flow, velocity target")
    prediction: Literal["epsilon", "v_prediction"] = knob(
        "epsilon", "ddpm: the network predicts the noise (epsilon) or v = sqrt(a) eps - sqrt(1-a) x0")
    num_train_timesteps: int = knob(1000, "ddpm: number of discrete noise levels")
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = knob(
        "linear", "ddpm: diffusers beta schedule")
    flow_logit_mean: float = knob(0.0, "flow: mean of the logit-normal timestep distribution")
    flow_logit_std: float = knob(1.0, "flow: std of the logit-normal timestep distribution")
    lm_weight: float = knob(1.0, "weight of the next-token cross-entropy in the total loss")
    diffusion_weight: float = knob(1.0, "weight of the diffusion MSE in the total loss")
    # sequence layout
    mode: Literal["monoformer", "acdit"] = knob(
        "monoformer", "monoformer: a noised latent is one unit; acdit: clean+noised copies in blocks")
    block_size: int = knob(0, "acdit: latent tokens per block (square for images, whole frames for video); "
                              "0 = the whole latent")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "latent_channels", "patch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim == 0:
            self.ffn_dim = 64 * -(-(8 * self.dim // 3) // 64)
        if self.dim % self.n_heads:
            raise ConfigError(f"dim: {self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_kv_heads: {self.n_kv_heads} does not divide n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ConfigError(f"dim: head size {self.dim // self.n_heads} must be even for rotary embedding")
        if self.objective == "flow" and self.prediction != "epsilon":
            raise ConfigError(f"prediction: {self.prediction!r} is for objective ddpm (flow predicts the velocity)")
        if self.rope_factor <= 0:
            raise ConfigError(f"rope_factor: must be positive, got {self.rope_factor}")
        if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ConfigError(f"rope_high_freq_factor: {self.rope_high_freq_factor} must exceed "
                              f"rope_low_freq_factor={self.rope_low_freq_factor}")
        if self.block_size < 0:
            raise ConfigError(f"block_size: must be >= 0, got {self.block_size}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def latent_patch_dim(self) -> int:
        """P: values per latent token (channels * patch area)."""
        return self.latent_channels * self.patch_size ** 2
