"""Dataset of tokenized conversations (a Hugging Face `datasets.Dataset`) that loads media lazily.

Text is validated and tokenized once up front with `datasets.map` (so an over-long or malformed record
fails before training starts); media files are decoded per item in the data workers, where a corrupt
file raises a `BadSampleError` naming the record and file, or is skipped and counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import torch

from xllm.data.processor import ConversationProcessor
from xllm.data.records import BadSampleError, OnBadSample, SkipCounter, read_records

MediaLoader = Callable[[str], torch.Tensor]


def build_tokenized_dataset(
    path: str,
    processor: ConversationProcessor,
    media_root: str | None = None,
    on_bad_sample: OnBadSample = "error",
    skipped: SkipCounter | None = None,
) -> datasets.Dataset:
    """Read, validate and tokenize a data file into a `datasets.Dataset` (bad records raise or are counted)."""
    skipped = skipped if skipped is not None else SkipCounter()
    records = read_records(path, list(processor.sentinels), media_root, on_bad_sample, skipped)
    rows = []
    for record in records:
        try:
            encoded = processor.encode(record)
        except BadSampleError as err:
            if on_bad_sample == "error":
                raise
            skipped.add(err)
            continue
        media = {m: record["media"].get(m, []) for m in processor.sentinels}
        rows.append({"id": record["id"], "source": record["source"], "media": media, **encoded})
    if not rows:
        raise ValueError(f"{path}: no usable records ({skipped.total} skipped: {dict(skipped.counts)})")
    return datasets.Dataset.from_list(rows)


class ConversationDataset(torch.utils.data.Dataset):
    """Items: `{"id", "input_ids", "labels", "media": {modality: [tensor]}, "media_text": {modality: [str]}}`,
    or `{"skipped": BadSampleError}` for an item whose media could not be loaded (with `on_bad_sample: skip`)."""

    def __init__(
        self, rows: datasets.Dataset, media_loaders: dict[str, MediaLoader], on_bad_sample: OnBadSample = "error"
    ) -> None:
        self.rows = rows.with_format(None)
        self.media_loaders = media_loaders
        self.on_bad_sample = on_bad_sample

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        row = self.rows[index]
        media: dict[str, list[torch.Tensor]] = {}
        for modality, paths in row["media"].items():
            items = []
            for path in paths or []:
                try:
                    items.append(self.media_loaders[modality](path))
                except (OSError, ValueError, RuntimeError) as err:
                    error = BadSampleError(row["source"], row["id"], f"cannot load {modality} {path}: {err}", "corrupt_media")
                    if self.on_bad_sample == "error":
                        raise error from err
                    return {"skipped": error}
            media[modality] = items
        return {"id": row["id"], "input_ids": row["input_ids"], "labels": row["labels"], "media": media,
                "media_text": row["media_text"]}

