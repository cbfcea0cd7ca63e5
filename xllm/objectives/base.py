"""What a stage-0 objective is: a module that binds to one interface, tokenizes its pair texts, and returns losses.

`InterfacePretrainingModule` takes any subclass (chosen in the config by `class_path`), so each kind of
bridge brings its own LLM-free objective: the Q-Former BLIP-2's ITC/ITM/ITG (`qformer.py`), a C-Former a
CIF speech-recognition loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from xllm.interfaces.base import ModalityInterface, PretrainableInterface

# Texts → padded ids and mask (the same shape as xllm.data.pairs.Tokenize, which this layer may not import).
Tokenize = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PretrainOutput:
    """`loss` (the weighted sum that trains) and `metrics`, the named parts and accuracies an objective computed
    (`itc`, `itm`, `token_ce`, ...), each logged as `<split>/<name>`."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class PretrainingObjective(nn.Module):
    """Base class of stage-0 objectives. `pair_texts`: which texts of a pair it reads (`xllm.data.pairs`),
    each tokenized once with `tokenize` and batched as `<name>_ids` / `<name>_mask`."""

    pair_texts: tuple[str, ...] = ("text", "instruction", "flipped")

    def bind(self, interface: ModalityInterface) -> None:
        """Check that `interface` is a kind this objective trains and build heads at its width."""
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids and mask of the pairs' texts and instructions, in the tokenizer this objective reads."""
        raise NotImplementedError

    def tokenizer_for(self, text: str) -> Tokenize:
        """The tokenizer of one of `pair_texts` (default: `tokenize` for all of them)."""
        return self.tokenize

    def unused_parameters(self, interface: ModalityInterface) -> list[nn.Parameter]:
        """Parameters of this objective's heads and of `interface` that none of its weighted losses reads: kept
        out of training, as the LLM stages keep `idle_modules` out (DDP requires a gradient for every trained
        parameter, and one without a gradient is dead weight in the optimizer)."""
        return []

    def forward(self, interface: PretrainableInterface, batch: dict) -> PretrainOutput:
        raise NotImplementedError
