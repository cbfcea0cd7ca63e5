"""Weighted data sources (issue 26): `train_sources` in the data config and the `MixtureSampler` behind it."""

from __future__ import annotations

from collections import Counter

import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

from xllm.data.mixture import MixtureSampler
from xllm.training import XLLMDataModule

SIZES, WEIGHTS = [100, 10, 5], [1.0, 1.0, 2.0]


def source_of(index: int) -> int:
    return 0 if index < 100 else 1 if index < 110 else 2


def test_sources_are_drawn_by_weight_and_a_small_source_is_replayed_whole_before_repeating():
    order = list(MixtureSampler(SIZES, WEIGHTS, epoch_size=2000, seed=1))
    shares = Counter(source_of(i) for i in order)
    assert abs(shares[0] / 2000 - 0.25) < 0.04 and abs(shares[1] / 2000 - 0.25) < 0.04
    assert abs(shares[2] / 2000 - 0.5) < 0.04
    small = [i for i in order if source_of(i) == 2]
    passes = [small[k:k + 5] for k in range(0, len(small) - 4, 5)]
    assert all(sorted(p) == list(range(110, 115)) for p in passes)  # each pass: every record once
    big = [i for i in order if source_of(i) == 0][:100]
    assert len(set(big)) == 100  # the big source's first pass has no repeat
    assert order != list(MixtureSampler(SIZES, WEIGHTS, epoch_size=2000, seed=2))
    again = MixtureSampler(SIZES, WEIGHTS, epoch_size=2000, seed=1)
    again.set_epoch(1)
    assert list(again) != order


def test_ranks_take_disjoint_strides_of_one_epoch_and_a_loader_resumes_mid_epoch():
    whole = list(MixtureSampler(SIZES, WEIGHTS, epoch_size=400, seed=3))
    ranks = [list(MixtureSampler(SIZES, WEIGHTS, 400, 3, rank, 2)) for rank in (0, 1)]
    assert ranks[0] == whole[0::2] and ranks[1] == whole[1::2] and len(ranks[0]) == len(ranks[1]) == 200

    def loader():
        return StatefulDataLoader(list(range(115)), batch_size=4, sampler=MixtureSampler(SIZES, WEIGHTS, 40, 3))

    first = loader()
    served = iter(first)
    for _ in range(3):
        next(served)
    state = first.state_dict()
    rest = [b.tolist() for b in served]
    resumed = loader()
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == rest and len(rest) == 7


def test_bad_mixes_are_refused():
    with pytest.raises(ValueError, match="one of the three"):
        XLLMDataModule(train_file="a.jsonl", train_sources=[{"file": "b.jsonl"}])
    with pytest.raises(ValueError, match="one of the three"):
        XLLMDataModule()
    with pytest.raises(ValueError, match="positive weight"):
        MixtureSampler([3, 4], [1.0, 0.0])
