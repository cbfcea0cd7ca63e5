"""DataModule: conversation files -> validated, tokenized datasets -> batches with media.

Tokenizer, template, modality token counts and media loaders come from the model being trained
(`setup` asks the Trainer's LightningModule), so data and model can never disagree.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from xllm.data.collator import ConversationCollator
from xllm.data.dataset import ConversationDataset, build_tokenized_dataset
from xllm.data.pairs import PairCollator, PairDataset, build_pair_dataset
from xllm.data.records import OnBadSample, SkipCounter


class XLLMDataModule(pl.LightningDataModule):
    """LLaVA-style JSON/JSONL conversations with media (stage 0 turns them into media-text pairs).

    Args:
        train_file: training data (JSON list or JSONL).
        val_file: optional validation data.
        media_root: folder media paths resolve against (default: each data file's folder).
        batch_size: sequences per batch per device.
        num_workers: DataLoader workers.
        on_bad_sample: `error` stops at the first bad record, naming it; `skip` drops and counts it.
    """

    def __init__(
        self,
        train_file: str,
        val_file: str | None = None,
        media_root: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        on_bad_sample: OnBadSample = "error",
    ) -> None:
        super().__init__()
        self.train_file, self.val_file, self.media_root = train_file, val_file, media_root
        self.batch_size, self.num_workers, self.on_bad_sample = batch_size, num_workers, on_bad_sample
        self.datasets: dict[str, ConversationDataset] = {}
        self.skipped: dict[str, SkipCounter] = {}
        self.collator: ConversationCollator | None = None

    def setup(self, stage: str | None = None, model: Any = None) -> None:
        model = model if model is not None else self.trainer.lightning_module
        if model.stage == 0:
            self._setup_pairs(model)
            return
        xllm = model.model
        processor = xllm.processor(max_length=model.max_length)
        loaders = {m: i.media_loader() for m, i in xllm.interfaces.items()}
        self.collator = ConversationCollator(
            pad_token_id=xllm.tokenizer.pad_token_id,
            collate_media={m: i.collate_media for m, i in xllm.interfaces.items()},
        )
        for split, path in (("train", self.train_file), ("val", self.val_file)):
            if path is None or split in self.datasets:
                continue
            counter = SkipCounter()
            rows = build_tokenized_dataset(path, processor, self.media_root, self.on_bad_sample, counter)
            for modality, interface in xllm.interfaces.items():
                interface.prepare_media([p for media in rows["media"] for p in (media.get(modality) or [])])
            self.datasets[split] = ConversationDataset(rows, loaders, self.on_bad_sample)
            self.skipped[split] = counter
            self._report(split, path, len(rows), counter, truncated=sum(rows["truncated"]))

    def _setup_pairs(self, model: Any) -> None:
        """Stage 0: media-text pairs tokenized by the Q-Former's own tokenizer (no LLM anywhere)."""
        ((modality, interface),) = model.interfaces.items()
        self.collator = PairCollator(interface.text_tokenizer, interface.max_text_tokens)
        for split, path in (("train", self.train_file), ("val", self.val_file)):
            if path is None or split in self.datasets:
                continue
            counter = SkipCounter()
            rows = build_pair_dataset(path, modality, self.media_root, self.on_bad_sample, counter)
            interface.prepare_media(list(rows["path"]))
            self.datasets[split] = PairDataset(rows, interface.media_loader(), self.on_bad_sample)
            self.skipped[split] = counter
            self._report(split, path, len(rows), counter, truncated=0)

    def _report(self, split: str, path: str, samples: int, counter: SkipCounter, truncated: int) -> None:
        message = f"{split}: {samples} samples from {path}"
        if counter.total or truncated:
            message += f"; skipped {counter.total} {dict(counter.counts)}; truncated {truncated}"
            for example in counter.examples:
                message += f"\n  skipped: {example}"
        print(message)
        if self.trainer is not None:
            for logger in self.trainer.loggers:
                logger.log_hyperparams({f"data/{split}_samples": samples, f"data/{split}_skipped": counter.total,
                                        f"data/{split}_truncated": truncated})

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            collate_fn=self.collator, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False) if "val" in self.datasets else []
