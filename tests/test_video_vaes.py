"""Video VAEs (Wan, LTX-Video, CogVideoX) through from_pretrained: latent frames 1 + (T - 1) / 4,
latents normalised as the diffusers pipelines do, decoded back to the pixel frame count."""
import json

import numpy as np
import pytest
import torch

from data_pipelines.encoders import VAEEncoder, frames_at_least, latent_frames, load_encoder, pixel_frames
from tests.video_vaes import save_video_vae

CLASSES = ["AutoencoderKLWan", "AutoencoderKLLTXVideo", "AutoencoderKLCogVideoX"]


def hand_normalised(vae, name, x):
    """What each diffusers pipeline feeds its transformer, written out per class."""
    z = vae.encode(x).latent_dist.mode()
    c = (1, -1, 1, 1, 1)
    if name == "AutoencoderKLWan":
        return (z - torch.tensor(vae.config.latents_mean).view(c)) / torch.tensor(vae.config.latents_std).view(c)
    if name == "AutoencoderKLLTXVideo":
        return (z - vae.latents_mean.view(c)) * vae.config.scaling_factor / vae.latents_std.view(c)
    return z * vae.config.scaling_factor


@pytest.mark.parametrize("name", CLASSES)
def test_a_video_vae_folds_frames_and_normalises_like_its_pipeline(name, tmp_path):
    import diffusers
    path = save_video_vae(name, tmp_path)
    enc = VAEEncoder(path, device="cpu")
    d = enc.describe()
    assert (d["class"], d["spatial_factor"], d["temporal_factor"]) == (name, 4, 4)
    assert d["latent_frames"].startswith("1 + (T - 1) / 4")
    clips = np.random.default_rng(0).random((2, 9, 16, 24, 3)).astype(np.float32)
    lat = enc.encode_clips(clips)
    assert lat.shape == (2, 4, 3, 4, 6) and enc.latent_frames(9) == 3
    vae = getattr(diffusers, name).from_pretrained(path).eval()
    if name == "AutoencoderKLLTXVideo":  # the buffers the normalisation uses came back from the folder
        assert vae.latents_mean.tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3])
    with torch.no_grad():
        want = hand_normalised(vae, name, torch.from_numpy(clips).permute(0, 4, 1, 2, 3) * 2 - 1)
    np.testing.assert_allclose(lat.astype(np.float32), want.numpy(), rtol=2e-3, atol=2e-3)
    # decoding undoes the normalisation: the same pixels as the VAE's own decode of the raw latents
    pixels = enc.decode(torch.from_numpy(lat.astype(np.float32)))
    assert pixels.shape == (2, 3, 9, 16, 24) == (2, *enc.pixel_shape(lat.shape[1:]))
    with torch.no_grad():
        raw = ((vae.decode(vae.encode(torch.from_numpy(clips).permute(0, 4, 1, 2, 3) * 2 - 1).latent_dist.mode())
                .sample + 1) / 2).clamp(0, 1)
    np.testing.assert_allclose(pixels.numpy(), raw.numpy(), atol=5e-3)
    # an image is one frame: 1 latent frame, as the image layout (c, h, w)
    img = enc.encode_images(clips[:, 0])
    assert img.shape == (2, 4, 4, 6)
    np.testing.assert_allclose(img.astype(np.float32), enc.encode_clips(clips[:, :1])[:, :, 0].astype(np.float32),
                               atol=1e-3)
    assert enc.decode(torch.from_numpy(img.astype(np.float32))).shape == (2, 3, 16, 24)
    np.testing.assert_array_equal(load_encoder(d, "cpu").encode_clips(clips), lat)


@pytest.mark.parametrize("name,frames,latent", [("AutoencoderKLWan", 13, 4), ("AutoencoderKLLTXVideo", 13, 4),
                                                ("AutoencoderKLCogVideoX", 17, 5)])
def test_longer_clips_decode_to_the_frames_they_came_from(name, frames, latent, tmp_path):
    enc = VAEEncoder(save_video_vae(name, tmp_path), device="cpu")
    enc.batch_size = frames  # one clip a call: decoding is batched by frames
    lat = enc.encode_clips(np.random.default_rng(2).random((2, frames, 8, 8, 3)).astype(np.float32))
    assert lat.shape[2] == latent
    assert enc.decode(torch.from_numpy(lat.astype(np.float32))).shape == (2, 3, frames, 8, 8)


def test_cogvideox_takes_1_plus_8k_frames_as_it_decodes_latent_frames_in_pairs(tmp_path):
    enc = VAEEncoder(save_video_vae("AutoencoderKLCogVideoX", tmp_path), device="cpu")
    assert enc.describe()["latent_frames"] == "1 + (T - 1) / 4, T = 1 + 8k"
    with pytest.raises(ValueError, match=r"13 frames: .* takes 1 \+ 8k frames \(9 or 17\)"):
        enc.latent_frames(13)


def test_a_wan_2_2_vae_folds_pixel_patches_into_channels(tmp_path):
    import diffusers
    torch.manual_seed(0)
    diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
                               is_residual=True, patch_size=2, in_channels=12, out_channels=12,
                               latents_mean=[0.0] * 4, latents_std=[1.0] * 4).save_pretrained(tmp_path / "wan22")
    enc = VAEEncoder(tmp_path / "wan22", device="cpu")
    assert (enc.spatial_factor, enc.temporal_factor, enc.in_channels) == (4, 2, 3)
    lat = enc.encode_clips(np.random.default_rng(3).random((1, 5, 16, 16, 3)).astype(np.float32))
    assert lat.shape == (1, 4, 3, 4, 4)
    assert enc.decode(torch.from_numpy(lat.astype(np.float32))).shape == (1, 3, 5, 16, 16)


def test_the_latent_frame_rule():
    assert [latent_frames(t, 4) for t in (1, 5, 9, 13)] == [1, 2, 3, 4]
    assert [pixel_frames(t, 4) for t in (1, 2, 3, 4)] == [1, 5, 9, 13]
    assert latent_frames(7, 1) == 7 == pixel_frames(7, 1)
    assert [frames_at_least(16, 4), frames_at_least(16, 4, 8), frames_at_least(17, 4), frames_at_least(16, 1)] == [
        17, 17, 17, 16]
    with pytest.raises(ValueError, match=r"10 frames: .* temporal factor 4 takes 1 \+ 4k frames \(9 or 13\)"):
        latent_frames(10, 4)


def test_a_folder_of_another_class_is_refused_by_name(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLMochi"}))
    with pytest.raises(ValueError, match=r"_class_name 'AutoencoderKLMochi' is not one of AutoencoderKL\|"):
        VAEEncoder(tmp_path / "v")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        VAEEncoder(tmp_path)


def test_an_image_vae_still_encodes_a_clip_frame_by_frame(tiny_vae):
    enc = VAEEncoder(tiny_vae, device="cpu")
    clips = np.random.default_rng(1).random((1, 3, 16, 16, 3)).astype(np.float32)
    lat = enc.encode_clips(clips)
    assert lat.shape == (1, 4, 3, 8, 8) and enc.describe()["latent_frames"] == "T"
    np.testing.assert_array_equal(lat[0, :, 2], enc.encode_images(clips[0, 2:3])[0])
    assert enc.decode(torch.from_numpy(lat.astype(np.float32))).shape == (1, 3, 3, 16, 16)


def test_a_frame_count_the_vae_cannot_take_is_refused_before_anything_is_written(tiny_wan_vae, test_data, tmp_path):
    from data_pipelines.write_shards import write_shards
    with pytest.raises(ValueError, match=r"^--frames: 6 frames: an encoder of temporal factor 4 takes 1 \+ 4k"):
        write_shards("moving_digits", str(tmp_path / "m"), str(test_data["tokenizer"]), encoder="vae",
                     vae=str(tiny_wan_vae), frames=6, num_samples=2, progress=False)
    assert not (tmp_path / "m").exists()
