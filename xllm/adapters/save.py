"""Saving an adapter directory: the format's files and the model card (`XLLM.save_pretrained`, stage 0)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from xllm.adapters.card import write_model_card
from xllm.adapters.format import CONFIG_NAME, FORMAT, WEIGHTS_NAME, config_for
from xllm.interfaces.base import ModalityInterface


def write_checkpoint(
    directory: str | Path,
    tensors: Mapping[str, torch.Tensor],
    interfaces: Mapping[str, ModalityInterface],
    stage: int | None = None,
    llm: Mapping[str, Any] | None = None,
    trained_on: str | None = None,
) -> Path:
    """Write an adapter directory (see `xllm.adapters.format`): `adapter.safetensors` with `tensors` (the trainable
    ones, named as inside an `XLLM`), `config.json` (`config_for`'s arguments), the files interfaces need, and
    the model card."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if not tensors:
        raise ValueError("nothing trainable to save")
    config = config_for(directory, interfaces, stage, llm, trained_on)
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": FORMAT})
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False))
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
