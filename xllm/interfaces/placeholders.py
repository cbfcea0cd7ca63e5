"""Stand-in items for a rank whose batch lacks a modality that another rank's batch holds (sharded training).

Sharded (FSDP2), each interface is a unit of its own: its parameters are gathered from every rank when its forward
runs. Every rank must then run the same interfaces in the same order at every step, or the ranks that run one wait
for ever on a gather the others never start. `with_stand_ins` makes that so: the ranks agree on which modalities
any of them holds (one small all-reduce a step) and, where they differ, on the shape of a holding rank's first item
(a gather of shapes, only on such steps); a rank lacking one gets a single all-zero item of that shape. The model
runs it and adds its output to the loss times zero: the same collectives everywhere, no effect on the gradients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from xllm.interfaces.base import MediaBatch


def first_item_shape(batch: MediaBatch) -> dict[str, Any]:
    """What a stand-in needs of a batch: each value's per-item shape and dtype, the first item's length, the
    instruction's length."""
    return {
        "values": {name: (tuple(v.shape[1:]), str(v.dtype).removeprefix("torch.")) for name, v in batch.values.items()},
        "length": None if batch.lengths is None else int(batch.lengths[0]),
        "instruction": None if batch.instruction_ids is None else int(batch.instruction_ids.shape[1]),
    }


def stand_in(shape: Mapping[str, Any], device: torch.device) -> MediaBatch:
    """One all-zero item of `shape` (`first_item_shape`); its instruction, if any, all [PAD] (id 0)."""
    values = {name: torch.zeros((1, *dims), dtype=getattr(torch, dtype), device=device)
              for name, (dims, dtype) in shape["values"].items()}
    lengths = None if shape["length"] is None else torch.tensor([shape["length"]], device=device)
    ids = mask = None
    if shape["instruction"] is not None:
        ids = torch.zeros((1, shape["instruction"]), dtype=torch.long, device=device)
        mask = torch.ones_like(ids)
    return MediaBatch(values, lengths, ids, mask)


def with_stand_ins(media: Mapping[str, MediaBatch], modalities: Sequence[str],
                   device: torch.device) -> tuple[dict[str, MediaBatch], set[str]]:
    """`media` in `modalities` order, with a stand-in for each modality another rank holds and this one lacks;
    and the names of those stand-ins. A collective: every rank calls it at every step."""
    held = torch.tensor([int(m in media) for m in modalities], device=device)
    dist.all_reduce(held)
    world = dist.get_world_size()
    uneven = [m for m, count in zip(modalities, held.tolist()) if 0 < count < world]  # the same on every rank
    missing = [m for m in uneven if m not in media]
    if uneven:  # every rank gathers the shapes, or none does
        shapes: list[dict[str, Any]] = [{} for _ in range(world)]
        dist.all_gather_object(shapes, {m: first_item_shape(b) for m, b in media.items()})
        filled = dict(media)
        for modality in missing:
            filled[modality] = stand_in(next(s[modality] for s in shapes if modality in s), device)
        media = filled
    return {m: media[m] for m in modalities if m in media}, set(missing)
