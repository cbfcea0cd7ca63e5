"""DataModule: data files -> validated datasets -> batches, as the LightningModule being trained reads them.

How a file is read, tokenized and batched comes from the model (`build_dataset`, `collator`): conversations
for stages 1-2, media-text pairs for stage 0. So data and model can never disagree, and nothing here needs to
know which stage runs.
"""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import ConcatDataset, Dataset, DistributedSampler, IterableDataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from xllm.data.mixture import DataSource, MixtureSampler
from xllm.data.records import BadSamples, OnBadSample


class XLLMDataModule(pl.LightningDataModule):
    """LLaVA-style JSON/JSONL conversations with media.

    Args:
        train_file: training data (JSON list or JSONL); or give `train_sources`.
        train_sources: several training files, each drawn with its own weight (`DataSource`: file, weight,
            media_root), e.g. typed image questions, transcripts and spoken questions for a joint model.
        epoch_size: with `train_sources`, records drawn per epoch over all ranks (default: every record's count).
        train_shards: JSONL shards (paths or glob patterns) read lazily, for corpora that do not fit in memory
            (`xllm.data.streaming`): each record once per epoch over every rank and loader worker, the position
            saved in checkpoints; stages 1-2.
        val_file: optional validation data.
        media_root: folder media paths resolve against (default: each data file's folder).
        batch_size: sequences per batch per device.
        num_workers: DataLoader workers.
        on_bad_sample: `error` stops at the first bad record, naming it; `skip` drops and counts it.
        allow_media_outside_root: accept media paths that lead outside the media root (absolute or `..`); off,
            such a record is a bad sample, so a data file cannot make training read any file of the machine.
    """

    def __init__(
        self,
        train_file: str | None = None,
        train_sources: list[DataSource] | None = None,
        epoch_size: int | None = None,
        train_shards: str | list[str] | None = None,
        val_file: str | None = None,
        media_root: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        on_bad_sample: OnBadSample = "error",
        allow_media_outside_root: bool = False,
    ) -> None:
        super().__init__()
        if sum((train_file is not None, bool(train_sources), bool(train_shards))) != 1:
            raise ValueError("give the training data as train_file, as train_sources (a list of {file, weight}) or as "
                             "train_shards (JSONL shards read lazily), one of the three")
        self.train_shards = train_shards
        self.train_sources = [DataSource(**s) if isinstance(s, dict) else s for s in train_sources or []]
        self.epoch_size = epoch_size
        self.allow_media_outside_root = allow_media_outside_root
        self.train_file, self.val_file, self.media_root = train_file, val_file, media_root
        self.batch_size, self.num_workers, self.on_bad_sample = batch_size, num_workers, on_bad_sample
        self.datasets: dict[str, Dataset] = {}
        self.bad_samples: dict[str, BadSamples] = {}
        self.collator: Any = None
        self.train_loader: StatefulDataLoader | None = None
        self.train_loader_state: dict[str, Any] | None = None

    def setup(self, stage: str | None = None, model: Any = None) -> None:
        model = model if model is not None else self.trainer.lightning_module
        self.collator = model.collator()
        # Under DDP, rank 0 builds the datasets first (filling the feature cache: each file encoded once); the other
        # ranks wait, then find the cache full. (Every rank writes entries atomically, so a rank of another node,
        # with its own disk, fills its own.)
        strategy = self.trainer.strategy if self.trainer is not None else None
        ranks_wait = strategy is not None and strategy.world_size > 1
        if ranks_wait and not strategy.is_global_zero:
            strategy.barrier("rank 0 fills the feature cache")
        self.build_datasets(model)
        if ranks_wait and strategy.is_global_zero:
            strategy.barrier("rank 0 fills the feature cache")

    def build_datasets(self, model: Any) -> None:
        if self.train_shards and "train" not in self.datasets:
            trainer = self.trainer
            bad_samples = BadSamples(self.on_bad_sample)
            world_size = trainer.world_size if trainer is not None else 1
            stream = model.build_streaming_dataset(
                self.train_shards, self.media_root, bad_samples, self.allow_media_outside_root,
                seed=int(os.environ.get("PL_GLOBAL_SEED", 0)), rank=trainer.global_rank if world_size > 1 else 0,
                world_size=world_size, batch_size=self.batch_size)
            self.datasets["train"], self.bad_samples["train"] = stream, bad_samples
            print(f"train: {stream.records} records in {len(stream.shards)} shard(s), read as a stream "
                  f"({stream.per_rank} per rank per epoch; bad records are named or counted as they are met)")
        if self.train_sources and "train" not in self.datasets:
            parts = []
            for number, source in enumerate(self.train_sources):
                bad_samples = BadSamples(self.on_bad_sample)
                parts.append(model.build_dataset(source.file, source.media_root or self.media_root, bad_samples,
                                                 self.allow_media_outside_root))
                self.bad_samples[f"train/{number}"] = bad_samples
                self._report(f"train source {number} (weight {source.weight:g})", source.file, parts[-1], bad_samples)
            self.datasets["train"] = ConcatDataset(parts)
        for split, path in (("train", self.train_file), ("val", self.val_file)):
            if path is None or split in self.datasets:
                continue
            bad_samples = BadSamples(self.on_bad_sample)
            self.datasets[split] = model.build_dataset(path, self.media_root, bad_samples,
                                                       self.allow_media_outside_root)
            self.bad_samples[split] = bad_samples
            self._report(split, path, self.datasets[split], bad_samples)

    def _report(self, split: str, path: str, dataset: Dataset, bad_samples: BadSamples) -> None:
        samples, truncated = len(dataset), getattr(dataset, "truncated", 0)
        message = f"{split}: {samples} samples from {path}"
        if bad_samples.total or truncated:
            message += f"; skipped {bad_samples.total} {dict(bad_samples.counts)}; truncated {truncated}"
            for example in bad_samples.examples:
                message += f"\n  skipped: {example}"
        print(message)
        if self.trainer is not None:
            for logger in self.trainer.loggers:
                logger.log_hyperparams({f"data/{split}_samples": samples, f"data/{split}_skipped": bad_samples.total,
                                        f"data/{split}_truncated": truncated})

    def _loader(self, split: str, shuffle: bool, sampler: Sampler | None = None) -> StatefulDataLoader:
        # A DataLoader whose position (shuffle order and batches served) Lightning saves in its checkpoints, so a
        # run killed mid-epoch resumes with the very next batch instead of a new shuffle of the whole epoch.
        stream = isinstance(self.datasets[split], IterableDataset)  # orders itself: no sampler, no shuffle
        return StatefulDataLoader(
            self.datasets[split], batch_size=self.batch_size, shuffle=shuffle and sampler is None and not stream,
            sampler=sampler,
            num_workers=self.num_workers, collate_fn=self.collator, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> StatefulDataLoader:
        # Under DDP the loader gets the DistributedSampler Lightning would inject (same seed, same shards): Lightning
        # leaves such a loader as it is, so the loader whose position the checkpoint holds is the one that runs.
        # (Rebuilt by Lightning around its own sampler, the saved position was a copy's, and `--ckpt_path last`
        # stopped with "Please call `iter(combined_loader)` first": a RandomSampler's state in a distributed one.)
        sampler = None
        world_size = self.trainer.world_size if self.trainer is not None else 1
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        if self.train_sources:  # a mix: every rank its stride of one weighted order per epoch
            sampler = MixtureSampler([len(d) for d in self.datasets["train"].datasets],
                                     [s.weight for s in self.train_sources], self.epoch_size, seed,
                                     self.trainer.global_rank if world_size > 1 else 0, world_size)
        elif world_size > 1 and not self.train_shards:  # (a stream splits itself over ranks and workers)
            sampler = DistributedSampler(self.datasets["train"], num_replicas=self.trainer.world_size,
                                         rank=self.trainer.global_rank, shuffle=True,
                                         seed=seed)
        self.train_loader = self._loader("train", shuffle=True, sampler=sampler)
        if self.train_loader_state is not None:
            self.train_loader.load_state_dict(self.train_loader_state)
            self.train_loader_state = None
        return self.train_loader

    # The loader's position travels in the checkpoint through these two hooks as well as through Lightning's own
    # loop state, because Lightning drops its copy when `configure_optimizers` reads `estimated_stepping_batches`
    # (Lightning issue 20550: the loader is built before the checkpoint is restored), and every xllm module does.
    # Lightning restores a datamodule before it builds the loader, so the position is applied as it is built.
    def state_dict(self) -> dict[str, Any]:
        return {"train_loader": self.train_loader.state_dict()} if self.train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_loader_state = state_dict.get("train_loader")

    def val_dataloader(self) -> StatefulDataLoader | list:
        return self._loader("val", shuffle=False) if "val" in self.datasets else []
