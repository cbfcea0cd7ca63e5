"""The C-Former: continuous integrate-and-fire (CIF) over frozen speech-encoder frames, then a small transformer.

X-LLM's speech interface. CIF (Dong & Xu, 2020; FunASR's Paraformer predictor) gives every encoder frame a
weight α in (0, 1) from a small convolutional head and walks along the frames accumulating α; each time the
running sum crosses the next integer it *fires* one vector, the α-weighted sum of the frames since the last
fire (a frame whose weight straddles the crossing is split between the two tokens). One clip thus becomes
about one vector per output token — a variable count, which the modality contract carries as `lengths`.

- Training with a known target length L (LLM-free stage 0): α is scaled so that Σα = L, which fires exactly
  L tokens, and the *quantity loss* |Σα − L| teaches the unscaled weights to count.
- Inference, and training through the LLM (stages 1-2, no target length): ⌊Σα⌋ tokens fire, plus one for a
  remainder ≥ `tail_threshold` (FunASR's tail rule, so a last token that has integrated most of its weight is
  not lost). Here α is detached: only the quantity loss teaches it to count, so the LLM's loss cannot buy
  itself more tokens by inflating α (measured: without this, stage 1 grew a 2-s clip to 71 tokens).

The integration is closed-form and vectorised: token k integrates the part of frame t's interval
[c_{t-1}, c_t) (c = cumulative α) that lies in [k, k+1). Cumulative sums are taken in float64: in float32
they drift on long inputs and fire at the wrong frames (FunASR notes the same). The `[batch, frames, tokens]`
weight tensor is dense — short clips make it small, and it keeps the code a few lines of tensor algebra.

Then learned positions and a small transformer (a BERT encoder from transformers, optionally initialised
from a BERT checkpoint as X-LLM's adaptor was) read the fired tokens, and a projection maps them to the LLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import BertConfig, BertModel

from xllm.blocks.projection import ProjectionKind, build_projection


@dataclass
class Fired:
    """CIF's output: `tokens [batch, max_tokens, dim]`, of which row b uses the first `lengths[b]`, and each
    row's unscaled weight total `alpha_sum` (for the quantity loss)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    alpha_sum: torch.Tensor


def cif(
    frames: torch.Tensor,
    alphas: torch.Tensor,
    frame_mask: torch.Tensor | None = None,
    target_lengths: torch.Tensor | None = None,
    tail_threshold: float = 0.5,
) -> Fired:
    """Integrate-and-fire `frames [B, T, D]` with weights `alphas [B, T]` (≥ 0; padding masked by `frame_mask`).

    With `target_lengths [B]`, α is scaled to sum to it and exactly that many tokens fire; without, ⌊Σα⌋ fire
    plus one for a remainder ≥ `tail_threshold`."""
    if frame_mask is not None:
        alphas = alphas * frame_mask.to(alphas.dtype)
    alpha_sum = alphas.sum(dim=1)
    weights = alphas.double()
    if target_lengths is not None:
        weights = weights * (target_lengths.double() / weights.sum(dim=1).clamp_min(1e-8))[:, None]
        lengths = target_lengths.long()
    else:
        total = weights.sum(dim=1)
        whole = torch.floor(total + 1e-6)  # 1e-6: a sum that is an integer up to rounding fires that many
        lengths = (whole + (total - whole >= tail_threshold).double()).long()
    ends = weights.cumsum(dim=1)  # float64 (see the module docstring)
    starts = ends - weights
    count = int(lengths.max()) if lengths.numel() else 0
    k = torch.arange(count, dtype=torch.float64, device=frames.device)
    # overlap of [starts_t, ends_t) with [k, k+1): the share of frame t that token k integrates
    share = (torch.minimum(ends[:, :, None], k + 1) - torch.maximum(starts[:, :, None], k)).clamp_min(0)
    share = share * (k[None, None, :] < lengths[:, None, None])
    tokens = torch.einsum("btk,btd->bkd", share.to(frames.dtype), frames)
    return Fired(tokens, lengths, alpha_sum)


def quantity_loss(alpha_sum: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """Mean |Σα − L|: teaches the weights to count output tokens."""
    return (alpha_sum - target_lengths.to(alpha_sum.dtype)).abs().mean()


class CFormer(nn.Module):
    """`forward(features, feature_mask, target_lengths=None) -> Fired` with tokens in the LLM's width.

    Args:
        encoder_hidden_size: width of the frozen speech encoder's frames.
        hidden_size: width of CIF and the transformer (X-LLM: 768, BERT-base).
        num_layers: transformer layers after CIF (X-LLM: 12).
        num_heads: attention heads.
        intermediate_size: transformer FFN width.
        max_tokens: most tokens one item may fire (the position table's size).
        kernel_size: width of the convolution that predicts α.
        tail_threshold: at inference, a remainder of at least this fires one more token.
        dropout: transformer dropout.
        bert_init: optional BERT checkpoint whose first `num_layers` layers (and position table) start the
            transformer; `hidden_size` must then be the BERT's width.
        projection: `linear` or `mlp` into the LLM width (built by `attach`).
    """

    def __init__(
        self,
        encoder_hidden_size: int,
        hidden_size: int = 256,
        num_layers: int = 2,
        num_heads: int = 4,
        intermediate_size: int = 1024,
        max_tokens: int = 256,
        kernel_size: int = 3,
        tail_threshold: float = 0.5,
        dropout: float = 0.1,
        bert_init: str | None = None,
        projection: ProjectionKind = "linear",
    ) -> None:
        super().__init__()
        self.max_tokens, self.tail_threshold = max_tokens, tail_threshold
        self.ln_features = nn.LayerNorm(encoder_hidden_size)
        self.input = nn.Linear(encoder_hidden_size, hidden_size)
        self.alpha_conv = nn.Conv1d(hidden_size, hidden_size, kernel_size, padding=kernel_size // 2)
        self.alpha_out = nn.Linear(hidden_size, 1)
        # Start firing about once per 8 encoder frames (6 tokens/s at Whisper's 50 frames/s), near speech's
        # token rate, so an untrained C-Former neither floods nor starves the LLM.
        nn.init.constant_(self.alpha_out.bias, -2.0)
        config = BertConfig(vocab_size=1, hidden_size=hidden_size, num_hidden_layers=num_layers,
                            num_attention_heads=num_heads, intermediate_size=intermediate_size,
                            max_position_embeddings=max_tokens, hidden_dropout_prob=dropout,
                            attention_probs_dropout_prob=dropout)
        self.transformer = BertModel(config, add_pooling_layer=False)
        if bert_init is not None:
            self._load_bert(bert_init, num_layers)
        self.hidden_size = hidden_size
        self.projection_kind = projection
        self.projection: nn.Module | None = None

    def _load_bert(self, path: str, num_layers: int) -> None:
        """Copy a BERT checkpoint's first layers and embeddings (its word table is not used: no words come in)."""
        source = BertModel.from_pretrained(path, add_pooling_layer=False).state_dict()
        target = self.transformer.state_dict()
        wanted = {k for k in target if not k.startswith("embeddings.word_embeddings")}
        picked = {}
        for key in wanted:
            if key not in source:
                raise ValueError(f"bert_init {path}: no tensor {key} (needs ≥ {num_layers} layers)")
            tensor = source[key][: target[key].shape[0]] if key == "embeddings.position_embeddings.weight" else source[key]
            if tensor.shape != target[key].shape:
                raise ValueError(f"bert_init {path}: {key} has shape {tuple(tensor.shape)}, the C-Former needs "
                                 f"{tuple(target[key].shape)} (set hidden_size/intermediate_size to the BERT's)")
            picked[key] = tensor
        self.transformer.load_state_dict(picked, strict=False)

    def attach(self, llm_hidden_size: int) -> None:
        self.projection = build_projection(self.projection_kind, self.hidden_size, llm_hidden_size)

    def alphas(self, frames: torch.Tensor) -> torch.Tensor:
        """Per-frame firing weights in (0, 1) from a convolution over time: `[B, T, H] -> [B, T]`."""
        hidden = torch.relu(self.alpha_conv(frames.transpose(1, 2))).transpose(1, 2)
        return torch.sigmoid(self.alpha_out(hidden)).squeeze(-1)

    def forward(
        self,
        features: torch.Tensor,
        feature_mask: torch.Tensor | None = None,
        target_lengths: torch.Tensor | None = None,
    ) -> Fired:
        if self.projection is None:
            raise RuntimeError("attach(llm_hidden_size) must be called before forward (XLLM does it)")
        frames = self.input(self.ln_features(features.float()))
        if feature_mask is not None:
            frames = frames * feature_mask[..., None].to(frames.dtype)  # the α convolution must not see padding
        alphas = self.alphas(frames)
        fired = cif(frames, alphas if target_lengths is not None else alphas.detach(), feature_mask, target_lengths,
                    self.tail_threshold)
        if int(fired.lengths.max()) > self.max_tokens:
            raise ValueError(f"a clip fired {int(fired.lengths.max())} tokens, more than max_tokens={self.max_tokens}; "
                             "raise max_tokens for long audio")
        mask = torch.arange(fired.tokens.shape[1], device=features.device)[None] < fired.lengths[:, None]
        hidden = self.transformer(inputs_embeds=fired.tokens, attention_mask=mask.long()).last_hidden_state
        return Fired(self.projection(hidden) * mask[..., None], fired.lengths, fired.alpha_sum)
