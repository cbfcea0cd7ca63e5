"""The window Q-Former (SALMONN): a Q-Former run on fixed windows of speech-encoder frames.

Each window of `window_frames` encoder frames (SALMONN: 17 frames ≈ 0.34 s of Whisper's 50 frames/s) is read
by `queries_per_window` learned queries (SALMONN: 1) through a small Q-Former (SALMONN: 2 layers), so a clip
becomes `ceil(frames / window_frames) * queries_per_window` tokens in time order (88 per 30 s). Unlike the
C-Former's CIF, its token count follows duration, not content, and it has no alignment to output tokens:
it trains through the LLM (stage 1 onwards), with no LLM-free stage.
"""

from __future__ import annotations

import torch
from torch import nn

from xllm.blocks.projection import ProjectionKind, build_projection
from xllm.blocks.qformer import QFormer


class WindowQFormer(nn.Module):
    """`forward(features, feature_mask) -> (tokens [B, windows * queries, llm_hidden], lengths [B])`."""

    def __init__(
        self,
        encoder_hidden_size: int,
        window_frames: int = 17,
        queries_per_window: int = 1,
        hidden_size: int = 256,
        num_layers: int = 2,
        num_heads: int = 4,
        intermediate_size: int = 1024,
        dropout: float = 0.1,
        projection: ProjectionKind = "linear",
    ) -> None:
        super().__init__()
        self.window_frames, self.queries_per_window = window_frames, queries_per_window
        self.ln_features = nn.LayerNorm(encoder_hidden_size)
        # Position inside the window (SALMONN's windows are short enough to need nothing across windows:
        # the LLM's own positions order them).
        self.window_positions = nn.Parameter(torch.zeros(window_frames, encoder_hidden_size))
        self.qformer = QFormer(encoder_hidden_size, num_query_tokens=queries_per_window, hidden_size=hidden_size,
                               num_layers=num_layers, num_heads=num_heads, intermediate_size=intermediate_size,
                               cross_attention_frequency=1, dropout=dropout)
        self.projection_kind = projection
        self.projection: nn.Module | None = None

    def attach(self, llm_hidden_size: int) -> None:
        self.projection = build_projection(self.projection_kind, self.qformer.hidden_size, llm_hidden_size)

    def forward(self, features: torch.Tensor, feature_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.projection is None:
            raise RuntimeError("attach(llm_hidden_size) must be called before forward (XLLM does it)")
        batch, frames, width = features.shape
        if feature_mask is None:
            feature_mask = torch.ones((batch, frames), dtype=torch.bool, device=features.device)
        windows = -(-frames // self.window_frames)
        pad = windows * self.window_frames - frames
        hidden = nn.functional.pad(self.ln_features(features.float()), (0, 0, 0, pad))
        mask = nn.functional.pad(feature_mask.bool(), (0, pad), value=False)
        hidden = hidden.view(batch * windows, self.window_frames, width) + self.window_positions
        mask = mask.view(batch * windows, self.window_frames)
        used_windows = -(-feature_mask.sum(dim=1) // self.window_frames)
        # A window wholly in padding attends to its own zeros (never used): an all-masked row would give NaN.
        mask = mask | ~mask.any(dim=1, keepdim=True)
        queries = self.qformer(hidden, mask.long())  # [B * windows, queries, hidden]
        tokens = self.projection(queries).reshape(batch, windows * self.queries_per_window, -1)
        lengths = used_windows * self.queries_per_window
        valid = torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None]
        return tokens * valid[..., None], lengths
