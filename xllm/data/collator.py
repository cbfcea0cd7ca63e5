"""Batches conversation items: right-padded ids/labels/mask, and one `MediaBatch` per modality."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from xllm.interfaces.base import MediaBatch
from xllm.tensors import IGNORE_INDEX


def pad_ids(rows: Sequence[Sequence[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `[n, longest]` ids and their mask."""
    length = max((len(r) for r in rows), default=0)
    # One tensor from padded Python lists: a tensor per row cost ~5 ms per call at stage 0's batch of 128.
    ids = torch.tensor([list(r) + [pad] * (length - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), length)
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), length)
    return ids, mask


@dataclass
class ConversationCollator:
    """`__call__(items) -> batch` or `None` when every item of the batch was skipped.

    Media items are gathered in reading order (row by row, left to right), the same order in which `XLLM`
    meets their sentinels, so the i-th `<image>` of the batch gets the i-th image; each modality's
    `collate` (its interface's) turns them into a `MediaBatch`, and each item's instruction ids join it.
    """

    pad_token_id: int
    collate_media: dict[str, Callable[[list[Any]], MediaBatch]] = field(default_factory=dict)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any] | None:
        skipped = [item["skipped"] for item in items if "skipped" in item]
        items = [item for item in items if "skipped" not in item]
        if not items:
            return None
        input_ids, attention_mask = pad_ids([item["input_ids"] for item in items], self.pad_token_id)
        labels, _ = pad_ids([item["labels"] for item in items], IGNORE_INDEX)
        media: dict[str, MediaBatch] = {}
        for modality, collate in self.collate_media.items():
            batch_items = [m for item in items for m in item["media"].get(modality, [])]
            if not batch_items:
                continue
            batch = collate(batch_items)
            instructions = [ids for item in items for ids in (item.get("instruction_ids") or {}).get(modality) or []]
            if instructions:
                if len(instructions) != len(batch_items):
                    raise ValueError(f"{len(instructions)} {modality} instructions for {len(batch_items)} items")
                batch = batch.with_instructions(*pad_ids(instructions))
            media[modality] = batch
        return {
            "ids": [item["id"] for item in items],
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "media": media,
            "skipped": [str(error) for error in skipped],
        }
