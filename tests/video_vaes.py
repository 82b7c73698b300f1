"""Tiny randomly initialised diffusers video VAEs (temporal factor 4, spatial factor 4), saved to a
folder so the project loads them through `from_pretrained` like a downloaded one."""
from __future__ import annotations

from pathlib import Path

import torch


def build_video_vae(name: str, channels: int = 4):
    import diffusers
    torch.manual_seed(0)
    if name == "AutoencoderKLWan":  # nonzero mean, non-unit std: the normalisation is visible
        return diffusers.AutoencoderKLWan(
            base_dim=8, z_dim=channels, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True],
            latents_mean=[0.1 * i for i in range(channels)], latents_std=[0.5 + 0.25 * i for i in range(channels)],
            scale_factor_temporal=4, scale_factor_spatial=4)
    if name == "AutoencoderKLLTXVideo":  # its latents_mean/std are buffers, saved with the weights
        vae = diffusers.AutoencoderKLLTXVideo(
            latent_channels=channels, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
            layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5,
            spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
            decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
            patch_size=1, patch_size_t=1, scaling_factor=0.7)
        vae.latents_mean.copy_(torch.arange(channels) * 0.1)
        vae.latents_std.copy_(0.5 + 0.25 * torch.arange(channels))
        return vae
    if name == "AutoencoderKLCogVideoX":
        return diffusers.AutoencoderKLCogVideoX(
            latent_channels=channels, block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4,
            temporal_compression_ratio=4, down_block_types=("CogVideoXDownBlock3D",) * 3,
            up_block_types=("CogVideoXUpBlock3D",) * 3, scaling_factor=0.8)
    raise ValueError(name)


def save_video_vae(name: str, folder: Path) -> Path:
    path = Path(folder) / name
    build_video_vae(name).save_pretrained(path)
    return path
