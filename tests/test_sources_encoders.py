"""Sources and latent encoders: video, the user's jsonl, a VAE loaded through from_pretrained."""
import json

import numpy as np
import pytest
import torch

from data_pipelines.encoders import PixelEncoder, VAEEncoder, load_encoder
from data_pipelines.shards import iter_shard_documents
from data_pipelines.sources import moving_digits, photos, split_paragraphs, text
from data_pipelines.write_shards import write_shards


def test_moving_digits_make_bouncing_videos_with_captions():
    docs = list(moving_digits(num_samples=4, frames=6, canvas=16, seed=1))
    for doc in docs:
        video = doc[1]["video"]
        assert video.shape == (6, 16, 16, 1) and 0 <= video.min() and video.max() <= 1
        assert not np.array_equal(video[0], video[-1])  # it moves
        assert doc[0]["text"].startswith("digit ") and "moving" in doc[0]["text"]


def test_photos_are_crops_in_range():
    docs = list(photos(num_samples=5, crop=24, seed=0))
    assert all(d[1]["image"].shape == (24, 24, 3) for d in docs)
    assert docs[0][0]["text"].startswith("a photo of")


def test_text_source_splits_at_paragraphs(tmp_path):
    (tmp_path / "a.md").write_text("para one\n\n" + "x" * 50 + "\n\npara three")
    pieces = [d[0]["text"] for d in text(input=[str(tmp_path)], max_chars=30)]
    assert "".join(pieces).replace("\n", "") == ("para one" + "x" * 50 + "para three")
    assert all(len(p) <= 30 for p in pieces)
    assert list(split_paragraphs("a\n\nb", 100)) == ["a\n\nb\n\n"]
    # a held-out split: the pieces after those a training set took, none of them again
    held_out = [d[0]["text"] for d in text(input=[str(tmp_path)], max_chars=30, skip=2, num_samples=10)]
    assert held_out == pieces[2:]


def test_vae_encoder_through_from_pretrained(tiny_vae, test_data, tmp_path):
    enc = VAEEncoder(tiny_vae, device="cpu")
    images = np.random.default_rng(0).random((3, 16, 16, 3)).astype(np.float32)
    lat = enc.encode_images(images)
    assert lat.shape == (3, 4, 8, 8)
    assert enc.decode(torch.from_numpy(lat.astype(np.float32))).shape == (3, 3, 16, 16)
    again = load_encoder(enc.describe()).encode_images(images)
    np.testing.assert_array_equal(lat, again)
    m = write_shards("photos", str(tmp_path / "p"), str(test_data["tokenizer"]), encoder="vae", vae=str(tiny_vae),
                     samples_per_shard=4, num_samples=6, crop=16, progress=False)
    assert m.encoder["type"] == "vae" and m.latent_channels == 4 and m.num_samples == 6
    _, segs = next(iter_shard_documents(tmp_path / "p"))
    assert segs[1]["latent"].shape == (4, 8, 8)


def test_missing_vae_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        VAEEncoder(tmp_path / "nothere")


def test_jsonl_with_image_frames_and_mp4(test_data, tmp_path):
    import av
    from PIL import Image
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "frames").mkdir()
    for t in range(3):
        Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(tmp_path / "frames" / f"{t:02d}.png")
    with av.open(str(tmp_path / "clip.mp4"), "w") as out:
        stream = out.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        for t in range(4):
            frame = av.VideoFrame.from_ndarray((rng.random((16, 16, 3)) * 255).astype(np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    docs = [{"segments": [{"text": "look"}, {"image": "a.png"}, {"text": "then"}, {"video": "frames"}]},
            {"segments": [{"text": "a clip"}, {"video": "clip.mp4"}]}]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    m = write_shards("jsonl", str(tmp_path / "s"), str(test_data["tokenizer"]), samples_per_shard=10,
                     input=[str(tmp_path / "docs.jsonl")], progress=False)
    assert m.num_samples == 2
    (_, first), (_, second) = list(iter_shard_documents(tmp_path / "s"))
    assert [("tokens" in s, s.get("kind")) for s in first] == [(True, None), (False, "image"), (True, None),
                                                              (False, "video")]
    assert first[1]["latent"].shape == (3, 8, 8) and first[3]["latent"].shape == (3, 3, 8, 8)
    assert second[1]["latent"].shape == (3, 4, 16, 16)


def test_jsonl_missing_media_is_named(test_data, tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"segments": [{"image": "gone.png"}]}))
    with pytest.raises(FileNotFoundError, match="gone.png"):
        write_shards("jsonl", str(tmp_path / "s"), str(test_data["tokenizer"]), input=[str(tmp_path / "d.jsonl")],
                     progress=False)


def test_pixel_encoder_round_trip():
    enc = PixelEncoder(1)
    img = np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32)
    lat = enc.encode_images(img)
    assert lat.shape == (2, 1, 4, 4) and lat.min() >= -1 and lat.max() <= 1
    back = enc.decode(torch.from_numpy(lat.astype(np.float32)))
    np.testing.assert_allclose(back[:, 0].numpy(), img.mean(-1), atol=2e-3)


def test_a_release_carries_its_vae(tiny_vae, tmp_path):
    from model.model_config import ModelConfig
    from model.transformer import UnifiedTransformer
    from pretrain.export.release import load_for_sampling, save_release
    enc = VAEEncoder(tiny_vae, device="cpu")
    model = UnifiedTransformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, latent_channels=4))
    release = save_release(model, tmp_path / "release", {"encoder": enc.describe(), "latent_shapes": {}}, None)
    moved = tmp_path / "elsewhere"
    release.rename(moved)  # the release no longer depends on where the VAE was
    loaded = load_for_sampling(moved)
    assert loaded.info["encoder"]["path"] == str(moved / "vae")
    images = np.random.default_rng(0).random((1, 16, 16, 3)).astype(np.float32)
    np.testing.assert_array_equal(load_encoder(loaded.info["encoder"]).encode_images(images), enc.encode_images(images))
