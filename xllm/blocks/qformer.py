"""Q-Former: learned query tokens that read a frozen encoder's features through cross-attention.

Built on transformers' `Blip2QFormerModel` (SDPA attention) rather than a copy of BERT. As in BLIP-2, an
optional *text side* runs text tokens through the same layers beside the queries: self-attention is
shared, only queries cross-attend to the image, and queries and text have their own FFNs. The text side
serves the LLM-free pretraining losses (ITC/ITM/ITG, `xllm/pretraining/qformer.py`) and instruction-aware
queries (InstructBLIP: the instruction's tokens sit beside the queries, so the queries read what the
question asks about).

Initialisation from a BERT checkpoint copies self-attention, both FFNs, the embedding LayerNorm and the
word/position embeddings; cross-attention is new either way. BERT's word and position embedding tables
stay frozen (they come from the BERT checkpoint at load time, which keeps adapters small).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

TEXT_TABLES = ("word_embeddings.weight", "position_embeddings.weight")


class QFormer(nn.Module):
    """Query tokens + Blip2QFormerModel (+ optional text side).

    `forward(features) -> [batch, num_query_tokens, hidden_size]`; with `instruction_ids`, the
    instruction tokens join the queries in self-attention (the output is still the query positions).
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
        text_vocab_size: int | None = None,
        max_text_positions: int = 512,
        text_embeddings: str | None = None,
        cross_attention_init_std: float | None = None,
    ) -> None:
        super().__init__()
        self.config = Blip2QFormerConfig(
            vocab_size=text_vocab_size or 2,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
            cross_attention_frequency=cross_attention_frequency,
            encoder_hidden_size=encoder_hidden_size,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            max_position_embeddings=max_text_positions,
            use_qformer_text_input=text_vocab_size is not None,
        )
        self.config._attn_implementation = "sdpa"
        self.model = Blip2QFormerModel(self.config)
        if cross_attention_init_std is not None:
            # transformers draws every weight from N(0, 0.02). The cross-attention, which no BERT checkpoint starts,
            # then spreads each query almost evenly over the features and adds little to it: both demos'
            # question-aware matching sat near chance for ~400 steps that way, and learned from the first steps with
            # 0.08 (README).
            for name, weight in self.model.named_parameters():
                if ".crossattention." in name and name.endswith(".weight") and "LayerNorm" not in name:
                    nn.init.normal_(weight, std=cross_attention_init_std)
        # BLIP-2 draws query tokens from N(0, 0.02).
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, hidden_size) * 0.02)
        self.embeddings: Blip2TextEmbeddings | None = None
        if text_vocab_size is not None:
            self.embeddings = Blip2TextEmbeddings(self.config)
            nn.init.normal_(self.embeddings.word_embeddings.weight, std=0.02)
            nn.init.normal_(self.embeddings.position_embeddings.weight, std=0.02)
        if bert_init is not None:
            load_bert_into_qformer(self, bert_init)
        if text_embeddings is not None:
            self.load_text_embeddings(text_embeddings)
        if self.embeddings is not None and (bert_init is not None or text_embeddings is not None):
            # Frozen only when they come from a file that a later load can read again (an adapter writes them
            # out, see `save_text_embeddings`); random tables must train (and so be saved with the adapter).
            self.embeddings.requires_grad_(False)

    def save_text_embeddings(self, path: Path) -> None:
        """The text side's word and position tables as one safetensors file (read back by `text_embeddings`)."""
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.embeddings.state_dict().items()
                   if k in TEXT_TABLES}, str(path))

    def load_text_embeddings(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        if self.embeddings is None:
            raise ValueError("text_embeddings given, but this Q-Former has no text side (qformer_text: false)")
        tables = load_file(str(path))
        own = self.embeddings.state_dict()
        for key in TEXT_TABLES:
            if key not in tables or tables[key].shape != own[key].shape:
                found = tuple(tables[key].shape) if key in tables else "nothing"
                raise ValueError(f"text_embeddings {path}: {key} should have shape {tuple(own[key].shape)} "
                                 f"(the Q-Former's tokenizer and max_text_tokens), found {found}")
        self.embeddings.load_state_dict({k: tables[k] for k in TEXT_TABLES}, strict=False)

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.query_tokens.shape[2]

    @property
    def has_text(self) -> bool:
        return self.embeddings is not None

    def _text_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.embeddings is None:
            raise RuntimeError("this Q-Former has no text side (set text_vocab_size / qformer_text: true)")
        return self.embeddings(input_ids=input_ids)

    def forward(
        self,
        features: torch.Tensor,
        feature_mask: torch.Tensor | None = None,
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        if instruction_ids is None:
            out = self.model(query_embeds=queries, encoder_hidden_states=features, encoder_attention_mask=feature_mask)
            return out.last_hidden_state
        embeds = torch.cat([queries, self._text_embeds(instruction_ids).to(queries.dtype)], dim=1)
        query_mask = torch.ones(queries.shape[:2], dtype=instruction_mask.dtype, device=instruction_mask.device)
        with text_output_skipped(self.model.encoder.layer[-1]):
            out = self.model(
                query_embeds=embeds, query_length=self.num_query_tokens,
                attention_mask=torch.cat([query_mask, instruction_mask], dim=1),
                encoder_hidden_states=features, encoder_attention_mask=feature_mask,
            )
        return out.last_hidden_state[:, : self.num_query_tokens]

    def text_only_modules(self, instruction_aware: bool) -> list[nn.Module]:
        """What `forward` never runs: the text FFNs (and text tables) that only stage-0 text losses read. With
        instructions, only the last layer's text FFN (its text outputs are skipped); without, the whole text side."""
        if not self.has_text:
            return []
        layers = self.model.encoder.layer
        if instruction_aware:
            return [layers[-1].intermediate, layers[-1].output]
        return [self.embeddings, *[m for layer in layers for m in (layer.intermediate, layer.output)]]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text alone through the text side (no queries, no image): `[batch, tokens, hidden]`."""
        out = self.model(query_embeds=self._text_embeds(input_ids), query_length=0, attention_mask=attention_mask)
        return out.last_hidden_state

    def joint(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        causal_text: bool = False,
        feature_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and text together; returns (query outputs, text outputs).

        `causal_text=False` (ITM): everything attends to everything. `causal_text=True` (ITG): text sees
        all queries and earlier text; queries never see text.
        """
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        text = self._text_embeds(input_ids).to(queries.dtype)
        embeds = torch.cat([queries, text], dim=1)
        n_query = self.num_query_tokens
        if causal_text:
            mask = itg_attention_mask(attention_mask, n_query, dtype=embeds.dtype)
        else:
            query_mask = torch.ones(queries.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
            mask = torch.cat([query_mask, attention_mask], dim=1)
        out = self.model(query_embeds=embeds, query_length=n_query, attention_mask=mask, encoder_hidden_states=features,
                         encoder_attention_mask=feature_mask)
        hidden = out.last_hidden_state
        return hidden[:, :n_query], hidden[:, n_query:]


@contextmanager
def text_output_skipped(layer: nn.Module) -> Iterator[None]:
    """Within the block, `layer` (a `Blip2QFormerLayer`) skips its text FFN and passes the text positions through.

    For the last layer of an instruction-aware forward: only the query positions are returned, and nothing
    reads that layer's text outputs, yet transformers runs its text FFN anyway. With a question of ~14 tokens
    beside 4 queries that FFN was ~40% of a 1-layer Q-Former's compute (measured: stage-0 steps 1.5x faster);
    the query outputs are unchanged (tested against the full layer)."""
    layer.feed_forward_chunk = _identity  # an instance attribute shadows the method for this call only
    try:
        yield
    finally:
        del layer.feed_forward_chunk


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def itg_attention_mask(text_mask: torch.Tensor, n_query: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive `[batch, 1, Q+T, Q+T]` mask for image-grounded text generation (BLIP-2's ITG).

    Queries attend to queries only; text token i attends to all queries and text tokens ≤ i (not padding).
    """
    batch, text_len = text_mask.shape
    total = n_query + text_len
    allowed = torch.zeros((total, total), dtype=torch.bool, device=text_mask.device)
    allowed[:n_query, :n_query] = True
    allowed[n_query:, :n_query] = True
    allowed[n_query:, n_query:] = torch.tril(torch.ones((text_len, text_len), dtype=torch.bool, device=text_mask.device))
    keys = torch.cat([torch.ones((batch, n_query), dtype=torch.bool, device=text_mask.device), text_mask.bool()], dim=1)
    allowed = allowed[None] & keys[:, None, :]
    mask = torch.zeros((batch, 1, total, total), dtype=dtype, device=text_mask.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


# BERT name -> Q-Former name, per layer. The query FFN (`*_query`) starts from BERT's FFN, as in BLIP-2,
# and so does the text FFN when the Q-Former has a text side.
_BERT_LAYER_MAP = [
    (r"attention\.self\.(query|key|value)\.(weight|bias)", [r"attention.attention.\1.\2"]),
    (r"attention\.output\.(dense|LayerNorm)\.(weight|bias)", [r"attention.output.\1.\2"]),
    (r"intermediate\.dense\.(weight|bias)", [r"intermediate_query.dense.\1", r"intermediate.dense.\1"]),
    (r"output\.(dense|LayerNorm)\.(weight|bias)", [r"output_query.\1.\2", r"output.\1.\2"]),
]


def bert_to_qformer_state_dict(
    bert_state: dict[str, torch.Tensor], num_layers: int, text: bool = False
) -> dict[str, torch.Tensor]:
    """Map BERT tensors onto QFormer names (`model.*`, and `embeddings.*` with a text side). Pure function."""
    mapped: dict[str, torch.Tensor] = {}
    for name, tensor in bert_state.items():
        name = name.removeprefix("bert.")
        if name in ("embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"):
            mapped["model.layernorm." + name.rsplit(".", 1)[1]] = tensor
            continue
        if text and name in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
            mapped[name] = tensor
            continue
        match = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", name)
        if not match or int(match.group(1)) >= num_layers:
            continue
        layer, rest = match.groups()
        for pattern, targets in _BERT_LAYER_MAP:
            if re.fullmatch(pattern, rest):
                for target in targets[: 2 if text else 1]:
                    mapped[f"model.encoder.layer.{layer}." + re.sub(pattern, target, rest)] = tensor
                break
    return mapped


def load_bert_into_qformer(qformer: QFormer, bert_path: str | Path) -> list[str]:
    """Copy a local BERT checkpoint's weights into `qformer`; returns the initialised keys.

    Raises if the checkpoint is missing, too shallow, or shaped differently (width, FFN, vocabulary).
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
    mapped = bert_to_qformer_state_dict(bert.state_dict(), qformer.config.num_hidden_layers, text=qformer.has_text)
    if "embeddings.position_embeddings.weight" in mapped:
        # BERT may have more positions than the Q-Former keeps; take the first ones.
        mapped["embeddings.position_embeddings.weight"] = mapped["embeddings.position_embeddings.weight"][
            : qformer.config.max_position_embeddings
        ]
    own = qformer.state_dict()
    for key, tensor in mapped.items():
        if key not in own:
            raise KeyError(f"bert_init: mapped key {key} is not a Q-Former parameter")
        if own[key].shape != tensor.shape:
            raise ValueError(
                f"bert_init: {key} has shape {tuple(tensor.shape)} in {path} but {tuple(own[key].shape)} in the "
                "Q-Former (hidden_size, intermediate_size, num_heads and the vocabulary must match the BERT checkpoint)"
            )
    if not mapped:
        raise ValueError(f"bert_init: no BERT encoder weights found in {path}")
    qformer.load_state_dict(mapped, strict=False)
    return sorted(mapped)
