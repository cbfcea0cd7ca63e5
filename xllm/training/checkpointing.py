"""Activation checkpointing of frozen blocks: a block keeps only its input for the backward and runs again there.

Through a long multimodal sequence the frozen LLM's layers keep most of a step's activations for the backward (the
gradient flows through them to the spliced media tokens). Checkpointed, each decoder layer keeps its input only and
is recomputed in the backward (`torch.utils.checkpoint`, non-reentrant: it works inside FSDP2 units and with LoRA's
layers inside a block): the same numbers for about one more forward per step.

Hand-written in a few lines because the library ways do not fit a frozen model: transformers' own
`gradient_checkpointing_enable` acts only in train mode, and the frozen LLM stays in eval mode; wrapping each block
(`checkpoint_wrapper`) renames every parameter inside it, LoRA's trained ones included, so adapters and checkpoints
would change keys. Here the block's `forward` is replaced on the instance: names stay, FSDP2's hooks around the call
stay.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> int:
    """Checkpoint each block's forward while gradients are on (a no-grad forward, e.g. generation, runs as before).
    Returns how many blocks were switched (a block already switched is left as it is)."""
    switched = 0
    for block in blocks:
        if getattr(block, "forward_before_checkpointing", None) is not None:
            continue
        forward = block.forward

        def checkpointed(*args: Any, _forward: Any = forward, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward_before_checkpointing = forward
        block.forward = checkpointed
        switched += 1
    return switched
