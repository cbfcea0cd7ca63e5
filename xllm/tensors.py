"""Tensor conventions every layer shares (the lowest layer with `frozen.py`: it imports nothing of xllm)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100  # a label the loss skips: torch's cross_entropy default, and transformers' causal-LM loss

def pad_stack(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack tensors that may differ along their first axis: zero-padded batch and lengths (None if all equal)."""
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(list(tensors)), None
    if any(t.shape[1:] != tensors[0].shape[1:] for t in tensors):
        raise ValueError(f"items differ beyond their first axis: {sorted({tuple(t.shape) for t in tensors})}")
    lengths = torch.tensor([t.shape[0] for t in tensors], dtype=torch.long)
    out = tensors[0].new_zeros((len(tensors), int(lengths.max()), *tensors[0].shape[1:]))
    for row, tensor in enumerate(tensors):
        out[row, : tensor.shape[0]] = tensor
    return out, lengths


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a parameter FSDP2 has sharded across ranks (a DTensor)."""
    return type(tensor).__name__ == "DTensor"

