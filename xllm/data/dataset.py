"""Dataset of tokenized conversations (a Hugging Face `datasets.Dataset`) that loads media lazily.

Text is validated and tokenized once up front (so an over-long or malformed record fails before training
starts); media files are decoded per item in the data workers, where a corrupt file raises a
`BadSampleError` naming the record and file, or is skipped and counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import torch

from xllm.data.processor import ConversationProcessor
from xllm.data.records import BadSampleError, BadSamples, read_records

MediaLoader = Callable[[str], Any]


def build_tokenized_dataset(
    path: str,
    processor: ConversationProcessor,
    media_root: str | None = None,
    bad_samples: BadSamples | None = None,
    allow_outside_root: bool = False,
) -> datasets.Dataset:
    """Read, validate and tokenize a data file into a `datasets.Dataset` (bad records raise or are counted)."""
    bad_samples = bad_samples if bad_samples is not None else BadSamples()
    rows = []
    for record in read_records(path, list(processor.sentinels), media_root, bad_samples, allow_outside_root):
        try:
            rows.append(tokenized_row(record, processor))
        except BadSampleError as err:
            bad_samples.reject(err)
    if not rows:
        raise ValueError(f"{path}: no usable records ({bad_samples.total} skipped: {dict(bad_samples.counts)})")
    return datasets.Dataset.from_list(rows)


def tokenized_row(record: dict[str, Any], processor: ConversationProcessor) -> dict[str, Any]:
    """A normalized record as a dataset row: id, source, media paths per modality and its tokens (raises
    `BadSampleError` when it cannot be tokenized whole)."""
    media = {m: record["media"].get(m, []) for m in processor.sentinels}
    return {"id": record["id"], "source": record["source"], "media": media, **processor.encode(record)}


def training_item(row: dict[str, Any], media_loaders: dict[str, MediaLoader],
                  bad_samples: BadSamples) -> dict[str, Any]:
    """A row's training item (`ConversationDataset`'s), its media loaded; `{"skipped": error}` when a file fails."""
    media = load_item_media(row, media_loaders, bad_samples)
    if isinstance(media, BadSampleError):
        return {"skipped": media}
    return {"id": row["id"], "input_ids": row["input_ids"], "labels": row["labels"], "media": media,
            "instruction_ids": row["instruction_ids"]}


def load_item_media(
    row: dict[str, Any], media_loaders: dict[str, MediaLoader], bad_samples: BadSamples
) -> dict[str, list[Any]] | BadSampleError:
    """modality -> loaded items of one row, or the `BadSampleError` of a file that failed (under `skip`)."""
    media: dict[str, list[Any]] = {}
    for modality, paths in row["media"].items():
        items = []
        for path in paths or []:
            try:
                items.append(media_loaders[modality](path))
            except (OSError, ValueError, RuntimeError) as err:
                error = BadSampleError(row["source"], row["id"], f"cannot load {modality} {path}: {err}", "corrupt_media")
                error.__cause__ = err
                bad_samples.reject(error)
                return error
        media[modality] = items
    return media


class ConversationDataset(torch.utils.data.Dataset):
    """Items: `{"id", "input_ids", "labels", "media": {modality: [item]}, "instruction_ids": {modality: [[id]]}}`,
    or `{"skipped": BadSampleError}` for an item whose media could not be loaded (with `on_bad_sample: skip`)."""

    def __init__(
        self, rows: datasets.Dataset, media_loaders: dict[str, MediaLoader], bad_samples: BadSamples | None = None
    ) -> None:
        self.rows = rows.with_format(None)
        self.media_loaders = media_loaders
        self.bad_samples = bad_samples if bad_samples is not None else BadSamples()

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def truncated(self) -> int:
        """How many conversations were cut to `max_length` (never through a media item)."""
        return sum(self.rows["truncated"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return training_item(self.rows[index], self.media_loaders, self.bad_samples)
