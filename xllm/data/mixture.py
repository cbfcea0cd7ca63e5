"""Training on several data files at once, each drawn with its own weight: `DataSource` and `MixtureSampler`.

A joint model learns from sources of very different sizes (9,600 typed image questions, 2,000 transcripts, a few
hundred spoken questions): weights say how often each is drawn, not how big it is. An epoch is `epoch_size` draws
(default: all records once); each draw picks a source with probability weight / sum of weights, then that source's
next record in its own shuffled order, so a small source is repeated (in a new order each pass) and a big one is
seen in part. torch's `WeightedRandomSampler` draws records with replacement (the same record twice in a row, others
never); this one keeps each source's pass without replacement, which is what "weight" means in LLaVA-style data
mixes.

The order depends only on (seed, epoch), so every rank computes the same epoch and takes its own stride of it (as
`DistributedSampler` does), and a `StatefulDataLoader` resumes mid-epoch by replaying the same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DistributedSampler


@dataclass
class DataSource:
    """One training data file of a mix.

    Args:
        file: JSON/JSONL conversations.
        weight: how often it is drawn relative to the other sources (any positive number).
        media_root: folder its media paths resolve against (default: the file's folder).
    """

    file: str
    weight: float = 1.0
    media_root: str | None = None


class MixtureSampler(DistributedSampler):
    """Indices into the concatenation of sources of `sizes`, each source drawn with its `weights` share.

    Args:
        sizes: records per source, in the order they are concatenated.
        weights: one positive weight per source.
        epoch_size: draws per epoch over all ranks (default: the sum of `sizes`).
        seed: the mix's seed; the epoch (`set_epoch`, called by Lightning) is added to it.
        rank, world_size: this process's stride of each epoch.
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], epoch_size: int | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if len(sizes) != len(weights) or not sizes:
            raise ValueError(f"{len(sizes)} sources but {len(weights)} weights")
        if any(w <= 0 for w in weights) or any(n <= 0 for n in sizes):
            raise ValueError(f"every source needs records and a positive weight: sizes {list(sizes)}, "
                             f"weights {list(weights)}")
        # A DistributedSampler by type only (its __init__ would look up a process group): Lightning then leaves the
        # loader as it is, where it would wrap any other sampler in one more distributed stride.
        self.sizes, self.weights = list(sizes), torch.tensor(weights, dtype=torch.double)
        self.epoch_size = epoch_size or sum(sizes)
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self.num_replicas, self.shuffle, self.drop_last = world_size, True, True

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_order(self) -> list[int]:
        """Every rank's draws of the current epoch, in order."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        choices = torch.multinomial(self.weights, self.epoch_size, replacement=True, generator=generator).tolist()
        offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        orders = [torch.randperm(n, generator=generator).tolist() for n in self.sizes]
        taken = [0] * len(self.sizes)
        out = []
        for source in choices:
            if taken[source] and taken[source] % self.sizes[source] == 0:  # a new pass through a small source
                orders[source] = torch.randperm(self.sizes[source], generator=generator).tolist()
            out.append(offsets[source] + orders[source][taken[source] % self.sizes[source]])
            taken[source] += 1
        return out

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        usable = len(order) - len(order) % self.world_size  # every rank the same number of draws
        return iter(order[self.rank:usable:self.world_size])

    def __len__(self) -> int:
        return self.epoch_size // self.world_size
