"""A modality as a user's own package adds one: depth maps (`.npy` arrays), in this one file.

`tests/test_toy_modality.py` installs it the way a package is installed (a module and its `.dist-info` with an
`xllm.interfaces` entry point), trains it at stage 2 from `depth_stage2.yaml`, reloads the adapter in a fresh
process, chats and serves it, with no change to xllm.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xllm.interfaces.base import MediaBatch, ModalityInterface, ModalityTokens


class DepthInterface(ModalityInterface):
    """A depth map becomes `grid * grid` LLM tokens: its cells' mean depths, embedded with their positions.

    Args:
        grid: cells per side the map is pooled to (tokens per map: grid squared).
        hidden_size: width of a cell's embedding before the projection into the LLM.
    """

    modality = "depth"
    content_parts = ("depth_url",)  # {"type": "depth_url", "depth_url": {"url": "data:depth/npy;base64,..."}}

    def __init__(self, grid: int = 2, hidden_size: int = 16) -> None:
        super().__init__()
        self.grid = grid
        self.embed = nn.Linear(1, hidden_size)
        self.positions = nn.Parameter(torch.randn(grid * grid, hidden_size) * 0.1)
        self.projection: nn.Module | None = None

    @property
    def max_tokens(self) -> int:
        return self.grid * self.grid

    def attach(self, llm_hidden_size: int) -> None:
        self.projection = nn.Linear(self.positions.shape[1], llm_hidden_size)

    def load_media(self, path: str) -> torch.Tensor:
        try:
            depth = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read depth map {path}: {err}") from err
        if depth.ndim != 2 or min(depth.shape) < self.grid:
            raise ValueError(f"{path}: a depth map is a 2-D array of at least {self.grid}x{self.grid}, got {depth.shape}")
        cells = F.adaptive_avg_pool2d(torch.from_numpy(depth).float()[None, None], self.grid)
        return cells.flatten()[:, None]  # [grid * grid, 1]

    def forward(self, media: MediaBatch) -> ModalityTokens:
        hidden = torch.tanh(self.embed(media.values["values"]) + self.positions)
        return ModalityTokens.fixed(self.projection(hidden))
