"""The Q-Former bridge: frozen-encoder tokens -> LayerNorm -> positions -> Q-Former -> projection into the LLM.

The block an image interface composes, and a video interface next (per frame, plus time). It owns the
Q-Former's own tokenizer (BLIP-2's text side), used for instructions (InstructBLIP: the user turn's tokens
sit beside the queries) and by the stage-0 objective for captions.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoTokenizer

from xllm.interfaces.positions import FeaturePositions, PositionKind
from xllm.interfaces.projection import ProjectionKind, build_projection
from xllm.interfaces.qformer import QFormer


class QFormerBridge(nn.Module):
    """`forward(features, feature_mask, instruction_ids, instruction_mask) -> [n, num_query_tokens, llm_hidden]`.

    Args:
        encoder_hidden_size: width of the frozen encoder's tokens.
        num_query_tokens, hidden_size, num_layers, num_heads, intermediate_size, cross_attention_frequency,
        dropout, bert_init: the Q-Former (see `QFormer`).
        text_tokenizer: tokenizer directory of the Q-Former's text side (None: no text side).
        max_text_tokens: longest Q-Former text, in its own tokens.
        feature_positions: tokens per item that get a position embedding (None: none); `position_kind` its kind.
        projection: `linear` or `mlp` into the LLM width (built by `attach`).
    """

    def __init__(
        self,
        encoder_hidden_size: int,
        num_query_tokens: int = 32,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        cross_attention_frequency: int = 2,
        dropout: float = 0.1,
        bert_init: str | None = None,
        text_tokenizer: str | None = None,
        max_text_tokens: int = 64,
        feature_positions: int | None = None,
        position_kind: PositionKind = "learned",
        projection: ProjectionKind = "linear",
    ) -> None:
        super().__init__()
        self.tokenizer = AutoTokenizer.from_pretrained(text_tokenizer) if text_tokenizer else None
        self.max_text_tokens = max_text_tokens
        # BLIP-2's `ln_vision`: a trainable LayerNorm on the frozen encoder's tokens.
        self.ln_features = nn.LayerNorm(encoder_hidden_size)
        self.feature_positions = (
            FeaturePositions(feature_positions, encoder_hidden_size, position_kind) if feature_positions else None
        )
        self.qformer = QFormer(
            encoder_hidden_size=encoder_hidden_size, num_query_tokens=num_query_tokens, hidden_size=hidden_size,
            num_layers=num_layers, num_heads=num_heads, intermediate_size=intermediate_size,
            cross_attention_frequency=cross_attention_frequency, dropout=dropout, bert_init=bert_init,
            text_vocab_size=len(self.tokenizer) if self.tokenizer is not None else None,
            max_text_positions=max_text_tokens,
        )
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

    def queries(
        self,
        encoder_features: torch.Tensor,
        feature_mask: torch.Tensor | None = None,
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Q-Former outputs at the query positions, `[n, num_query_tokens, hidden_size]`."""
        return self.qformer(self.features(encoder_features), feature_mask, instruction_ids, instruction_mask)

    def forward(
        self,
        encoder_features: torch.Tensor,
        feature_mask: torch.Tensor | None = None,
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.projection is None:
            raise RuntimeError("attach(llm_hidden_size) must be called before forward (XLLM does it)")
        return self.projection(self.queries(encoder_features, feature_mask, instruction_ids, instruction_mask))
