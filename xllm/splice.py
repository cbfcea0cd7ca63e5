"""Where media meets text: each media item's sentinel id in `input_ids` becomes that item's interface tokens.

Each media item is one negative sentinel id in `input_ids` (see `xllm.data.processor`); `splice_modality_tokens`
replaces each by exactly that item's tokens (`ModalityTokens`: counts may differ per item), in reading order, and
re-pads the batch (LLaVA's `prepare_inputs_labels_for_multimodal`, as one function).
"""

from __future__ import annotations

import torch
from torch import nn

from xllm.interfaces.base import ModalityTokens
from xllm.tensors import IGNORE_INDEX


def splice_modality_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    embed_tokens: nn.Embedding,
    modality_embeds: dict[int, ModalityTokens],
    padding_side: str = "right",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Replace each sentinel id in `input_ids` by its item's embeddings.

    Args:
        input_ids: `[batch, length]` token ids, with negative sentinels for media items.
        attention_mask: `[batch, length]`, 1 on real tokens (padding may be on either side).
        labels: `[batch, length]` or None; spliced positions get -100.
        embed_tokens: the LLM's input embedding table.
        modality_embeds: sentinel id -> that modality's `ModalityTokens`, items in reading order over the batch;
            item i contributes its first `lengths[i]` token embeddings.
        padding_side: padding of the output (`left` for generation).

    Returns `(inputs_embeds, attention_mask, labels)` of the expanded, re-padded batch.
    """
    safe_ids = input_ids.masked_fill(input_ids < 0, 0)
    text_embeds = embed_tokens(safe_ids)
    used = {sentinel: 0 for sentinel in modality_embeds}
    rows_embeds: list[torch.Tensor] = []
    rows_labels: list[torch.Tensor] = []
    for row in range(input_ids.shape[0]):
        keep = attention_mask[row].bool()
        ids, embeds = input_ids[row][keep], text_embeds[row][keep]
        row_labels = labels[row][keep] if labels is not None else torch.full_like(ids, IGNORE_INDEX)
        pieces, label_pieces, start = [], [], 0
        for position in (ids < 0).nonzero().flatten().tolist():
            sentinel = int(ids[position])
            if sentinel not in modality_embeds or used[sentinel] >= len(modality_embeds[sentinel].lengths):
                raise ValueError(f"row {row}: more media placeholders (id {sentinel}) than media items in the batch")
            tokens = modality_embeds[sentinel]
            item = tokens.embeds[used[sentinel], : int(tokens.lengths[used[sentinel]])].to(text_embeds.dtype)
            used[sentinel] += 1
            pieces += [embeds[start:position], item]
            label_pieces += [row_labels[start:position], row_labels.new_full((item.shape[0],), IGNORE_INDEX)]
            start = position + 1
        pieces.append(embeds[start:])
        label_pieces.append(row_labels[start:])
        rows_embeds.append(torch.cat(pieces))
        rows_labels.append(torch.cat(label_pieces))
    for sentinel, count in used.items():
        if count != len(modality_embeds[sentinel].lengths):
            raise ValueError(
                f"{len(modality_embeds[sentinel].lengths)} media items (id {sentinel}) for {count} placeholders in the batch"
            )

    length = max(r.shape[0] for r in rows_embeds)
    batch, hidden = len(rows_embeds), text_embeds.shape[-1]
    out_embeds = text_embeds.new_zeros((batch, length, hidden))
    out_mask = attention_mask.new_zeros((batch, length))
    out_labels = input_ids.new_full((batch, length), IGNORE_INDEX)
    for row, (embeds, row_labels) in enumerate(zip(rows_embeds, rows_labels)):
        n = embeds.shape[0]
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        out_embeds[row, span] = embeds
        out_mask[row, span] = 1
        out_labels[row, span] = row_labels
    return out_embeds, out_mask, (out_labels if labels is not None else None)
