"""Q-Former: learned query tokens that read a frozen encoder's features through cross-attention.

Built on transformers' `Blip2QFormerModel` (SDPA attention) rather than a copy of BERT. Optionally the
self-attention and FFN weights start from a BERT checkpoint, as BLIP-2 initialises from bert-base; the
cross-attention layers are new either way.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel


class QFormer(nn.Module):
    """Query tokens + Blip2QFormerModel. `forward(features) -> [batch, num_query_tokens, hidden_size]`."""

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
    ) -> None:
        super().__init__()
        self.config = Blip2QFormerConfig(
            vocab_size=2,  # the Q-Former here owns no word embeddings; text enters as embeddings
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            cross_attention_frequency=cross_attention_frequency,
            encoder_hidden_size=encoder_hidden_size,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            use_qformer_text_input=False,
        )
        self.config._attn_implementation = "sdpa"
        self.model = Blip2QFormerModel(self.config)
        # BLIP-2 draws query tokens from N(0, 0.02).
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, hidden_size) * 0.02)
        if bert_init is not None:
            load_bert_into_qformer(self.model, bert_init)

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.query_tokens.shape[2]

    def forward(self, features: torch.Tensor, feature_mask: torch.Tensor | None = None) -> torch.Tensor:
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        out = self.model(
            query_embeds=queries,
            encoder_hidden_states=features,
            encoder_attention_mask=feature_mask,
        )
        return out.last_hidden_state


# BERT name -> Q-Former name, per layer. The query FFN (`*_query`) starts from BERT's FFN, as in BLIP-2.
_BERT_LAYER_MAP = [
    (r"attention\.self\.(query|key|value)\.(weight|bias)", r"attention.attention.\1.\2"),
    (r"attention\.output\.(dense|LayerNorm)\.(weight|bias)", r"attention.output.\1.\2"),
    (r"intermediate\.dense\.(weight|bias)", r"intermediate_query.dense.\1"),
    (r"output\.(dense|LayerNorm)\.(weight|bias)", r"output_query.\1.\2"),
]


def bert_to_qformer_state_dict(bert_state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Map BERT tensors onto Q-Former names (self-attention, FFN, embedding LayerNorm). Pure function."""
    mapped: dict[str, torch.Tensor] = {}
    for name, tensor in bert_state.items():
        name = name.removeprefix("bert.")
        if name in ("embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"):
            mapped["layernorm." + name.rsplit(".", 1)[1]] = tensor
            continue
        match = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", name)
        if not match or int(match.group(1)) >= num_layers:
            continue
        layer, rest = match.groups()
        for pattern, target in _BERT_LAYER_MAP:
            if re.fullmatch(pattern, rest):
                mapped[f"encoder.layer.{layer}." + re.sub(pattern, target, rest)] = tensor
                break
    return mapped


def load_bert_into_qformer(qformer: Blip2QFormerModel, bert_path: str | Path) -> list[str]:
    """Copy a local BERT checkpoint's self-attention/FFN/LayerNorm weights into `qformer`.

    Returns the Q-Former keys that were initialised. Raises if shapes disagree or nothing matched.
    """
    from transformers import AutoModel

    path = Path(bert_path)
    if not path.exists():
        raise FileNotFoundError(f"bert_init: no BERT checkpoint directory at {path}")
    bert = AutoModel.from_pretrained(str(path))
    bert_layers = getattr(bert.config, "num_hidden_layers", 0)
    if bert_layers < qformer.config.num_hidden_layers:
        raise ValueError(
            f"bert_init: {path} has {bert_layers} layers but the Q-Former has {qformer.config.num_hidden_layers}"
        )
    mapped = bert_to_qformer_state_dict(bert.state_dict(), qformer.config.num_hidden_layers)
    own = qformer.state_dict()
    for key, tensor in mapped.items():
        if key not in own:
            raise KeyError(f"bert_init: mapped key {key} is not a Q-Former parameter")
        if own[key].shape != tensor.shape:
            raise ValueError(
                f"bert_init: {key} has shape {tuple(tensor.shape)} in {path} but {tuple(own[key].shape)} in the "
                "Q-Former (hidden_size, intermediate_size and num_heads must match the BERT checkpoint)"
            )
    if not mapped:
        raise ValueError(f"bert_init: no BERT encoder weights found in {path}")
    qformer.load_state_dict(mapped, strict=False)
    return sorted(mapped)
