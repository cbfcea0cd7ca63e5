import pytest
import torch
from torch import nn

from xllm.interfaces.base import ModalityTokens
from xllm.splice import splice_modality_tokens
from xllm.tensors import IGNORE_INDEX

fixed = ModalityTokens.fixed

IMG, VID = -200, -201


def table(vocab: int = 10, hidden: int = 3) -> nn.Embedding:
    embedding = nn.Embedding(vocab, hidden)
    with torch.no_grad():
        embedding.weight.copy_(torch.arange(vocab).float()[:, None].expand(vocab, hidden))
    return embedding


def test_items_land_at_their_placeholders_in_reading_order():
    # Row 0: text, image A, text, image B; row 1: video V, text, image C, then padding.
    input_ids = torch.tensor([[1, IMG, 2, IMG, 3], [VID, 4, IMG, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[5, IGNORE_INDEX, 6, IGNORE_INDEX, 7], [IGNORE_INDEX, 8, IGNORE_INDEX, -100, -100]])
    images = torch.stack([torch.full((2, 3), 100.0 + i) for i in range(3)])  # A, B, C: 2 tokens each
    videos = torch.full((1, 3, 3), 500.0)  # V: 3 tokens
    embeds, out_mask, out_labels = splice_modality_tokens(input_ids, mask, labels, table(), {IMG: fixed(images), VID: fixed(videos)})

    first = embeds[0, :, 0].tolist()
    assert first == [1, 100, 100, 2, 101, 101, 3]
    second = embeds[1, :, 0].tolist()
    assert second == [500, 500, 500, 4, 102, 102, 0]
    assert out_mask.tolist() == [[1] * 7, [1] * 6 + [0]]
    assert out_labels[0].tolist() == [5, -100, -100, 6, -100, -100, 7]
    assert out_labels[1].tolist() == [-100, -100, -100, 8, -100, -100, -100]


def test_left_padding_for_generation():
    input_ids = torch.tensor([[0, 0, IMG, 1], [IMG, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    images = torch.stack([torch.full((2, 3), 100.0), torch.full((2, 3), 101.0)])
    embeds, out_mask, labels = splice_modality_tokens(input_ids, mask, None, table(), {IMG: fixed(images)}, "left")
    assert labels is None
    assert out_mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert embeds[0, :, 0].tolist() == [0, 0, 100, 100, 1]
    assert embeds[1, :, 0].tolist() == [101, 101, 2, 3, 4]


def test_count_mismatch_is_an_error():
    input_ids = torch.tensor([[1, IMG, 2]])
    mask = torch.ones_like(input_ids)
    with pytest.raises(ValueError, match="more media placeholders"):
        splice_modality_tokens(input_ids, mask, None, table(), {IMG: fixed(torch.zeros(0, 2, 3))})
    with pytest.raises(ValueError, match="2 media items"):
        splice_modality_tokens(input_ids, mask, None, table(), {IMG: fixed(torch.zeros(2, 2, 3))})


def test_gradient_flows_into_spliced_items_only_through_their_rows():
    input_ids = torch.tensor([[1, IMG, 2]])
    images = torch.randn(1, 2, 3, requires_grad=True)
    embeds, _, _ = splice_modality_tokens(input_ids, torch.ones_like(input_ids), None, table(), {IMG: fixed(images)})
    embeds[0, 1:3].sum().backward()
    assert torch.equal(images.grad, torch.ones_like(images))


def test_variable_length_items_insert_exactly_their_own_tokens():
    # Two items padded to 3 tokens, of which the first uses 1 and the second 3 (speech-like counts).
    input_ids = torch.tensor([[1, IMG, 2], [IMG, 3, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    embeds = torch.stack([torch.full((3, 3), 100.0), torch.full((3, 3), 200.0)])
    embeds[0, 1:] = -1.0  # padding positions must never reach the LLM
    tokens = ModalityTokens(embeds, torch.tensor([1, 3]))
    out, out_mask, _ = splice_modality_tokens(input_ids, mask, None, table(), {IMG: tokens})
    assert out[0, :, 0].tolist() == [1, 100, 2, 0]
    assert out[1, :, 0].tolist() == [200, 200, 200, 3]
    assert out_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
