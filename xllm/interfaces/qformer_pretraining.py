"""BLIP-2's first stage, without any LLM: ITC, ITM and ITG on a Q-Former-based interface.

- ITC (image-text contrastive): each query output and the text's [CLS] output are projected and
  normalised; an image-text similarity is the max over queries; cross-entropy both ways with a learnable
  temperature. Embeddings are gathered across ranks *with* gradient under DDP (`torch.distributed.nn`);
  in a single process the batch is the whole set. Texts that are identical count as positives of each
  other (captions repeat in small or synthetic sets; a repeat is no negative).
- ITM (image-text matching): a binary head on the mean query output of queries + text run jointly;
  each image gets a hard negative text, and each text a hard negative image, sampled in proportion to
  the ITC similarities, never the positive itself (nor an identical text).
  Optionally, a yes/no statement's flipped twin ("... ? Yes" for "... ? No") is one more negative for
  its own image.
- ITG (image-grounded text generation): text decoded causally, seeing all queries; queries never see
  the text (`itg_attention_mask`). The LM head's output matrix is the frozen word-embedding table.

- QA-ITM (question-aware matching, InstructBLIP-flavoured): for yes/no pairs, the question alone sits
  beside the queries (the instruction-aware path used in every later stage) and the ITM head says
  whether the image makes it true. One pass per pair, so it is the cheapest signal for CPU runs, and it
  trains exactly the path that stages 1 and 2 use.

Losses are weighted and switchable (weight 0 turns one off and skips its compute).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


@dataclass
class PretrainOutput:
    loss: torch.Tensor
    itc: torch.Tensor | None = None
    itm: torch.Tensor | None = None
    itg: torch.Tensor | None = None
    qa_itm: torch.Tensor | None = None
    qa_itm_accuracy: torch.Tensor | None = None
    itm_accuracy: torch.Tensor | None = None
    negative_texts: torch.Tensor | None = None  # for each image, the index of its ITM negative text
    negative_images: torch.Tensor | None = None  # for each text, the index of its ITM negative image


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' tensors concatenated (gradient flows back to each rank's part); (tensor, offset of ours)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(tensor)
    return torch.cat(parts, dim=0), dist.get_rank() * tensor.shape[0]


def itc_similarity(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """`[I, T]`: for image i and text t, the max over queries q of <image_embeds[i, q], text_embeds[t]>."""
    return torch.einsum("iqd,td->itq", image_embeds, text_embeds).amax(dim=-1)


def soft_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a target spread evenly over each row's positives (one-hot when unique)."""
    targets = positives.float() / positives.float().sum(dim=1, keepdim=True)
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def itc_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, temperature: torch.Tensor, positives: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Single-process ITC of normalised `image_embeds [B, Q, D]` and `text_embeds [B, D]`.

    `positives [B, B]` marks matching pairs (the diagonal, plus identical texts). Returns
    (loss, sim_i2t, sim_t2i), similarities already divided by the temperature.
    """
    sim_i2t = itc_similarity(image_embeds, text_embeds) / temperature
    sim_t2i = sim_i2t.t()
    loss = (soft_cross_entropy(sim_i2t, positives) + soft_cross_entropy(sim_t2i, positives.t())) / 2
    return loss, sim_i2t, sim_t2i


def sample_hard_negatives(similarity: torch.Tensor, positives: torch.Tensor, generator=None) -> torch.Tensor:
    """For each row, an index drawn with probability ∝ softmax(similarity) over non-positive columns.

    Rows with no non-positive column get -1.
    """
    weights = F.softmax(similarity.float(), dim=1).masked_fill(positives, 0.0)
    empty = weights.sum(dim=1) <= 0
    weights = torch.where(empty[:, None], torch.ones_like(weights), weights)
    picks = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return picks.masked_fill(empty, -1)


class QFormerPretrainer(nn.Module):
    """Heads and losses for LLM-free pretraining of `interface` (one with `.qformer` and `.qformer_features`).

    Args:
        interface: the Q-Former interface to pretrain; its Q-Former must have a text side.
        embed_dim: ITC projection width (BLIP-2: 256).
        itc_weight: weight of ITC (0 turns it off).
        itm_weight: weight of ITM (0 turns it off; ITM negatives come from ITC similarities).
        itg_weight: weight of ITG (0 turns it off).
        instruction_aware: the pair's instruction joins the queries when computing image embeddings.
        qa_itm_weight: weight of question-aware matching on yes/no pairs (0 turns it off).
    """

    def __init__(
        self,
        interface: nn.Module,
        embed_dim: int = 256,
        itc_weight: float = 1.0,
        itm_weight: float = 1.0,
        itg_weight: float = 1.0,
        instruction_aware: bool = False,
        qa_itm_weight: float = 0.0,
    ) -> None:
        super().__init__()
        qformer = interface.qformer
        if not qformer.has_text:
            raise ValueError("Q-Former pretraining needs the Q-Former's text side (qformer_text: true)")
        hidden = qformer.hidden_size
        self.interface = interface
        self.weights = {"itc": itc_weight, "itm": itm_weight, "itg": itg_weight, "qa_itm": qa_itm_weight}
        self.instruction_aware = instruction_aware
        self.vision_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temperature = nn.Parameter(torch.tensor(0.07))
        # BERT-style prediction head; the output matrix is the frozen word-embedding table.
        self.lm_transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden))
        self.lm_bias = nn.Parameter(torch.zeros(qformer.config.vocab_size))

    @property
    def qformer(self):
        return self.interface.qformer

    def image_embeddings(self, features, instruction_ids=None, instruction_mask=None) -> torch.Tensor:
        queries = self.qformer(features, instruction_ids=instruction_ids, instruction_mask=instruction_mask)
        return F.normalize(self.vision_proj(queries), dim=-1)

    def text_embeddings(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.qformer.encode_text(text_ids, text_mask)[:, 0]), dim=-1)

    def forward(
        self,
        media: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        pair_keys: list[str],
        instruction_ids: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        flipped_ids: torch.Tensor | None = None,
        flipped_mask: torch.Tensor | None = None,
        has_flipped: torch.Tensor | None = None,
        answers: torch.Tensor | None = None,
    ) -> PretrainOutput:
        """`answers`: per pair 1 (yes), 0 (no) or -1 (not a yes/no pair), for QA-ITM."""
        features = self.interface.qformer_features(media)
        batch = features.shape[0]
        device = features.device
        same_text = torch.tensor(
            [[a == b for b in pair_keys] for a in pair_keys], dtype=torch.bool, device=device
        )
        losses: dict[str, torch.Tensor] = {}
        out = PretrainOutput(loss=torch.zeros((), device=device))

        sim_i2t = sim_t2i = None
        if self.weights["itc"] > 0 or self.weights["itm"] > 0:
            use_instruction = self.instruction_aware and instruction_ids is not None
            image_embeds = self.image_embeddings(
                features, instruction_ids if use_instruction else None, instruction_mask if use_instruction else None
            )
            text_embeds = self.text_embeddings(text_ids, text_mask)
            all_text, offset = gather_with_grad(text_embeds)
            all_image, _ = gather_with_grad(image_embeds)
            # Positives: our rows vs our own columns with the same text (other ranks' rows are negatives).
            positives_i2t = torch.zeros((batch, all_text.shape[0]), dtype=torch.bool, device=device)
            positives_i2t[:, offset:offset + batch] = same_text
            temperature = self.temperature.clamp(0.001, 0.5)
            sim_i2t = itc_similarity(image_embeds, all_text) / temperature  # our images vs all texts
            sim_t2i = itc_similarity(all_image, text_embeds).t() / temperature  # our texts vs all images
            if self.weights["itc"] > 0:
                losses["itc"] = (soft_cross_entropy(sim_i2t, positives_i2t) + soft_cross_entropy(sim_t2i, positives_i2t)) / 2

        if self.weights["itm"] > 0:
            with torch.no_grad():
                local_i2t = sim_i2t[:, offset:offset + batch]
                local_t2i = sim_t2i[:, offset:offset + batch]
                neg_text = sample_hard_negatives(local_i2t, same_text, generator)
                neg_image = sample_hard_negatives(local_t2i, same_text, generator)
            out.negative_texts, out.negative_images = neg_text, neg_image
            keep_t = neg_text >= 0
            keep_i = neg_image >= 0
            image_rows = torch.cat([torch.arange(batch, device=device), torch.arange(batch, device=device)[keep_t],
                                    neg_image[keep_i]])
            text_rows = torch.cat([torch.arange(batch, device=device), neg_text[keep_t],
                                   torch.arange(batch, device=device)[keep_i]])
            labels = torch.cat([torch.ones(batch, dtype=torch.long, device=device),
                                torch.zeros(int(keep_t.sum() + keep_i.sum()), dtype=torch.long, device=device)])
            query_out, _ = self.qformer.joint(features[image_rows], text_ids[text_rows], text_mask[text_rows])
            logits = self.itm_head(query_out).mean(dim=1)
            if flipped_ids is not None and has_flipped is not None and bool(has_flipped.any()):
                rows = has_flipped.nonzero().flatten()
                flipped_out, _ = self.qformer.joint(features[rows], flipped_ids[rows], flipped_mask[rows])
                logits = torch.cat([logits, self.itm_head(flipped_out).mean(dim=1)])
                labels = torch.cat([labels, torch.zeros(len(rows), dtype=torch.long, device=device)])
            losses["itm"] = F.cross_entropy(logits, labels)
            out.itm_accuracy = (logits.argmax(dim=1) == labels).float().mean()

        if self.weights["itg"] > 0:
            _, text_out = self.qformer.joint(features, text_ids, text_mask, causal_text=True)
            hidden = self.lm_transform(text_out[:, :-1])
            logits = F.linear(hidden, self.qformer.embeddings.word_embeddings.weight, self.lm_bias)
            targets = text_ids[:, 1:].masked_fill(text_mask[:, 1:] == 0, IGNORE_INDEX)
            losses["itg"] = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX)

        if self.weights["qa_itm"] > 0:
            if answers is None or instruction_ids is None:
                raise ValueError("qa_itm needs the pairs' instructions and yes/no answers")
            rows = (answers >= 0).nonzero().flatten()
            if len(rows):
                queries = self.qformer(features[rows], instruction_ids=instruction_ids[rows],
                                       instruction_mask=instruction_mask[rows])
                logits = self.itm_head(queries).mean(dim=1)
                losses["qa_itm"] = F.cross_entropy(logits, answers[rows])
                out.qa_itm_accuracy = (logits.argmax(dim=1) == answers[rows]).float().mean()

        for name, value in losses.items():
            setattr(out, name, value)
            out.loss = out.loss + self.weights[name] * value
        return out
