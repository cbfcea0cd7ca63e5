"""Saving an adapter directory: the format's files and the model card (`XLLM.save_pretrained`, stage 0)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from xllm.adapters.card import write_model_card
from xllm.adapters.format import write_adapter_files
from xllm.interfaces.base import ModalityInterface


def write_checkpoint(
    directory: str | Path,
    tensors: Mapping[str, torch.Tensor],
    interfaces: Mapping[str, ModalityInterface],
    stage: int | None = None,
    llm: Mapping[str, Any] | None = None,
    trained_on: str | None = None,
) -> Path:
    """An adapter directory (see `xllm.adapters.format`) with its model card; arguments as `write_adapter_files`."""
    directory = write_adapter_files(directory, tensors, interfaces, stage, llm, trained_on)
    write_model_card(directory)
    return directory


def save_interface_checkpoint(interfaces: Mapping[str, ModalityInterface], directory: str | Path, stage: int = 0,
                              trained_on: str | None = None) -> Path:
    """Stage 0's output: the interfaces' trainable tensors, named as inside an `XLLM`, and their config."""
    tensors = {
        f"interfaces.{name}.{key}": p
        for name, interface in interfaces.items()
        for key, p in interface.named_parameters()
        if p.requires_grad
    }
    return write_checkpoint(directory, tensors, interfaces, stage, trained_on=trained_on)
