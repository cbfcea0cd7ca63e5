"""XLLM: modality interfaces + a frozen LLM. Interface tokens are spliced into the LLM's input embeddings.

Each media item is one negative sentinel id in `input_ids` (see `xllm.data.processor`); `forward` runs every
interface once on all items of its modality in the batch, then `splice_modality_tokens` replaces each
sentinel by that item's embeddings, in reading order. Nothing here knows which modalities exist: a new
interface plugs in through `ModalityInterface`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from xllm.data.processor import IGNORE_INDEX, ConversationProcessor
from xllm.interfaces.base import ModalityInterface
from xllm.llm import LoraSettings, apply_lora, input_embeddings, llm_hidden_size, load_frozen_llm, load_tokenizer

SENTINEL_BASE = -200  # LLaVA's IMAGE_TOKEN_INDEX; one id per modality counts down from here


def splice_modality_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    embed_tokens: nn.Embedding,
    modality_embeds: dict[int, torch.Tensor],
    padding_side: str = "right",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Replace each sentinel id in `input_ids` by its item's embeddings.

    Args:
        input_ids: `[batch, length]` token ids, with negative sentinels for media items.
        attention_mask: `[batch, length]`, 1 on real tokens (padding may be on either side).
        labels: `[batch, length]` or None; spliced positions get -100.
        embed_tokens: the LLM's input embedding table.
        modality_embeds: sentinel id -> `[n_items, tokens, hidden]`, items in reading order over the batch.
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
            if sentinel not in modality_embeds or used[sentinel] >= modality_embeds[sentinel].shape[0]:
                raise ValueError(f"row {row}: more media placeholders (id {sentinel}) than media items in the batch")
            item = modality_embeds[sentinel][used[sentinel]].to(text_embeds.dtype)
            used[sentinel] += 1
            pieces += [embeds[start:position], item]
            label_pieces += [row_labels[start:position], row_labels.new_full((item.shape[0],), IGNORE_INDEX)]
            start = position + 1
        pieces.append(embeds[start:])
        label_pieces.append(row_labels[start:])
        rows_embeds.append(torch.cat(pieces))
        rows_labels.append(torch.cat(label_pieces))
    for sentinel, count in used.items():
        if count != modality_embeds[sentinel].shape[0]:
            raise ValueError(
                f"{modality_embeds[sentinel].shape[0]} media items (id {sentinel}) for {count} placeholders in the batch"
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


class XLLM(nn.Module):
    """A frozen causal LLM that reads text plus the foreign-language tokens of its interfaces.

    Args:
        llm: a loaded, frozen `PreTrainedModel` (see `xllm.llm.load_frozen_llm`).
        tokenizer: its tokenizer.
        interfaces: modality -> interface (`{"image": ImageInterface(...)}`).
        template: chat template, `tokenizer` (its own jinja template), `vicuna_v1` or `glm4`.
        system_prompt: optional system message for every conversation.
    """

    def __init__(
        self,
        llm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        interfaces: dict[str, ModalityInterface],
        template: str = "tokenizer",
        system_prompt: str | None = None,
    ) -> None:
        super().__init__()
        for name, interface in interfaces.items():
            if name != interface.modality:
                raise ValueError(f"interface key {name!r} must match its modality {interface.modality!r}")
        self.llm = llm
        self.tokenizer = tokenizer
        self.template = template
        self.system_prompt = system_prompt
        self.lora: LoraSettings | None = None
        self.interfaces = nn.ModuleDict(interfaces)
        hidden = llm_hidden_size(llm)
        for interface in self.interfaces.values():
            interface.attach(hidden)
        self.sentinels = {m: SENTINEL_BASE - i for i, m in enumerate(sorted(self.interfaces))}

    @classmethod
    def from_paths(
        cls,
        llm: str,
        interfaces: dict[str, ModalityInterface],
        llm_dtype: str = "float32",
        trust_remote_code: bool = False,
        template: str = "tokenizer",
        system_prompt: str | None = None,
    ) -> XLLM:
        """Load the LLM and tokenizer from a path (or hub id) and freeze the LLM."""
        model = load_frozen_llm(llm, dtype=llm_dtype, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(llm, trust_remote_code=trust_remote_code)
        xllm = cls(model, tokenizer, interfaces, template=template, system_prompt=system_prompt)
        xllm.llm_path, xllm.llm_dtype, xllm.trust_remote_code = llm, llm_dtype, trust_remote_code
        return xllm

    # --- what trains -------------------------------------------------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        return [self.llm] + [m for interface in self.interfaces.values() for m in interface.frozen_modules()]

    def enable_lora(self, settings: LoraSettings) -> None:
        """Wrap the LLM with LoRA (stage 2). The base weights stay frozen; only LoRA matrices train."""
        self.llm = apply_lora(self.llm, settings)
        self.lora = settings

    def train(self, mode: bool = True) -> XLLM:
        # Lightning calls .train() on the whole model each epoch; frozen parts must stay in eval mode
        # (no dropout), except LoRA's own dropout.
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        if self.lora is not None:
            for name, module in self.llm.named_modules():
                if "lora_dropout" in name:
                    module.train(mode)
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the parameters that train: what an adapter file and a checkpoint hold."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    # --- data --------------------------------------------------------------------------------------
    def processor(self, max_length: int = 2048) -> ConversationProcessor:
        return ConversationProcessor(
            tokenizer=self.tokenizer,
            template=self.template,
            sentinels=dict(self.sentinels),
            num_tokens={m: i.num_tokens for m, i in self.interfaces.items()},
            max_length=max_length,
            system_prompt=self.system_prompt,
        )

    # --- compute -----------------------------------------------------------------------------------
    def encode_media(
        self, media: dict[str, torch.Tensor], media_text: dict[str, list[str]] | None = None
    ) -> dict[int, torch.Tensor]:
        """Run each interface on its batch of items: sentinel -> `[n_items, tokens, hidden]`.

        `media_text` holds, per item, the text of the user turn it sits in (for instruction-aware interfaces).
        """
        out = {}
        for modality, items in media.items():
            if modality not in self.interfaces:
                raise ValueError(f"batch has {modality} items but the model has no {modality} interface")
            interface = self.interfaces[modality]
            if interface.uses_instructions:
                out[self.sentinels[modality]] = interface(items, (media_text or {}).get(modality))
            else:
                out[self.sentinels[modality]] = interface(items)
        return out

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
        media: dict[str, torch.Tensor],
        padding_side: str = "right",
        media_text: dict[str, list[str]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return splice_modality_tokens(
            input_ids, attention_mask, labels, input_embeddings(self.llm), self.encode_media(media, media_text),
            padding_side,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: dict[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        media_text: dict[str, list[str]] | None = None,
    ) -> Any:
        """LLM output on the spliced batch; `.loss` is the mean next-token loss over assistant tokens."""
        embeds, mask, labels = self.embed_inputs(input_ids, attention_mask, labels, media, media_text=media_text)
        return self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False)

    def embed_prompts(
        self,
        input_ids: list[list[int]] | torch.Tensor,
        media: dict[str, torch.Tensor],
        media_text: dict[str, list[str]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (token ids with sentinels) left-padded into one batch, media spliced in, on the LLM's device:
        `(inputs_embeds, attention_mask)`, so every prompt's next token sits in the last column."""
        device = input_embeddings(self.llm).weight.device
        if isinstance(input_ids, torch.Tensor):
            rows = [r.tolist() for r in input_ids]
        else:
            rows = [list(r) for r in input_ids]
        length = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), length), dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, length - len(r):] = torch.tensor(r)
            mask[i, length - len(r):] = 1
        media = {m: t.to(device) for m, t in media.items()}
        embeds, mask, _ = self.embed_inputs(
            ids.to(device), mask.to(device), None, media, padding_side="left", media_text=media_text
        )
        return embeds, mask

    @torch.no_grad()
    def generate(
        self,
        input_ids: list[list[int]] | torch.Tensor,
        media: dict[str, torch.Tensor],
        max_new_tokens: int = 64,
        media_text: dict[str, list[str]] | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Generate replies from prompts (token ids with sentinels, e.g. `processor().encode_prompt(...)`).

        Uses the LLM's KV cache; returns the decoded new text of each prompt.
        """
        embeds, mask = self.embed_prompts(input_ids, media, media_text)
        pad = self.tokenizer.pad_token_id
        output = self.llm.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
            **generate_kwargs,
        )
        return self.tokenizer.batch_decode(output, skip_special_tokens=True)
