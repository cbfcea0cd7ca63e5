"""LLM-free pretraining of a C-Former (stage 0 for speech): CIF as a speech recogniser in the LLM's own tokens.

With α scaled to the transcript's length in the frozen LLM's tokenizer, the C-Former fires exactly one vector
per target token; each fired vector, projected to the LLM's width, is scored against the frozen LLM's output
embedding table (its LM head), and cross-entropy pulls it toward its token. Cross-entropy alone lets the vectors
grow (measured: norms ~20 against the embeddings' ~3.2), and an LLM reading vectors 6x larger than any word it
knows rambles; so a second term pulls each fired vector toward the *input* embedding of its token, the vector
the LLM would have read had the word been typed. The quantity loss |Σα − L| teaches
the unscaled weights to count tokens, so at inference the right number fire. The LLM itself never runs: only its
tokenizer and one `[vocab, hidden]` table are read from its checkpoint. The result is a C-Former whose output tokens already sit
near the embeddings of the words spoken, which is what made the image demo learn on a CPU, here for speech.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xllm.blocks.cformer import CFormer, quantity_loss
from xllm.interfaces.base import MediaBatch, ModalityInterface, PretrainableInterface
from xllm.llm import embedding_tables, load_tokenizer
from xllm.objectives.base import PretrainingObjective, PretrainOutput


class CIFObjective(PretrainingObjective):
    """Token cross-entropy through the frozen LLM's output embeddings + a pull toward the typed tokens' input
    embeddings + CIF quantity loss. Train it on transcription data: every reply is taken as its clip's transcript.

    Args:
        llm: path of the LLM that later stages use (its tokenizer and embedding tables are read).
        quantity_weight: weight of the quantity loss.
        embedding_weight: weight of the pull toward each target token's input embedding (squared distance over
            the table's mean squared norm).
        trust_remote_code: allow hub remote code for the LLM (only when you trust it).
    """

    pair_texts = ("reply",)

    def __init__(self, llm: str, quantity_weight: float = 1.0, embedding_weight: float = 1.0,
                 trust_remote_code: bool = False) -> None:
        super().__init__()
        self.quantity_weight, self.embedding_weight = quantity_weight, embedding_weight
        self.tokenizer = load_tokenizer(llm, trust_remote_code)
        # Not persistent: frozen, never in a checkpoint (they are the LLM's, read again from `llm`).
        inputs, output = embedding_tables(llm, trust_remote_code)
        self.register_buffer("output_embeddings", output.float(), persistent=False)
        self.register_buffer("input_embeddings", self.output_embeddings if inputs is output else inputs.float(),
                             persistent=False)

    def bind(self, interface: ModalityInterface) -> None:
        bridge = getattr(interface, "bridge", None)
        if not isinstance(bridge, CFormer):
            raise ValueError(
                f"CIFObjective trains a C-Former bridge, the {interface.modality} interface has "
                f"{type(bridge).__name__}; a window Q-Former has no token alignment and trains through the LLM "
                "(start at stage 1)"
            )
        interface.attach(self.output_embeddings.shape[1])  # fired tokens live in the LLM's width from the start

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"]

    def token_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[..., hidden] -> [..., vocab]`: each fired vector scored against every token's output embedding."""
        return tokens @ self.output_embeddings.to(tokens.dtype).T

    def forward(self, interface: PretrainableInterface, batch: dict) -> PretrainOutput:
        """Losses on a pair batch: `media` and the transcripts' LLM token ids `reply_ids`/`reply_mask`."""
        features, mask = interface.bridge_inputs(batch["media"])
        targets, target_mask = batch["reply_ids"].to(features.device), batch["reply_mask"].to(features.device).bool()
        target_lengths = target_mask.sum(dim=1)
        fired = interface.bridge(features, mask, target_lengths=target_lengths)
        tokens, wanted = fired.tokens[:, : targets.shape[1]][target_mask], targets[target_mask]
        logits = self.token_logits(tokens)
        token_ce = F.cross_entropy(logits, wanted)
        typed = self.input_embeddings[wanted].to(tokens.dtype)
        embedding = (tokens - typed).pow(2).sum(-1).mean() / self.input_embeddings.pow(2).sum(-1).mean()
        quantity = quantity_loss(fired.alpha_sum, target_lengths)
        accuracy = (logits.argmax(dim=-1) == wanted).float().mean()
        loss = token_ce + self.embedding_weight * embedding + self.quantity_weight * quantity
        return PretrainOutput(loss, dict(token_ce=token_ce.detach(), quantity=quantity.detach(),
                                        token_accuracy=accuracy, embedding_distance=embedding.detach()))

    @torch.no_grad()
    def transcribe(self, interface: PretrainableInterface, media: MediaBatch) -> list[str]:
        """The C-Former on its own as a recogniser: inference-mode CIF, each fired token's nearest output
        embedding, decoded (the demo reports its CER beside the LLM's)."""
        features, mask = interface.bridge_inputs(media)
        fired = interface.bridge(features, mask)
        ids = self.token_logits(fired.tokens).argmax(dim=-1)
        return [self.tokenizer.decode(row[:n].tolist(), skip_special_tokens=True).strip()
                for row, n in zip(ids, fired.lengths.tolist())]
