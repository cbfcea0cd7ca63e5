"""Frozen encoders, loaded by local path (or hub id when the hub is reachable) through transformers.

Any transformers vision model works: a vision tower checkpoint (ViT, CLIPVisionModel, SiglipVisionModel,
Blip2VisionModel, DINOv2...) or a dual/multimodal checkpoint whose model has a `vision_model` (CLIP,
SigLIP), from which only the vision tower is kept.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def check_model_path(path: str, what: str) -> None:
    """Fail early with a useful message when a local-looking path is missing (hub ids pass through)."""
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") != 1
    if looks_local and not Path(path).expanduser().exists():
        hint = " (tiny test models: run `python -m xllm.data.tiny`)" if ".cache/tiny" in path else ""
        raise FileNotFoundError(f"{what}: no model directory at {path}{hint}")


def freeze(module: nn.Module) -> nn.Module:
    """Frozen means frozen: no gradients and eval mode (the owner keeps it out of optimizer and checkpoints)."""
    module.requires_grad_(False)
    module.eval()
    return module


class FrozenVisionEncoder(nn.Module):
    """A frozen transformers vision model; `forward(pixel_values) -> [batch, tokens, hidden]` features."""

    def __init__(self, path: str, feature_layer: int = -1, dtype: str = "float32") -> None:
        super().__init__()
        check_model_path(path, "vision encoder")
        config = AutoConfig.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=resolve_dtype(dtype))
        if hasattr(config, "vision_config") and hasattr(model, "vision_model"):
            model = model.vision_model  # keep only the vision tower of a dual model
        self.model = freeze(model)
        self.feature_layer = feature_layer
        vision_config = getattr(config, "vision_config", config)
        self.hidden_size: int = vision_config.hidden_size

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(next(self.model.parameters()).dtype)
        if self.feature_layer == -1:
            return self.model(pixel_values=pixel_values).last_hidden_state
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[self.feature_layer]
