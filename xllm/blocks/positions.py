"""Position embeddings added to a frozen encoder's tokens before a Q-Former reads them.

A CNN feature map's tokens carry no position of their own (a ViT's do), so a Q-Former over MobileNet
features cannot tell "top left" from "bottom right" without them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

PositionKind = Literal["learned", "factorised", "sincos2d"]

# Encoder tokens are LayerNorm-ed to unit scale before the positions are added; positions at BERT's usual
# 0.02 would start ~50x below the content and take thousands of steps to matter.
POSITION_INIT_STD = 0.5


def square_side(tokens: int, what: str) -> int:
    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise ValueError(f"{what} positions need a square map, got {tokens} tokens")
    return side


def sincos_2d(tokens: int, dim: int) -> torch.Tensor:
    """`[1, tokens, dim]` fixed 2-D sine-cosine positions for a square `sqrt(tokens)²` map (MAE's recipe)."""
    side = square_side(tokens, "sincos2d")
    if dim % 4:
        raise ValueError(f"sincos2d positions need dim % 4 == 0, got dim {dim}")
    quarter = dim // 4
    frequencies = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    rows, columns = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                                   indexing="ij")
    parts = []
    for grid in (rows.flatten(), columns.flatten()):
        angles = grid[:, None] * frequencies[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)[None]


class FeaturePositions(nn.Module):
    """Adds one position vector per encoder token: `forward(features [n, tokens, dim]) -> features + positions`.

    Kinds: `learned` (one vector per token, BLIP-2/ViT style); `factorised` (learned row + column vectors of a
    square map: cells of a row share their row vector, so a word like "top" has one thing to match — measured
    on the demo's task it learns position questions in fewer steps than `learned`, GPU sweep over 5 seeds);
    `sincos2d` (fixed row/column sine-cosine codes, MAE: readable from the first step, nothing to learn).
    """

    def __init__(self, tokens: int, dim: int, kind: PositionKind = "learned", std: float = POSITION_INIT_STD) -> None:
        super().__init__()
        self.kind, self.tokens = kind, tokens
        if kind == "learned":
            self.embedding = nn.Parameter(torch.randn(1, tokens, dim) * std)
        elif kind == "factorised":
            side = square_side(tokens, "factorised")
            self.rows = nn.Parameter(torch.randn(side, 1, dim) * std)
            self.columns = nn.Parameter(torch.randn(1, side, dim) * std)
        elif kind == "sincos2d":
            self.register_buffer("fixed", sincos_2d(tokens, dim), persistent=False)
        else:
            raise ValueError(f"feature_position_kind must be learned, factorised or sincos2d, got {kind!r}")

    def table(self) -> torch.Tensor:
        """`[1, tokens, dim]`."""
        if self.kind == "learned":
            return self.embedding
        if self.kind == "factorised":
            return (self.rows + self.columns).reshape(1, -1, self.rows.shape[-1])
        return self.fixed

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-2] != self.tokens:
            raise ValueError(f"feature_positions={self.tokens} but the encoder gives {features.shape[-2]} tokens")
        return features + self.table()
