"""The attention rule against hand-written matrices (rows = queries, columns = keys)."""
import pytest
import torch

from model.attention import attention_mask, resolve_backend
from model.layout import LatentSegment, LayoutSpec, TextSegment, block_order, layout_document, pack_rows
from model.special_tokens import BOI, EOI


def matrix(*rows: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in r.replace(" ", "")] for r in rows])


def mask_of(*docs, seq_len=None):
    lengths = sum(len(d) for d in docs)
    b = pack_rows([list(docs)], seq_len or lengths)
    return attention_mask(b.doc, b.unit, b.noisy)[0], b


def image(hw, channels=1):
    return torch.randn(channels, hw, hw)


MONO = LayoutSpec(mode="monoformer", patch_size=1)


def test_pure_text_is_causal():
    m, _ = mask_of(layout_document([TextSegment([10, 11, 12, 13, 14])], MONO))
    assert torch.equal(m, torch.ones(5, 5, dtype=torch.bool).tril())


def test_monoformer_text_image_text():
    doc = layout_document([TextSegment([10, 11]), LatentSegment(image(2)), TextSegment([12])], MONO)
    m, b = mask_of(doc)
    assert b.tokens[0, 2] == BOI and b.tokens[0, 7] == EOI
    expected = matrix(
        # t t boi  n n n n  eoi t
        "1 0 0    0 0 0 0   0  0",   # t10
        "1 1 0    0 0 0 0   0  0",   # t11
        "1 1 1    0 0 0 0   0  0",   # <boi>
        "1 1 1    1 1 1 1   0  0",   # noised image: text before + all of itself
        "1 1 1    1 1 1 1   0  0",
        "1 1 1    1 1 1 1   0  0",
        "1 1 1    1 1 1 1   0  0",
        "1 1 1    0 0 0 0   1  0",   # <eoi>: does not see the noised image
        "1 1 1    0 0 0 0   1  1",   # t12
    )
    assert torch.equal(m, expected)


def test_monoformer_both_lets_later_text_see_the_clean_copy():
    doc = layout_document([TextSegment([10]), LatentSegment(image(1), "both"), TextSegment([12])], MONO)
    m, _ = mask_of(doc)
    expected = matrix(
        # t boi n c eoi t
        "1 0   0 0 0   0",
        "1 1   0 0 0   0",
        "1 1   1 0 0   0",   # noised: not its clean copy
        "1 1   0 1 0   0",   # clean: never the noised copy
        "1 1   0 1 1   0",
        "1 1   0 1 1   1",
    )
    assert torch.equal(m, expected)


ACDIT_4_BLOCKS = matrix(
    # boi  n0 n1 n2 n3  c0 c1 c2 c3  eoi
    "1     0 0 0 0     0 0 0 0     0",
    "1     1 0 0 0     0 0 0 0     0",   # noised block 0: itself
    "1     0 1 0 0     1 0 0 0     0",   # noised block 1: clean 0 + itself
    "1     0 0 1 0     1 1 0 0     0",
    "1     0 0 0 1     1 1 1 0     0",
    "1     0 0 0 0     1 0 0 0     0",   # clean blocks: block-causal
    "1     0 0 0 0     1 1 0 0     0",
    "1     0 0 0 0     1 1 1 0     0",
    "1     0 0 0 0     1 1 1 1     0",
    "1     0 0 0 0     1 1 1 1     1",   # <eoi> sees every clean block, no noised one
)


def test_acdit_four_blocks_of_one_token():
    doc = layout_document([LatentSegment(image(2))], LayoutSpec(mode="acdit", patch_size=1, block_size=1))
    m, _ = mask_of(doc)
    assert torch.equal(m, ACDIT_4_BLOCKS)
    clean = m[5:9, 5:9]  # block_size=1: token-wise causal over the clean copy
    assert torch.equal(clean, torch.ones(4, 4, dtype=torch.bool).tril())


def test_acdit_four_square_blocks_of_four_tokens():
    doc = layout_document([LatentSegment(image(4))], LayoutSpec(mode="acdit", patch_size=1, block_size=4))
    m, _ = mask_of(doc)
    # expand the block-level matrix: boi/eoi stay single tokens, each latent block is 4 tokens
    sizes = torch.tensor([1] + [4] * 8 + [1])
    expected = ACDIT_4_BLOCKS.repeat_interleave(sizes, dim=0).repeat_interleave(sizes, dim=1)
    assert torch.equal(m, expected)


def test_square_block_order():
    order, block, n = block_order((1, 4, 4), 4)
    assert n == 4
    assert order.tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert block.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4


def test_acdit_whole_latent_block_is_monoformer():
    segs = [TextSegment([10, 11]), LatentSegment(image(2)), TextSegment([12])]
    whole, _ = mask_of(layout_document(segs, LayoutSpec(mode="acdit", patch_size=1, block_size=0)))
    also_whole, _ = mask_of(layout_document(segs, LayoutSpec(mode="acdit", patch_size=1, block_size=4)))
    segs_both = [TextSegment([10, 11]), LatentSegment(segs[1].latent, "both"), TextSegment([12])]
    mono_both, _ = mask_of(layout_document(segs_both, MONO))
    mono_gen, _ = mask_of(layout_document(segs, MONO))
    assert torch.equal(whole, mono_both) and torch.equal(also_whole, mono_both)
    # the noised rows (3..6) over the keys that monoformer's generate layout has
    keep = [0, 1, 2, 3, 4, 5, 6]
    assert torch.equal(whole[3:7][:, keep], mono_gen[3:7][:, keep])


def test_two_documents_never_attend_across():
    a = layout_document([TextSegment([10, 11, 12])], MONO)
    b = layout_document([TextSegment([13, 14])], MONO)
    m, batch = mask_of(a, b)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[:3, :3] = torch.ones(3, 3).tril().bool()
    expected[3:, 3:] = torch.ones(2, 2).tril().bool()
    assert torch.equal(m, expected)
    assert batch.doc[0].tolist() == [0, 0, 0, 1, 1]
    assert batch.pos[0, :, 0].tolist() == [0, 1, 2, 0, 1]  # positions restart per document


def test_padding_attends_nowhere():
    a = layout_document([TextSegment([10, 11])], MONO)
    m, batch = mask_of(a, seq_len=5)
    assert batch.doc[0].tolist() == [0, 0, -1, -1, -1]
    assert not m[2:].any() and not m[:, 2:].any()


def test_auto_backend_is_flex_for_training_on_cuda_only():
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    assert resolve_backend("auto", torch.device("cuda"), inference=True) == "sdpa"  # varying lengths
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("flex", torch.device("cpu"), inference=True) == "flex"  # an explicit choice stays
    with pytest.raises(ValueError, match="attention"):
        resolve_backend("fast", torch.device("cpu"))
