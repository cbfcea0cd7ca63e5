"""Projection from an interface's width into the LLM's embedding space: BLIP-2's Linear or LLaVA-1.5's 2-layer MLP."""

from __future__ import annotations

from typing import Literal

from torch import nn

ProjectionKind = Literal["linear", "mlp"]


def build_projection(kind: ProjectionKind, in_features: int, out_features: int) -> nn.Module:
    """`linear`: one Linear (BLIP-2 `llm_proj`); `mlp`: Linear-GELU-Linear (LLaVA-1.5 `mm_projector`)."""
    if kind == "linear":
        return nn.Linear(in_features, out_features)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features))
    raise ValueError(f"projection must be 'linear' or 'mlp', got {kind!r}")
