"""The Q-Former bridge: frozen-encoder tokens -> LayerNorm -> positions -> Q-Former -> projection into the LLM.

The block an image interface composes, and a video interface next (per frame, plus time). It owns the
Q-Former's own tokenizer (BLIP-2's text side), used for instructions (InstructBLIP: the user turn's tokens
sit beside the queries) and by the stage-0 objective for captions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
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
        stop_head: a head on each query's output that says whether the item's answer has ended: an item then gives
            its tokens up to the first one marked so (`lengths`), not all of them. Stage 0's spelling loss
            (`QFormerObjective(spell_weight=...)`) trains it, each token spelling one token of a text.
        tokens_per_query: LLM tokens each query becomes (the projection's output split in that many): a long answer
            for a fraction of the queries' cost, which grows with their number (see `QFormerSettings`).
    """

    def __init__(
        self,
        qformer: QFormer,
        tokenizer: PreTrainedTokenizerBase | None = None,
        max_text_tokens: int = 64,
        feature_positions: int | None = None,
        position_kind: PositionKind = "learned",
        projection: ProjectionKind = "linear",
        stop_head: bool = False,
        tokens_per_query: int = 1,
    ) -> None:
        super().__init__()
        if tokens_per_query < 1:
            raise ValueError(f"tokens_per_query must be at least 1, got {tokens_per_query}")
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
        self.tokens_per_query = tokens_per_query
        self.stop_head = nn.Linear(qformer.hidden_size, tokens_per_query) if stop_head else None

    @property
    def num_query_tokens(self) -> int:
        return self.qformer.num_query_tokens

    @property
    def max_tokens(self) -> int:
        """LLM tokens one item gives at most: its queries times `tokens_per_query`."""
        return self.qformer.num_query_tokens * self.tokens_per_query

    def attach(self, llm_hidden_size: int) -> None:
        self.projection = build_projection(self.projection_kind, self.qformer.hidden_size,
                                           llm_hidden_size * self.tokens_per_query)

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
            raise RuntimeError("this Q-Former has no text side (qformer: {text: false})")
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
        """The Q-Former's query outputs `[n, num_query_tokens, qformer_hidden]` (before the projection)."""
        return self.qformer(self.features(encoder_features), feature_mask, instruction_ids, instruction_mask)

    def project(self, queries: torch.Tensor) -> torch.Tensor:
        """`[n, queries, hidden] -> [n, queries * tokens_per_query, llm_hidden]`, each query's tokens in order."""
        if self.projection is None:
            raise RuntimeError("attach(llm_hidden_size) must be called before forward (XLLM does it)")
        projected = self.projection(queries)
        return projected.reshape(projected.shape[0], -1, projected.shape[-1] // self.tokens_per_query)

    def stop_logits(self, queries: torch.Tensor) -> torch.Tensor:
        """`[n, queries * tokens_per_query]`: per token, whether the item's answer has ended before it (> 0)."""
        if self.stop_head is None:
            raise RuntimeError("this bridge has no stop head (qformer: {stop_head: true})")
        return self.stop_head(queries).flatten(1)

    @torch.no_grad()
    def lengths(self, queries: torch.Tensor) -> torch.Tensor:
        """`[n]` how many tokens each item gives: with a stop head, its tokens before the first that the head marks
        as past the end (at least one); without, all of them."""
        count = torch.full(queries.shape[:1], self.max_tokens, dtype=torch.long, device=queries.device)
        if self.stop_head is None:
            return count
        stops = self.stop_logits(queries) > 0
        stops[:, 0] = False
        return torch.where(stops.any(dim=1), stops.float().argmax(dim=1), count)

    def forward(
        self,
        encoder_features: torch.Tensor,
        feature_mask: torch.Tensor | None = None,
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`[n, num_query_tokens, llm_hidden]`: every query, projected into the LLM."""
        return self.project(self.queries(encoder_features, feature_mask, instruction_ids, instruction_mask))

    def tokens(
        self,
        encoder_features: torch.Tensor,
        feature_mask: torch.Tensor | None = None,
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(forward's tokens, [n] lengths)`: how many of them each item gives (all of them without a stop head)."""
        queries = self.queries(encoder_features, feature_mask, instruction_ids, instruction_mask)
        return self.project(queries), self.lengths(queries)


@dataclass
class QFormerSettings:
    """A Q-Former's shape, start and text side: one set of settings for the image and video interfaces (YAML:
    `qformer: {num_query_tokens: 4, hidden_size: 384, ...}`).

    Args:
        num_query_tokens: learned queries, i.e. LLM tokens per item (BLIP-2: 32).
        hidden_size: Q-Former width (BLIP-2: 768, bert-base).
        layers: Q-Former depth (BLIP-2: 12).
        heads: attention heads.
        intermediate_size: FFN width.
        cross_attention_frequency: a cross-attention layer every N layers (BLIP-2: 2).
        cross_attention_init_std: the spread of the new cross-attention weights at the start (None: transformers'
            0.02). The demos use 0.08: with 0.02 their LLM-free stage 0 sat near chance for its first ~400 steps.
        bert_init: optional local BERT checkpoint whose self-attention and FFN weights start the Q-Former.
        dropout: Q-Former dropout.
        text: give the Q-Former BLIP-2's text side (needed for LLM-free pretraining and instruction-aware queries);
            its tokenizer is `text_tokenizer` (default: `bert_init`).
        instruction_aware: the text of the user turn holding each item joins the queries (InstructBLIP).
        text_tokenizer: tokenizer directory for the Q-Former's text side.
        max_text_tokens: longest Q-Former text (instruction or caption), in its own tokens.
        text_embeddings: safetensors file with the text side's frozen word and position tables (an adapter writes
            its own, so it loads without the `bert_init` checkpoint).
        stop_head: answers of different lengths: an item gives its tokens up to the first that a stop head marks
            as past the end (see `QFormerBridge`; stage 0's spelling loss trains it).
        tokens_per_query: LLM tokens each query becomes. The queries' cost grows with their number (a stage-0 step
            of the image demo took 1.9x as long with 24 queries as with 4 or 8), so 8 queries of 3 tokens spell a
            24-token description for about the price of 4 queries.
    """

    num_query_tokens: int = 32
    hidden_size: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    cross_attention_init_std: float | None = None
    bert_init: str | None = None
    dropout: float = 0.1
    text: bool = False
    instruction_aware: bool = False
    text_tokenizer: str | None = None
    max_text_tokens: int = 64
    text_embeddings: str | None = None
    stop_head: bool = False
    tokens_per_query: int = 1

    @classmethod
    def of(cls, value: QFormerSettings | Mapping[str, Any] | None) -> QFormerSettings:
        """Settings from themselves, a dict (a config read back from JSON) or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown Q-Former settings {unknown}; known: {[f.name for f in fields(cls)]}")
        return cls(**value)


# Q-Former settings as version-2 adapters wrote them, flat among an interface's arguments -> their name now.
FLAT_QFORMER_ARGS = {
    "num_query_tokens": "num_query_tokens", "qformer_hidden_size": "hidden_size", "qformer_layers": "layers",
    "qformer_heads": "heads", "qformer_intermediate_size": "intermediate_size",
    "cross_attention_frequency": "cross_attention_frequency", "cross_attention_init_std": "cross_attention_init_std",
    "bert_init": "bert_init", "dropout": "dropout", "qformer_text": "text", "instruction_aware": "instruction_aware",
    "text_tokenizer": "text_tokenizer", "max_text_tokens": "max_text_tokens", "text_embeddings": "text_embeddings",
}


def build_qformer(encoder_hidden_size: int, settings: QFormerSettings,
                  ) -> tuple[QFormer, PreTrainedTokenizerBase | None]:
    """The Q-Former (and its own tokenizer, with a text side) from its settings, checked together."""
    if settings.instruction_aware and not settings.text:
        raise ValueError("instruction_aware needs the Q-Former text side: set qformer: {text: true}")
    if settings.text and not (settings.text_tokenizer or settings.bert_init):
        raise ValueError("the Q-Former text side needs a tokenizer: set qformer: {text_tokenizer: ...} (or bert_init)")
    tokenizer = AutoTokenizer.from_pretrained(settings.text_tokenizer or settings.bert_init) if settings.text else None
    qformer = QFormer(
        encoder_hidden_size, num_query_tokens=settings.num_query_tokens, hidden_size=settings.hidden_size,
        num_layers=settings.layers, num_heads=settings.heads, intermediate_size=settings.intermediate_size,
        cross_attention_frequency=settings.cross_attention_frequency, dropout=settings.dropout,
        bert_init=settings.bert_init, text_vocab_size=len(tokenizer) if tokenizer is not None else None,
        max_text_positions=settings.max_text_tokens, text_embeddings=settings.text_embeddings,
        cross_attention_init_std=settings.cross_attention_init_std,
    )
    return qformer, tokenizer


def write_text_side(bridge: QFormerBridge, folder: Path, settings: dict[str, Any]) -> None:
    """Into a checkpoint: what the Q-Former's text side reads from outside — its tokenizer, and the frozen word
    tables when BERT gave them — so the interface reloads without `bert_init`; `settings` (the Q-Former settings
    as a dict) then point there."""
    settings["bert_init"] = None  # the trained weights replace BERT's initialisation
    if bridge.tokenizer is None:
        return
    bridge.tokenizer.save_pretrained(str(folder))
    settings["text_tokenizer"] = str(folder)
    if bridge.frozen_modules():
        bridge.qformer.save_text_embeddings(folder / "embeddings.safetensors")
        settings["text_embeddings"] = str(folder / "embeddings.safetensors")
