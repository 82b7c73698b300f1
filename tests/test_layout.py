"""Layout builders: positions, units, loss flags, packing, patchify, timesteps."""
import pytest
import torch

from model.diffusion import Diffusion, assign_timesteps
from model.layout import LatentSegment, LayoutSpec, TextSegment, layout_document, pack_rows
from model.model_config import ModelConfig
from model.packed_batch import IMAGE, TEXT, VIDEO
from model.patchify import patchify, unpatchify
from model.special_tokens import BOI, BOV, EOI, EOV, LATENT


def test_image_positions_offset_from_running_index_and_shared_by_copies():
    spec = LayoutSpec(mode="acdit", patch_size=2, block_size=0)
    doc = layout_document([TextSegment([20, 21, 22]), LatentSegment(torch.randn(4, 4, 6)), TextSegment([23])], spec)
    # 3 text, <boi>, 6 noised, 6 clean, <eoi>, 1 text
    assert doc.tokens.tolist() == [20, 21, 22, BOI] + [LATENT] * 12 + [EOI, 23]
    assert doc.modality.tolist() == [TEXT] * 4 + [IMAGE] * 12 + [TEXT] * 2
    start = 4  # running index where the image starts (after 3 text tokens and <boi>)
    noised, clean = doc.pos[4:10], doc.pos[10:16]
    expected = torch.tensor([[start, start + i, start + j] for i in range(2) for j in range(3)])
    assert torch.equal(noised, expected) and torch.equal(clean, expected)
    # after the image the running index moves on by max(h, w) = 3 tokens
    assert doc.pos[16].tolist() == [start + 3] * 3 and doc.pos[17].tolist() == [start + 4] * 3


def test_video_positions_and_frame_blocks():
    spec = LayoutSpec(mode="acdit", patch_size=1, block_size=4)  # 2x2 frames: one frame per block
    doc = layout_document([LatentSegment(torch.randn(3, 3, 2, 2))], spec)
    assert doc.tokens[0] == BOV and doc.tokens[-1] == EOV
    lat = doc.modality == VIDEO
    assert lat.sum() == 24
    noised_units = doc.unit[lat & doc.noisy]
    assert noised_units.tolist() == [1] * 4 + [2] * 4 + [3] * 4
    assert doc.pos[1:5, 0].tolist() == [1] * 4 and doc.pos[9:13, 0].tolist() == [3] * 4  # frame t -> 1 + t


def test_text_loss_marks_positions_whose_next_token_is_text():
    spec = LayoutSpec(patch_size=1)
    doc = layout_document([TextSegment([20, 21]), LatentSegment(torch.randn(1, 1, 2)),
                           TextSegment([22, 23]), TextSegment([24], loss=False)], spec)
    # 20 21 <boi> n n <eoi> 22 23 24
    assert doc.text_loss.tolist() == [True, True, False, False, False, True, True, False, False]
    assert doc.latent_loss.tolist() == [False] * 3 + [True, True] + [False] * 4


def test_context_image_has_no_loss_and_no_noise():
    doc = layout_document([LatentSegment(torch.randn(1, 2, 2), "context"), TextSegment([30, 31])],
                          LayoutSpec(patch_size=1))
    assert not doc.noisy.any() and not doc.latent_loss.any()
    assert doc.latents.shape == (4, 1)


def test_pack_rows_rejects_overlong_rows():
    doc = layout_document([TextSegment(list(range(10, 20)))], LayoutSpec())
    with pytest.raises(ValueError, match="seq_len"):
        pack_rows([[doc]], seq_len=8)


@pytest.mark.parametrize("shape", [(4, 6, 8), (3, 5, 4, 6)])
def test_patchify_round_trip(shape):
    x = torch.randn(shape)
    tokens = patchify(x, 2)
    grid = (shape[1] if len(shape) == 4 else 1, shape[-2] // 2, shape[-1] // 2)
    assert tokens.shape == (grid[0] * grid[1] * grid[2], shape[0] * 4)
    assert torch.equal(unpatchify(tokens, shape[0], grid, 2, video=len(shape) == 4), x)
    # the first token is the top-left 2x2 patch of the first frame
    first = x[:, :2, :2] if len(shape) == 3 else x[:, 0, :2, :2]
    assert torch.equal(tokens[0], first.reshape(-1))


def test_one_timestep_per_noised_unit():
    cfg = ModelConfig(mode="acdit", block_size=4, patch_size=1, latent_channels=1)
    doc = layout_document([TextSegment([20]), LatentSegment(torch.randn(1, 4, 4))], LayoutSpec.from_model_config(cfg))
    batch = assign_timesteps(pack_rows([[doc], [doc]], len(doc)), Diffusion(cfg), torch.Generator().manual_seed(0))
    lat = batch.is_latent
    noisy, unit, row = batch.noisy[lat], batch.unit[lat], torch.arange(2)[:, None].expand(2, len(doc))[lat]
    assert (batch.timestep[~noisy] == 0).all()
    groups = {}
    for t, u, r in zip(batch.timestep[noisy].tolist(), unit[noisy].tolist(), row[noisy].tolist()):
        groups.setdefault((r, u), set()).add(t)
    assert len(groups) == 8 and all(len(v) == 1 for v in groups.values())
    assert len({next(iter(v)) for v in groups.values()}) > 1  # blocks get their own times


@pytest.mark.parametrize("field,corrupt", [
    ("noisy", lambda b: b.noisy.__setitem__((0, 0), True)),              # a text position marked noised
    ("text_loss", lambda b: b.text_loss.__setitem__(tuple(b.is_latent.nonzero()[0].tolist()), True)),
    ("latent_loss", lambda b: b.latent_loss.__setitem__((0, 0), True)),   # loss on a token that is not noised
    ("doc", lambda b: b.text_loss.__setitem__((0, -1), True)),            # a loss in the padding
    ("modality", lambda b: b.modality.__setitem__((0, 0), 7)),
    ("timestep", lambda b: setattr(b, "timestep", b.timestep[:-1])),
])
def test_validate_names_the_inconsistent_field(field, corrupt):
    doc = layout_document([TextSegment([20, 21]), LatentSegment(torch.randn(1, 2, 2))], LayoutSpec(patch_size=1))
    batch = pack_rows([[doc]], len(doc) + 2)
    batch.validate()
    corrupt(batch)
    with pytest.raises(ValueError, match=rf"PackedBatch\.{field}"):
        batch.validate()
