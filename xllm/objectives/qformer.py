"""BLIP-2's first stage, without any LLM: ITC, ITM and ITG on an interface's Q-Former bridge (stage 0).

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

from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from xllm.blocks.bridge import QFormerBridge
from xllm.blocks.qformer import text_output_skipped
from xllm.blocks.qformer_sharing import SharedPasses
from xllm.interfaces.base import ModalityInterface, PretrainableInterface
from xllm.objectives.base import PretrainingObjective, PretrainOutput
from xllm.tensors import IGNORE_INDEX


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' tensors concatenated (gradient flows back to each rank's part); (tensor, offset of ours)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor, 0
    from torch.distributed.nn.functional import all_gather

    gathered = torch.cat(all_gather(tensor), dim=0)
    if gathered.requires_grad:
        # torch's all_gather backward mis-sums a non-contiguous gradient on gloo (its all-to-all path), and ITC's
        # text side gets a transposed one: the other ranks' gradients came back wrong (tests/test_distributed.py).
        gathered.register_hook(torch.Tensor.contiguous)
    return gathered, dist.get_rank() * tensor.shape[0]


def mean_over_ranks(count: torch.Tensor) -> torch.Tensor:
    """`count`'s mean over ranks (itself in one process). ITG divides its token sum by it rather than by its own
    count, so the ranks' mean loss is the global batch's mean per token, as one process computes it, however the
    texts' lengths fall to the ranks."""
    count = count.detach().float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1.0)


def itc_similarity(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """`[I, T]`: for image i and text t, the max over queries q of <image_embeds[i, q], text_embeds[t]>."""
    return torch.einsum("iqd,td->itq", image_embeds, text_embeds).amax(dim=-1)


def soft_cross_entropy(logits: torch.Tensor, positives: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against a target spread evenly over each row's positives (one-hot when unique), smoothed as
    `F.cross_entropy(label_smoothing=...)` smooths: that share spread evenly over every column."""
    targets = positives.float() / positives.float().sum(dim=1, keepdim=True)
    targets = (1 - label_smoothing) * targets + label_smoothing / logits.shape[1]
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, positives: torch.Tensor,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """ITC both ways: our images vs all texts (`sim_i2t [B, N]`) and our texts vs all images (`sim_t2i [B, N]`),
    similarities already divided by the temperature; `positives [B, N]` marks matching pairs."""
    return (soft_cross_entropy(sim_i2t, positives, label_smoothing)
            + soft_cross_entropy(sim_t2i, positives, label_smoothing)) / 2


def sample_hard_negatives(similarity: torch.Tensor, positives: torch.Tensor, generator=None) -> torch.Tensor:
    """For each row, an index drawn with probability ∝ softmax(similarity) over non-positive columns.

    Rows with no non-positive column get -1.
    """
    weights = F.softmax(similarity.float(), dim=1).masked_fill(positives, 0.0)
    empty = weights.sum(dim=1) <= 0
    weights = torch.where(empty[:, None], torch.ones_like(weights), weights)
    picks = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return picks.masked_fill(empty, -1)


class QFormerObjective(PretrainingObjective):
    """Heads and losses for LLM-free pretraining of an interface whose bridge is a `QFormerBridge`.

    Built from settings (so a config chooses it), then `bind(interface)` builds the heads at the bridge's width.

    Args:
        itc_weight: weight of ITC (0 turns it off).
        itm_weight: weight of ITM (0 turns it off; ITM negatives come from ITC similarities).
        itg_weight: weight of ITG (0 turns it off).
        qa_itm_weight: weight of question-aware matching on yes/no pairs (0 turns it off).
        embed_dim: ITC projection width (BLIP-2: 256).
        flipped_negatives: a yes/no statement's flipped answer is one more ITM negative.
        instruction_aware: the pair's instruction joins the queries for ITC/ITM image embeddings
            (None: as the interface does).
        label_smoothing: on ITC's and ITG's targets (BLIP-2: 0.1).
        decoder_token_id: ITG reads this token in place of the text's first ([CLS]), as BLIP-2 reads its added
            [DEC] token (None: the text as it is).
    """

    def __init__(
        self,
        itc_weight: float = 1.0,
        itm_weight: float = 1.0,
        itg_weight: float = 1.0,
        qa_itm_weight: float = 0.0,
        embed_dim: int = 256,
        flipped_negatives: bool = True,
        instruction_aware: bool | None = None,
        label_smoothing: float = 0.0,
        decoder_token_id: int | None = None,
    ) -> None:
        super().__init__()
        self.label_smoothing, self.decoder_token_id = label_smoothing, decoder_token_id
        self.weights = {"itc": itc_weight, "itm": itm_weight, "itg": itg_weight, "qa_itm": qa_itm_weight}
        self.embed_dim, self.flipped_negatives, self.instruction_aware = embed_dim, flipped_negatives, instruction_aware
        self.bridge: QFormerBridge | None = None

    def bind(self, interface: ModalityInterface) -> None:
        """Check that `interface` is one this objective trains, and build the heads at its width."""
        if not isinstance(interface, PretrainableInterface) or not isinstance(interface.bridge, QFormerBridge):
            raise TypeError(f"{type(interface).__name__} has no Q-Former bridge; QFormerObjective cannot pretrain it")
        bridge = interface.bridge
        if not bridge.qformer.has_text:
            raise ValueError("Q-Former pretraining needs the Q-Former's text side (qformer_text: true)")
        if self.instruction_aware is None:
            self.instruction_aware = bool(getattr(interface, "instruction_aware", False))
        # Not a submodule: the bridge's parameters belong to the interface (and are saved under its name).
        object.__setattr__(self, "bridge", bridge)
        hidden = bridge.qformer.hidden_size
        self.vision_proj = nn.Linear(hidden, self.embed_dim)
        self.text_proj = nn.Linear(hidden, self.embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temperature = nn.Parameter(torch.full((1,), 0.07))  # 1-D: FSDP2 shards no 0-D parameter
        # BERT-style prediction head; the output matrix is the frozen word-embedding table.
        self.lm_transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden))
        self.lm_bias = nn.Parameter(torch.zeros(bridge.qformer.config.vocab_size))

    def unused_parameters(self, interface: ModalityInterface) -> list[nn.Parameter]:
        """Heads of losses weighted 0, and the last Q-Former layer's text FFN unless ITC or ITG reads text
        outputs (ITM and QA-ITM read the queries' outputs only)."""
        weights, modules = self.weights, []
        if weights["itc"] == 0:
            modules += [self.vision_proj, self.text_proj]
        if weights["itm"] == 0 and weights["qa_itm"] == 0:
            modules.append(self.itm_head)
        if weights["itg"] == 0:
            modules.append(self.lm_transform)
        if weights["itc"] == 0 and weights["itg"] == 0:
            modules += self._bound().qformer.text_only_modules(instruction_aware=True)
        own = [self.temperature] * (weights["itc"] == 0) + [self.lm_bias] * (weights["itg"] == 0)
        return [p for module in modules for p in module.parameters()] + own

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions and instructions in the Q-Former's own tokenizer (the data loader's collator calls it)."""
        return self._bound().tokenize(texts)

    def _bound(self) -> QFormerBridge:
        if self.bridge is None:
            raise RuntimeError("QFormerObjective.bind(interface) must be called first")
        return self.bridge

    def image_embeddings(self, features, feature_mask, instruction_ids=None, instruction_mask=None) -> torch.Tensor:
        queries = self._bound().qformer(features, feature_mask, instruction_ids, instruction_mask)
        return F.normalize(self.vision_proj(queries), dim=-1)

    def text_embeddings(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self._bound().qformer.encode_text(text_ids, text_mask)[:, 0]), dim=-1)

    def question_logits(self, features, feature_mask, question_ids, question_mask) -> torch.Tensor:
        """QA-ITM: `[n, 2]` ITM-head logits of the question-aware queries (class 1: the answer is "Yes").

        `features` are the bridge's (normalised, with positions: `bridge.features(...)`)."""
        queries = self._bound().qformer(features, feature_mask, question_ids, question_mask)
        return self.itm_head(queries).mean(dim=1)

    def forward(
        self, interface: PretrainableInterface, batch: dict, generator: torch.Generator | None = None
    ) -> PretrainOutput:
        """Losses on a pair batch (`xllm.data.pairs.PairCollator`): `media` (a `MediaBatch` whose instruction
        ids are the pairs' questions), `text_ids`/`text_mask`, `pair_keys`, `flipped_*`, `answers`."""
        qformer = self._bound().qformer
        media = batch["media"]
        encoder_features, feature_mask = interface.bridge_inputs(media)
        features = self._bound().features(encoder_features)
        text_ids, text_mask, pair_keys = batch["text_ids"], batch["text_mask"], batch["pair_keys"]
        instruction_ids, instruction_mask = media.instruction_ids, media.instruction_mask
        size = features.shape[0]
        device = features.device
        same_text = torch.tensor([[a == b for b in pair_keys] for a in pair_keys], dtype=torch.bool, device=device)
        losses: dict[str, torch.Tensor] = {}
        out = PretrainOutput(loss=torch.zeros((), device=device))

        # The passes below share their work on these features: each cross-attention layer projects them once, and
        # ITG reads the query pass's keys and values (xllm.blocks.qformer_sharing).
        with SharedPasses(qformer, features) as shared:
            sim_i2t = sim_t2i = None
            if self.weights["itc"] > 0 or self.weights["itm"] > 0:
                use_instruction = self.instruction_aware and instruction_ids is not None
                with shared.recording_queries() if not use_instruction else nullcontext():
                    image_embeds = self.image_embeddings(
                        features, feature_mask, instruction_ids if use_instruction else None,
                        instruction_mask if use_instruction else None,
                    )
                text_embeds = self.text_embeddings(text_ids, text_mask)
                all_text, offset = gather_with_grad(text_embeds)
                all_image, _ = gather_with_grad(image_embeds)
                # Positives: our rows vs our own columns with the same text (other ranks' rows are negatives).
                positives = torch.zeros((size, all_text.shape[0]), dtype=torch.bool, device=device)
                positives[:, offset:offset + size] = same_text
                temperature = self.temperature.clamp(0.001, 0.5)
                sim_i2t = itc_similarity(image_embeds, all_text) / temperature  # our images vs all texts
                sim_t2i = itc_similarity(all_image, text_embeds).t() / temperature  # our texts vs all images
                if self.weights["itc"] > 0:
                    losses["itc"] = itc_loss(sim_i2t, sim_t2i, positives, self.label_smoothing)

            if self.weights["itm"] > 0:
                with torch.no_grad():
                    neg_text = sample_hard_negatives(sim_i2t[:, offset:offset + size], same_text, generator)
                    neg_image = sample_hard_negatives(sim_t2i[:, offset:offset + size], same_text, generator)
                keep_t, keep_i = neg_text >= 0, neg_image >= 0
                rows = torch.arange(size, device=device)
                image_rows = torch.cat([rows, rows[keep_t], neg_image[keep_i]])
                text_rows = torch.cat([rows, neg_text[keep_t], rows[keep_i]])
                labels = torch.cat([torch.ones(size, dtype=torch.long, device=device),
                                    torch.zeros(int(keep_t.sum() + keep_i.sum()), dtype=torch.long, device=device)])
                pick = lambda mask, r: None if mask is None else mask[r]  # noqa: E731
                last = qformer.model.encoder.layer[-1]  # ITM reads the queries' outputs: the last text FFN is idle
                with text_output_skipped(last):
                    query_out, _ = qformer.joint(shared.rows(image_rows), text_ids[text_rows], text_mask[text_rows],
                                                 feature_mask=pick(feature_mask, image_rows))
                logits = self.itm_head(query_out).mean(dim=1)
                has_flipped = batch.get("has_flipped")
                if self.flipped_negatives and has_flipped is not None and bool(has_flipped.any()):
                    flipped = has_flipped.nonzero().flatten().to(device)
                    with text_output_skipped(last):
                        flipped_out, _ = qformer.joint(shared.rows(flipped), batch["flipped_ids"][flipped],
                                                       batch["flipped_mask"][flipped],
                                                       feature_mask=pick(feature_mask, flipped))
                    logits = torch.cat([logits, self.itm_head(flipped_out).mean(dim=1)])
                    labels = torch.cat([labels, torch.zeros(len(flipped), dtype=torch.long, device=device)])
                losses["itm"] = F.cross_entropy(logits, labels)
                out.metrics["itm_accuracy"] = (logits.argmax(dim=1) == labels).float().mean()

            if self.weights["itg"] > 0:
                decoder_ids = text_ids
                if self.decoder_token_id is not None:
                    decoder_ids = text_ids.clone()
                    decoder_ids[:, 0] = self.decoder_token_id
                if shared.has_queries:  # the query pass's keys and values serve ITG
                    text_out = shared.text_after_queries(decoder_ids, text_mask)
                else:
                    _, text_out = qformer.joint(features, decoder_ids, text_mask, causal_text=True,
                                                feature_mask=feature_mask)
                hidden = self.lm_transform(text_out[:, :-1])
                logits = F.linear(hidden, qformer.embeddings.word_embeddings.weight, self.lm_bias)
                targets = text_ids[:, 1:].masked_fill(text_mask[:, 1:] == 0, IGNORE_INDEX)
                token_losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                               reduction="sum", label_smoothing=self.label_smoothing)
                losses["itg"] = token_losses / mean_over_ranks((targets != IGNORE_INDEX).sum())

            if self.weights["qa_itm"] > 0:
                answers = batch.get("answers")
                if answers is None or instruction_ids is None:
                    raise ValueError("qa_itm needs the pairs' instructions and yes/no answers")
                rows = (answers >= 0).nonzero().flatten().to(device)
                if len(rows):
                    logits = self.question_logits(shared.rows(rows),
                                                  None if feature_mask is None else feature_mask[rows],
                                                  instruction_ids[rows], instruction_mask[rows])
                    losses["qa_itm"] = F.cross_entropy(logits, answers[rows])
                    out.metrics["qa_itm_accuracy"] = (logits.argmax(dim=1) == answers[rows]).float().mean()

        for name, value in losses.items():
            out.metrics[name] = value
            out.loss = out.loss + self.weights[name] * value
        return out
