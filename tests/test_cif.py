"""Continuous integrate-and-fire (the C-Former's core), on hand-made weights where the answer is known."""

import torch

from xllm.blocks.cformer import CFormer, cif, quantity_loss


def one_hot_frames(steps: int) -> torch.Tensor:
    """Frame t is the unit vector e_t, so a fired token's vector is exactly its share of each frame."""
    return torch.eye(steps)[None]


def test_fires_floor_of_the_total_at_the_right_frames():
    alphas = torch.tensor([[0.3, 0.4, 0.5, 0.9, 0.2]])  # total 2.3: crossings inside frames 2 and 3
    fired = cif(one_hot_frames(5), alphas, tail_threshold=0.5)
    assert fired.lengths.tolist() == [2]
    expected = torch.tensor([[0.3, 0.4, 0.3, 0.0, 0.0],   # frame 2 split: 0.3 to token 0 ...
                             [0.0, 0.0, 0.2, 0.8, 0.0]])  # ... 0.2 to token 1, which fires inside frame 3
    torch.testing.assert_close(fired.tokens[0], expected, atol=1e-6, rtol=0)


def test_several_fires_within_one_frame():
    alphas = torch.tensor([[0.5, 2.5, 0.2]])  # frame 1 alone completes three tokens' worth of weight
    fired = cif(one_hot_frames(3), alphas, tail_threshold=0.5)
    assert fired.lengths.tolist() == [3]
    expected = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(fired.tokens[0], expected, atol=1e-6, rtol=0)


def test_total_weight_is_conserved_and_the_tail_rule_fires_a_large_remainder():
    alphas = torch.tensor([[0.6, 0.7, 0.8, 0.6]])  # total 2.7: two whole tokens + a remainder of 0.7
    fired = cif(torch.ones(1, 4, 1), alphas, tail_threshold=0.5)
    assert fired.lengths.tolist() == [3]
    torch.testing.assert_close(fired.tokens[0, :, 0], torch.tensor([1.0, 1.0, 0.7]), atol=1e-6, rtol=0)
    assert abs(float(fired.tokens.sum()) - float(alphas.sum())) < 1e-5
    small_tail = cif(torch.ones(1, 4, 1), alphas, tail_threshold=0.8)
    assert small_tail.lengths.tolist() == [2]


def test_target_lengths_scale_the_weights_and_padding_carries_none():
    alphas = torch.full((2, 6), 0.5)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    fired = cif(torch.ones(2, 6, 1), alphas, mask, target_lengths=torch.tensor([4, 5]))
    assert fired.lengths.tolist() == [4, 5]
    torch.testing.assert_close(fired.tokens[:, :, 0], torch.ones(2, 5) * torch.tensor([[1, 1, 1, 1, 0]] + [[1] * 5]),
                               atol=1e-6, rtol=0)
    assert fired.alpha_sum.tolist() == [3.0, 2.0]  # unscaled, padding excluded: what the quantity loss sees


def test_long_inputs_fire_every_token():
    # A minute of frames fires every token, each with its whole weight. (Why float64: a float32 cumulative sum of
    # 30000 weights of 0.1 puts ~700 frames on the wrong side of a crossing.)
    fired = cif(torch.ones(1, 3000, 1), torch.full((1, 3000), 0.1))
    assert fired.lengths.tolist() == [300]
    torch.testing.assert_close(fired.tokens[0, :, 0], torch.ones(300), atol=1e-4, rtol=0)


def test_quantity_loss_trains_the_weights():
    alphas = torch.full((1, 10), 0.5, requires_grad=True)
    fired = cif(torch.randn(1, 10, 4), alphas, target_lengths=torch.tensor([3]))
    loss = quantity_loss(fired.alpha_sum, torch.tensor([3]))
    loss.backward()
    assert float(loss.detach()) == 2.0 and alphas.grad is not None and bool((alphas.grad > 0).all())


def test_cformer_batch_equals_one_by_one():
    torch.manual_seed(0)
    cformer = CFormer(12, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_tokens=64).eval()
    cformer.attach(24)
    lengths = [40, 25, 33]
    items = [torch.randn(n, 12) for n in lengths]
    batch = torch.zeros(3, 40, 12)
    for row, item in enumerate(items):
        batch[row, : len(item)] = item
    mask = torch.arange(40)[None] < torch.tensor(lengths)[:, None]
    together = cformer(batch, mask)
    for row, item in enumerate(items):
        alone = cformer(item[None], torch.ones(1, len(item), dtype=torch.bool))
        n = int(alone.lengths[0])
        assert n == int(together.lengths[row]) and n > 0
        torch.testing.assert_close(together.tokens[row, :n], alone.tokens[0, :n], atol=1e-5, rtol=1e-4)
        assert float(together.tokens[row, n:].abs().sum()) == 0.0
