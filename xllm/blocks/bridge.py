"""The Q-Former bridge: frozen-encoder tokens -> LayerNorm -> positions -> Q-Former -> projection into the LLM.

The block an image interface composes, and a video interface next (per frame, plus time). It owns the
Q-Former's own tokenizer (BLIP-2's text side), used for instructions (InstructBLIP: the user turn's tokens
sit beside the queries) and by the stage-0 objective for captions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from xllm.blocks.positions import FeaturePositions, PositionKind
from xllm.blocks.projection import ProjectionKind, build_projection
from xllm.blocks.qformer import QFormer


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


def build_qformer(
    encoder_hidden_size: int, *, num_query_tokens: int, qformer_hidden_size: int, qformer_layers: int,
    qformer_heads: int, qformer_intermediate_size: int, cross_attention_frequency: int, dropout: float,
    bert_init: str | None, qformer_text: bool, instruction_aware: bool, text_tokenizer: str | None,
    max_text_tokens: int, text_embeddings: str | None, cross_attention_init_std: float | None = None,
) -> tuple[QFormer, PreTrainedTokenizerBase | None]:
    """The Q-Former (and its own tokenizer, with a text side) from an interface's settings, as the image and video
    interfaces name them; the settings are checked together."""
    if instruction_aware and not qformer_text:
        raise ValueError("instruction_aware needs the Q-Former text side: set qformer_text: true")
    if qformer_text and not (text_tokenizer or bert_init):
        raise ValueError("qformer_text needs a tokenizer: set text_tokenizer (or bert_init)")
    tokenizer = AutoTokenizer.from_pretrained(text_tokenizer or bert_init) if qformer_text else None
    qformer = QFormer(
        encoder_hidden_size, num_query_tokens=num_query_tokens, hidden_size=qformer_hidden_size,
        num_layers=qformer_layers, num_heads=qformer_heads, intermediate_size=qformer_intermediate_size,
        cross_attention_frequency=cross_attention_frequency, dropout=dropout, bert_init=bert_init,
        text_vocab_size=len(tokenizer) if tokenizer is not None else None, max_text_positions=max_text_tokens,
        text_embeddings=text_embeddings, cross_attention_init_std=cross_attention_init_std,
    )
    return qformer, tokenizer


def write_text_side(bridge: QFormerBridge, folder: Path, init_args: dict[str, Any]) -> None:
    """Into a checkpoint: what the Q-Former's text side reads from outside — its tokenizer, and the frozen word
    tables when BERT gave them — so the interface reloads without `bert_init`; `init_args` then point there."""
    init_args["bert_init"] = None  # the trained weights replace BERT's initialisation
    if bridge.tokenizer is None:
        return
    bridge.tokenizer.save_pretrained(str(folder))
    init_args["text_tokenizer"] = str(folder)
    if bridge.frozen_modules():
        bridge.qformer.save_text_embeddings(folder / "embeddings.safetensors")
        init_args["text_embeddings"] = str(folder / "embeddings.safetensors")
