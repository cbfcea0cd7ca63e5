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
- Spelling (the speech demo's C-Former recipe, for queries): the question-aware queries, projected into the LLM's
  width, spell the pair's reply in the LLM's own tokens, one token per query: each is scored against the frozen
  LLM's output embeddings (cross-entropy) and pulled toward the input embedding of its token (the vector the LLM
  would read had the word been typed), and a stop head on each query learns where the reply ends
  (`QFormerSettings.stop_head`). So the tokens the LLM later reads already sit near the words of the answer, and
  answers of every length — "Yes", "Three.", a whole description — are learned without the LLM. The LLM never runs:
  its tokenizer and its two `[vocab, hidden]` tables are read from its checkpoint.

Losses are weighted and switchable (weight 0 turns one off and skips its compute).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from xllm.blocks.bridge import QFormerBridge
from xllm.blocks.qformer import text_output_skipped
from xllm.blocks.qformer_sharing import SharedPasses
from xllm.interfaces.base import ModalityInterface, PretrainableInterface
from xllm.llm import embedding_tables, load_tokenizer
from xllm.objectives.base import PretrainingObjective, PretrainOutput, Tokenize
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
    """For each row, an index drawn with probability ∝ softmax(similarity) over non-positive columns (-1 if none)."""
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
        spell_weight: weight of spelling each pair's reply in the LLM's tokens (0 turns it off; needs `llm`).
        llm: path of the LLM that later stages use (spelling reads its tokenizer and embedding tables).
        spell_candidates: what each query is scored against: `vocabulary` (the whole output table) or `batch` (the
            step's reply tokens: ~60 ids instead of 49k, 0.1 s instead of ~1 s a CPU step; the pull toward the input
            embeddings still places every token among all the LLM's words).
        embedding_weight: weight of the pull toward each reply token's input embedding (squared distance over the
            table's mean squared norm), as `CIFObjective`'s.
        trust_remote_code: allow hub remote code when reading `llm` (only when you trust it).
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
        spell_weight: float = 0.0,
        llm: str | None = None,
        spell_candidates: Literal["vocabulary", "batch"] = "vocabulary",
        embedding_weight: float = 1.0,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.label_smoothing, self.decoder_token_id = label_smoothing, decoder_token_id
        self.weights = {"itc": itc_weight, "itm": itm_weight, "itg": itg_weight, "qa_itm": qa_itm_weight,
                        "spell": spell_weight}
        self.embed_dim, self.flipped_negatives, self.instruction_aware = embed_dim, flipped_negatives, instruction_aware
        self.bridge: QFormerBridge | None = None
        if spell_candidates not in ("vocabulary", "batch"):
            raise ValueError(f"spell_candidates must be 'vocabulary' or 'batch', got {spell_candidates!r}")
        self.spell_candidates, self.embedding_weight, self.llm_tokenizer = spell_candidates, embedding_weight, None
        if spell_weight > 0:
            if llm is None:
                raise ValueError("spelling (spell_weight > 0) needs the LLM's path: llm: ...")
            self.llm_tokenizer = load_tokenizer(llm, trust_remote_code)
            inputs, output = embedding_tables(llm, trust_remote_code)
            # Not persistent: frozen, never in a checkpoint (they are the LLM's, read again from `llm`).
            self.register_buffer("output_embeddings", output.float(), persistent=False)
            self.register_buffer("input_embeddings", self.output_embeddings if inputs is output else inputs.float(),
                                 persistent=False)
            self.pair_texts = (*self.pair_texts, "reply")
            self.pull_scale = float(self.input_embeddings.pow(2).sum(-1).mean())  # once: 19 ms a step on a CPU

    def bind(self, interface: ModalityInterface) -> None:
        """Check that `interface` is one this objective trains, and build the heads at its width."""
        if not isinstance(interface, PretrainableInterface) or not isinstance(interface.bridge, QFormerBridge):
            raise TypeError(f"{type(interface).__name__} has no Q-Former bridge; QFormerObjective cannot pretrain it")
        bridge = interface.bridge
        if not bridge.qformer.has_text:
            raise ValueError("Q-Former pretraining needs the Q-Former's text side (qformer_text: true)")
        if self.instruction_aware is None:
            self.instruction_aware = bool(getattr(interface, "instruction_aware", False))
        if bridge.stop_head is not None and self.weights["spell"] == 0:
            raise ValueError("the Q-Former's stop_head learns where answers end from spelling: set spell_weight > 0")
        if self.weights["spell"] > 0:
            interface.attach(self.output_embeddings.shape[1])  # the queries spell in the LLM's width from the start
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
        if weights["spell"] == 0 and self._bound().projection is not None:
            modules.append(self._bound().projection)
        own = [self.temperature] * (weights["itc"] == 0) + [self.lm_bias] * (weights["itg"] == 0)
        return [p for module in modules for p in module.parameters()] + own

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions and instructions in the Q-Former's own tokenizer (the data loader's collator calls it)."""
        return self._bound().tokenize(texts)

    def tokenizer_for(self, text: str) -> Tokenize:
        """Replies, which the queries spell, in the LLM's tokenizer; every other text in the Q-Former's."""
        return self.llm_tokens if text == "reply" and self.llm_tokenizer is not None else self.tokenize

    def llm_tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.llm_tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"]

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

    def spelling(self, queries: torch.Tensor, reply_ids: torch.Tensor, reply_mask: torch.Tensor, ids: list[str],
                 ) -> dict[str, torch.Tensor]:
        """Spelling's loss and metrics: query i of each pair, projected, spells token i of its reply (cross-entropy
        over `spell_candidates` + `embedding_weight` × the pull toward the token's input embedding), and the stop
        head marks every query from the reply's length on (binary cross-entropy), when the bridge has one."""
        bridge = self._bound()
        reply_ids, reply_mask = reply_ids.to(queries.device), reply_mask.to(queries.device).bool()
        lengths, slots = reply_mask.sum(dim=1), bridge.max_tokens
        if int(lengths.max()) > slots:
            longest = int(lengths.argmax())
            raise ValueError(f"pair {ids[longest]}: its reply is {int(lengths[longest])} LLM tokens, but the Q-Former "
                             f"spells at most {slots} (num_query_tokens x tokens_per_query): shorten it or add queries")
        tokens = bridge.project(queries)
        spelled, wanted = tokens[:, : reply_ids.shape[1]][reply_mask], reply_ids[reply_mask]
        if self.spell_candidates == "batch":
            candidates = wanted.unique()  # sorted: a token's class is its place among them
            logits = spelled @ self.output_embeddings[candidates].to(spelled.dtype).T
            classes = torch.searchsorted(candidates, wanted)
        else:
            logits, classes = spelled @ self.output_embeddings.to(spelled.dtype).T, wanted
        token_ce = F.cross_entropy(logits, classes)
        typed = self.input_embeddings[wanted].to(spelled.dtype)
        pull = (spelled - typed).pow(2).sum(-1).mean() / self.pull_scale
        right = logits.argmax(dim=-1) == classes
        metrics = {"spell_ce": token_ce.detach(), "spell_pull": pull.detach(), "spell_accuracy": right.float().mean()}
        loss = token_ce + self.embedding_weight * pull
        if bridge.stop_head is not None:
            ended = torch.arange(slots, device=queries.device)[None] >= lengths[:, None]
            stop_logits = bridge.stop_logits(queries)
            loss = loss + F.binary_cross_entropy_with_logits(stop_logits, ended.float())
            stopped = (stop_logits > 0) == ended
            metrics["stop_accuracy"] = stopped.float().mean()
            whole = torch.zeros_like(reply_mask)
            whole[reply_mask] = right
            metrics["spell_exact"] = ((whole | ~reply_mask).all(dim=1) & stopped.all(dim=1)).float().mean()
        return {"loss": loss, **metrics}

    @torch.no_grad()
    def spell(self, interface: PretrainableInterface, media) -> list[str]:
        """The Q-Former on its own, as it answers: each item's tokens (as many as the stop head gives) read as their
        nearest output embeddings, decoded (a diagnostic the demos report beside the LLM's answers)."""
        features, mask = interface.bridge_inputs(media)
        tokens, lengths = self._bound().tokens(features, mask, media.instruction_ids, media.instruction_mask)
        ids = (tokens @ self.output_embeddings.to(tokens.dtype).T).argmax(dim=-1)
        return [self.llm_tokenizer.decode(row[:n].tolist(), skip_special_tokens=True).strip()
                for row, n in zip(ids, lengths.tolist())]

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

            if self.weights["qa_itm"] > 0 or self.weights["spell"] > 0:
                answers = batch.get("answers")
                if instruction_ids is None or (self.weights["qa_itm"] > 0 and answers is None):
                    raise ValueError("qa_itm and spelling need the pairs' instructions (and qa_itm their yes/no answers)")
                # One question-aware pass serves both: the rows with a yes/no answer (QA-ITM) or every row (spelling).
                asked = (torch.arange(size, device=device) if self.weights["spell"] > 0
                         else (answers >= 0).nonzero().flatten().to(device))
                if len(asked):
                    queries = qformer(shared.rows(asked), None if feature_mask is None else feature_mask[asked],
                                      instruction_ids[asked], instruction_mask[asked])
                    yes_no = (answers.to(device)[asked] >= 0) if answers is not None else None
                    if self.weights["qa_itm"] > 0 and bool(yes_no.any()):
                        logits = self.itm_head(queries[yes_no]).mean(dim=1)
                        targets = answers.to(device)[asked][yes_no]
                        losses["qa_itm"] = F.cross_entropy(logits, targets)
                        out.metrics["qa_itm_accuracy"] = (logits.argmax(dim=1) == targets).float().mean()
                    if self.weights["spell"] > 0:
                        rows = asked.tolist()
                        spelled = self.spelling(queries, batch["reply_ids"][asked], batch["reply_mask"][asked],
                                                [batch["ids"][i] for i in rows])
                        losses["spell"] = spelled.pop("loss")
                        out.metrics.update(spelled)

        for name, value in losses.items():
            out.metrics[name] = value
            out.loss = out.loss + self.weights[name] * value
        return out
