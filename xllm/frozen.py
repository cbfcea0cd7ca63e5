"""Loading and freezing pretrained parts (the LLM, encoders): dtypes, early path checks, frozen train modes.

The lowest layer of xllm: `llm.py` and the interfaces' encoders both use it, and it imports nothing of xllm.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def check_model_path(path: str, what: str) -> None:
    """Fail early with a useful message when a local-looking path is missing (hub ids pass through)."""
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") != 1
    if looks_local and not Path(path).expanduser().exists():
        raise FileNotFoundError(f"{what}: no model directory at {path}")


def safetensors_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a transformers checkpoint directory: its index's shards, or `model.safetensors`."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / shard for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise FileNotFoundError(f"{folder}: no model.safetensors (or its index) in this directory")


def freeze(module: nn.Module) -> nn.Module:
    """Frozen means frozen: no gradients and eval mode (the owner keeps it out of optimizer and checkpoints)."""
    module.requires_grad_(False)
    module.eval()
    return module


def keep_frozen_in_eval(root: nn.Module, frozen: Iterable[nn.Module], mode: bool) -> None:
    """After `root.train(mode)`: frozen parts go back to eval (no dropout), except LoRA's own dropout,
    which sits inside the frozen LLM but belongs to the trained LoRA matrices."""
    for module in frozen:
        module.eval()
    for name, module in root.named_modules():
        if "lora_dropout" in name:
            module.train(mode)
