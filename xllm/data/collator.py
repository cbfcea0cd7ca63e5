"""Batches conversation items: right-padded ids/labels/mask, and every media item of the batch per modality."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from xllm.data.processor import IGNORE_INDEX


@dataclass
class ConversationCollator:
    """`__call__(items) -> batch` or `None` when every item of the batch was skipped.

    Media items are concatenated in reading order (row by row, left to right), the same order in which
    `XLLM` meets their sentinels, so the i-th `<image>` of the batch gets the i-th image.
    """

    pad_token_id: int
    collate_media: dict[str, Callable[[list[torch.Tensor]], torch.Tensor]] = field(default_factory=dict)

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        skipped = [item["skipped"] for item in items if "skipped" in item]
        items = [item for item in items if "skipped" not in item]
        if not items:
            return None
        length = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.tensor(item["input_ids"])
            labels[row, :n] = torch.tensor(item["labels"])
            attention_mask[row, :n] = 1
        media: dict[str, torch.Tensor] = {}
        media_text: dict[str, list[str]] = {}
        for modality, collate in self.collate_media.items():
            batch_items = [m for item in items for m in item["media"].get(modality, [])]
            if batch_items:
                media[modality] = collate(batch_items)
                media_text[modality] = [t for item in items for t in (item.get("media_text") or {}).get(modality, [])]
        return {
            "ids": [item["id"] for item in items],
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "media": media,
            "media_text": media_text,
            "skipped": [str(error) for error in skipped],
        }
