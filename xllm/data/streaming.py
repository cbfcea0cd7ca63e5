"""Training data too big for memory: conversations read lazily from JSONL shards, `StreamingConversations`.

Each epoch has one order over all records, a function of (seed, epoch): the shards in a shuffled order, each
shard's lines in a shuffled order. Rank r takes the r-th contiguous slice of that order, and its loader workers take
its batches in turn (worker w the batches w, w + workers, ...: the order in which the loader collects them), so
every record is read exactly once per epoch and a rank reads only the shards its slice touches. Every rank gets the
same number of records, hence of batches, so every rank takes the same number of steps (DDP and FSDP2 hang
otherwise): when the records do not divide by the ranks, the last slice wraps around to the epoch's first records
(at most ranks - 1 repeats, as torch's `DistributedSampler` pads). The stream has a length (its batches are known
up front), so Lightning knows the epoch and does not read a batch ahead, which would put a saved position one batch
past the last one trained. Memory holds one shard's text per worker, never the corpus.

A worker's position (epoch, records served) is its state: `StatefulDataLoader` saves it in Lightning's checkpoints,
and a resumed run goes on with the very next record.

Records are checked and tokenized in the workers, as they are read: a bad record raises `BadSampleError` naming
its shard and line, or (with `on_bad_sample: skip`) reaches the collator as a skipped item that training logs and
counts (`skipped/...`), as a corrupt media file does with in-memory data.

Why not `datasets.load_dataset("json", streaming=True)` (measured here, DESIGN.md): its Arrow reader loses the
file and line of a bad record and stops on a malformed line or on records whose fields differ in type; its shuffle
is a buffer, not a reproducible order; and with fewer shards than ranks × workers it splits by example, which
every reader then reads in full. The order and the split here are a few lines of arithmetic.
"""

from __future__ import annotations

import bisect
import glob
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from xllm.data.dataset import MediaLoader, tokenized_row, training_item
from xllm.data.processor import ConversationProcessor
from xllm.data.records import BadSampleError, BadSamples, normalize_record, parse_line


def expand_shards(shards: str | list[str]) -> list[str]:
    """Shard files from paths and glob patterns (`data/train-*.jsonl`), in sorted order; an empty pattern fails."""
    patterns = [shards] if isinstance(shards, str) else list(shards)
    files: list[str] = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not found:
            raise FileNotFoundError(f"no shard matches {pattern}")
        for file in found:
            if not Path(file).is_file():
                raise FileNotFoundError(f"data shard not found: {file}")
        files += found
    return files


def shard_lines(path: str) -> list[tuple[int, str]]:
    """(line number, text) of a JSONL shard's non-blank lines."""
    with open(path, encoding="utf-8") as handle:
        return [(number, line) for number, line in enumerate(handle, start=1) if line.strip()]


def count_records(path: str) -> int:
    """Non-blank lines of a shard (a pass over its text, nothing parsed)."""
    with open(path, encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


class StreamingConversations(IterableDataset):
    """Items as `ConversationDataset` gives them, read lazily from JSONL shards (see the module docstring).

    Args:
        shards: JSONL files or glob patterns; one record per line.
        processor: the model's conversation processor (checks and tokenizes each record).
        media_loaders: modality -> `path -> item` (the interfaces' loaders: the feature cache's when it is on).
        media_root: folder media paths resolve against (default: each shard's folder).
        bad_samples: `error` raises at a bad record, naming it; `skip` hands it to the collator as skipped.
        allow_outside_root: accept media paths that lead outside the media root.
        seed: the order's seed (the epoch is added to it).
        rank, world_size: this process's slice of each epoch.
        batch_size: the loader's batch size (workers read whole batches: `worker_positions`).
    """

    def __init__(self, shards: str | list[str], processor: ConversationProcessor, media_loaders: dict[str, MediaLoader],
                 media_root: str | None = None, bad_samples: BadSamples | None = None,
                 allow_outside_root: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1) -> None:
        self.shards = expand_shards(shards)
        self.sizes = [count_records(s) for s in self.shards]
        self.records = sum(self.sizes)
        if not self.records:
            raise ValueError(f"no records in {len(self.shards)} shard(s): {self.shards[:3]}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.processor, self.media_loaders, self.media_root = processor, media_loaders, media_root
        self.bad_samples = bad_samples if bad_samples is not None else BadSamples()
        self.allow_outside_root, self.seed, self.rank, self.world_size = allow_outside_root, seed, rank, world_size
        self.batch_size = batch_size
        self.epoch, self.served = 0, 0  # this worker's position: the epoch and how many of its records it served

    # --- the epoch's order and this worker's slice of it --------------------------------------------------------
    @property
    def per_rank(self) -> int:
        return -(-self.records // self.world_size)

    def __len__(self) -> int:
        """Records this rank reads per epoch (the loader's length is then its true number of batches)."""
        return self.per_rank

    def worker_positions(self, worker: int, workers: int) -> list[int]:
        """Positions in the epoch's order that this rank's `worker` reads (positions ≥ records wrap around): whole
        batches, worker w the w-th of every `workers`, the order in which the loader takes batches from its workers,
        so the rank's batches are its slice of the order, in order, and only the last one is short."""
        start, batches = self.rank * self.per_rank, -(-self.per_rank // self.batch_size)
        return [start + position for batch in range(worker, batches, workers)
                for position in range(batch * self.batch_size, min((batch + 1) * self.batch_size, self.per_rank))]

    def shard_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.shards), generator=generator).tolist()

    def line_order(self, epoch: int, shard: int) -> list[int]:
        generator = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 1_000_003 + shard)
        return torch.randperm(self.sizes[shard], generator=generator).tolist()

    def locate(self, position: int, shards: list[int], ends: list[int]) -> tuple[int, int]:
        """(shard, index into its shuffled lines) of a position in the epoch's order, whose shards in order are
        `shards` and end at the positions `ends`."""
        position %= self.records
        place = bisect.bisect_right(ends, position)
        return shards[place], position - (ends[place] - self.sizes[shards[place]])

    # --- reading --------------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        positions = self.worker_positions(worker, workers)
        shards = self.shard_order(self.epoch)
        ends = list(itertools.accumulate(self.sizes[shard] for shard in shards))
        loaded: tuple[int, list[tuple[int, str]], list[int]] | None = None  # the shard in hand: lines and order
        while self.served < len(positions):
            shard, index = self.locate(positions[self.served], shards, ends)
            if loaded is None or loaded[0] != shard:
                loaded = (shard, shard_lines(self.shards[shard]), self.line_order(self.epoch, shard))
            number, line = loaded[1][loaded[2][index]]
            self.served += 1  # counted before it is handed out: a saved state points past what was served
            yield self.item(f"{self.shards[shard]}:{number}", line, Path(self.shards[shard]).parent)
        self.epoch, self.served = self.epoch + 1, 0

    def item(self, source: str, line: str, folder: Path) -> dict[str, Any]:
        """A training item of one JSONL line, or `{"skipped": error}` for a bad one under `skip`."""
        root = self.media_root if self.media_root is not None else str(folder)
        try:
            record = normalize_record(source, parse_line(source, line), list(self.processor.sentinels), root,
                                      self.allow_outside_root)
            row = tokenized_row(record, self.processor)
        except BadSampleError as err:
            self.bad_samples.reject(err)
            return {"skipped": err}
        return training_item(row, self.media_loaders, self.bad_samples)

    def media_paths(self, modality: str, chunk: int = 4096) -> Iterator[list[str]]:
        """Every readable record's `modality` files, `chunk` at a time, for filling a feature cache before training
        (a bad record is passed over here: reading it in training names or counts it)."""
        paths: list[str] = []
        for shard in self.shards:
            root = self.media_root if self.media_root is not None else str(Path(shard).parent)
            for number, line in shard_lines(shard):
                source = f"{shard}:{number}"
                try:
                    record = normalize_record(source, parse_line(source, line), list(self.processor.sentinels), root,
                                              self.allow_outside_root)
                except BadSampleError:
                    continue
                paths += record["media"].get(modality, [])
                if len(paths) >= chunk:
                    yield paths
                    paths = []
        if paths:
            yield paths

    # --- position, saved and restored by StatefulDataLoader (in each worker) --------------------------------------
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.served = int(state["epoch"]), int(state["served"])
