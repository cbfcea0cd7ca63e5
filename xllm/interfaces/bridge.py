"""The Q-Former bridge: frozen-encoder tokens -> LayerNorm -> positions -> Q-Former -> projection into the LLM.

The block an image interface composes, and a video interface next (per frame, plus time). It owns the
Q-Former's own tokenizer (BLIP-2's text side), used for instructions (InstructBLIP: the user turn's tokens
sit beside the queries) and by the stage-0 objective for captions.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from xllm.interfaces.positions import FeaturePositions, PositionKind
from xllm.interfaces.projection import ProjectionKind, build_projection
from xllm.interfaces.qformer import QFormer


class QFormerBridge(nn.Module):
    """`forward(features, feature_mask, instruction_ids, instruction_mask) -> [n, num_query_tokens, llm_hidden]`.

    Args:
        qformer: the Q-Former (with a text side when `tokenizer` is given).
        tokenizer: the Q-Former's own tokenizer (BLIP-2's text side), or None.
        max_text_tokens: longest Q-Former text, in its own tokens.
        feature_positions: tokens per item that get a position embedding (None: none); `position_kind` its kind.
        projection: `linear` or `mlp` into the LLM width (built by `attach`).
    """

    def __init__(
        self,
        qformer: QFormer,
        tokenizer: PreTrainedTokenizerBase | None = None,
        max_text_tokens: int = 64,
        feature_positions: int | None = None,
        position_kind: PositionKind = "learned",
        projection: ProjectionKind = "linear",
    ) -> None:
        super().__init__()
        if (tokenizer is not None) != qformer.has_text:
            raise ValueError("a Q-Former text side and its tokenizer go together")
        self.tokenizer, self.max_text_tokens = tokenizer, max_text_tokens
        encoder_hidden_size = qformer.config.encoder_hidden_size
        # BLIP-2's `ln_vision`: a trainable LayerNorm on the frozen encoder's tokens.
        self.ln_features = nn.LayerNorm(encoder_hidden_size)
        self.feature_positions = (
            FeaturePositions(feature_positions, encoder_hidden_size, position_kind) if feature_positions else None
        )
        self.qformer = qformer
        self.projection_kind = projection
        self.projection: nn.Module | None = None

    @property
    def num_query_tokens(self) -> int:
        return self.qformer.num_query_tokens

    def attach(self, llm_hidden_size: int) -> None:
        self.projection = build_projection(self.projection_kind, self.qformer.hidden_size, llm_hidden_size)

    def frozen_modules(self) -> list[nn.Module]:
        embeddings = self.qformer.embeddings
        if embeddings is not None and not any(p.requires_grad for p in embeddings.parameters()):
            return [embeddings]  # BERT's word/position tables, read from bert_init at load time
        return []

    # --- text ----------------------------------------------------------------------------------------
    def tokenize_one(self, text: str) -> list[int]:
        """Ids of one text in the Q-Former's own tokenizer (truncated to `max_text_tokens`)."""
        return self.tokenize([text])[0][0].tolist()

    def tokenize(self, texts: list[str], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids and mask of `texts` in the Q-Former's own tokenizer."""
        if self.tokenizer is None:
            raise RuntimeError("this Q-Former has no text side (qformer_text: false)")
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_text_tokens,
                                 return_tensors="pt")
        return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)

    # --- compute -------------------------------------------------------------------------------------
    def features(self, encoder_features: torch.Tensor) -> torch.Tensor:
        """What the Q-Former cross-attends to: normalised frozen-encoder tokens (+ positions)."""
        features = self.ln_features(encoder_features.float())
        return self.feature_positions(features) if self.feature_positions is not None else features

    def forward(
        self,
        encoder_features: torch.Tensor,
        feature_mask: torch.Tensor | None = None,
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.projection is None:
            raise RuntimeError("attach(llm_hidden_size) must be called before forward (XLLM does it)")
        queries = self.qformer(self.features(encoder_features), feature_mask, instruction_ids, instruction_mask)
        return self.projection(queries)
