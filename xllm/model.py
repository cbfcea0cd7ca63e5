"""XLLM: modality interfaces + a frozen LLM. Interface tokens are spliced into the LLM's input embeddings.

Each media item is one negative sentinel id in `input_ids` (see `xllm.data.processor`); `forward` runs every
interface once on all items of its modality in the batch (a `MediaBatch`), then `splice_modality_tokens`
replaces each sentinel by exactly that item's tokens (`ModalityTokens`: counts may differ per item), in reading
order. Nothing here knows which modalities exist: a new interface plugs in through `ModalityInterface`.

One inference path: `chat(messages, media)` for one conversation, `reply` for many, both built on `batch`
(conversations + media paths -> the same batch training uses) and `generate`; evaluation and MME scoring use
`batch` + `generate` / `generate_ids` (which also hands back each step's logits).
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

from xllm.adapters.format import (
    apply_overrides,
    build_interface,
    check_encoder_width,
    check_paths,
    load_weights,
    read_config,
    write_checkpoint,
)
from xllm.data.collator import ConversationCollator
from xllm.data.processor import ConversationProcessor
from xllm.data.records import normalize_turns
from xllm.frozen import keep_frozen_in_eval
from xllm.interfaces.base import Item, MediaBatch, ModalityInterface, ModalityTokens
from xllm.llm import (
    LoraSettings,
    apply_lora,
    input_embeddings,
    llm_hidden_size,
    load_frozen_llm,
    load_tokenizer,
    lora_to_dict,
)
from xllm.tensors import IGNORE_INDEX

SENTINEL_BASE = -200  # LLaVA's IMAGE_TOKEN_INDEX; one id per modality counts down from here


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


def _as_list(value: Any) -> list:
    """One media value (a path or a loaded item) or a sequence of them, as a list."""
    return [value] if isinstance(value, (str, torch.Tensor, dict)) else list(value)


@functools.cache
def _forward_takes_logits_to_keep(model_class: type) -> bool:
    # Once per class, not once per training step.
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


@dataclass
class XLLMOutput:
    """`loss` (mean next-token loss over assistant tokens, when labels were given), `logits`, and the real
    (unpadded) LLM positions of the batch: `tokens` in all, `media_tokens` of them from interfaces."""

    loss: torch.Tensor | None
    logits: torch.Tensor
    tokens: int
    media_tokens: int


MediaInput = Mapping[str, "str | Item | Sequence[str | Item]"]


# transformers 5.x renames generate's `past_key_values` to `cache` (the old name warns until 6.0).
_CACHE_KWARG = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters else "past_key_values"


class ConversationCache:
    """The LLM's KV cache of one conversation's last turn (prompt + reply), for the next turn to reuse.

    A turn re-reads the whole conversation, so its prompt begins with the previous prompt and reply; the keys and
    values of the longest prefix whose input embeddings are *equal* are taken from the cache and only the rest
    is computed. A prefix is compared by embeddings, not token ids, because media tokens have no ids; a reply
    re-tokenized differently from how it was generated just ends the shared prefix earlier."""

    def __init__(self) -> None:
        self.embeds: torch.Tensor | None = None  # [n, hidden]: the positions `cache` holds keys/values for
        self.cache: Any = None
        self.reused = 0  # positions the last turn took from the cache

    def take(self, embeds: torch.Tensor, config: Any) -> Any:
        """The cache cut to the shared prefix of `embeds` ([1, length, hidden]), or a new, empty one for an LLM
        of `config`."""
        from transformers import DynamicCache

        if embeds.shape[0] != 1:
            raise ValueError(f"a conversation cache serves one conversation, not a batch of {embeds.shape[0]}")
        cache, old, self.cache, self.embeds, self.reused = self.cache, self.embeds, None, None, 0
        if cache is None or old is None:
            return DynamicCache(config=config)
        length = min(len(old), embeds.shape[1] - 1)  # at least the last position is computed: its logits are needed
        same = (old[:length] == embeds[0, :length]).all(-1)
        shared = int(same.cumprod(0).sum())
        if shared == 0:
            return DynamicCache(config=config)
        if cache.get_seq_length() > shared:
            cache.crop(shared - cache.get_seq_length())  # a negative count removes that many from the end
        self.reused = shared
        return cache

    def keep(self, prompt: torch.Tensor, reply: torch.Tensor, cache: Any) -> None:
        """After generation: `cache` holds the prompt and every reply token but the last (never fed back)."""
        embeds = torch.cat([prompt[0], reply[0]])
        if cache.get_seq_length() == len(embeds):  # anything else (a model's own cache rules): start afresh
            self.embeds, self.cache = embeds, cache


class XLLM(nn.Module):
    """A frozen causal LLM that reads text plus the foreign-language tokens of its interfaces.

    Args:
        llm: a loaded, frozen `PreTrainedModel` (see `xllm.llm.load_frozen_llm`).
        tokenizer: its tokenizer.
        interfaces: modality -> interface (`{"image": ImageInterface(...)}`).
        template: chat template, `tokenizer` (its own jinja template), `vicuna_v1` or `glm4`.
        system_prompt: optional system message for every conversation.
        llm_path: where the LLM was loaded from (recorded in checkpoints; None for an in-memory model).
        llm_dtype: its dtype name.
        trust_remote_code: whether hub remote code was allowed when loading it.
    """

    def __init__(
        self,
        llm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        interfaces: dict[str, ModalityInterface],
        template: str = "tokenizer",
        system_prompt: str | None = None,
        llm_path: str | None = None,
        llm_dtype: str = "float32",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        for name, interface in interfaces.items():
            if name != interface.modality:
                raise ValueError(f"interface key {name!r} must match its modality {interface.modality!r}")
        self.llm = llm
        self.tokenizer = tokenizer
        self.template = template
        self.system_prompt = system_prompt
        self.llm_path, self.llm_dtype, self.trust_remote_code = llm_path, llm_dtype, trust_remote_code
        self.lora: LoraSettings | None = None
        self.interfaces = nn.ModuleDict(interfaces)
        hidden = llm_hidden_size(llm)
        for interface in self.interfaces.values():
            interface.attach(hidden)
            for module in interface.idle_modules():  # never run on the way to the LLM: not trained here
                module.requires_grad_(False)
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
        return cls(model, tokenizer, interfaces, template=template, system_prompt=system_prompt, llm_path=llm,
                   llm_dtype=llm_dtype, trust_remote_code=trust_remote_code)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        llm: str | None = None,
        encoders: Mapping[str, str] | None = None,
        device: str | torch.device | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        interface_overrides: Mapping[str, Mapping[str, Any]] | None = None,
        interface_classes: Sequence[type] = (),
    ) -> XLLM:
        """A ready model from an adapter directory (written by training or `save_pretrained`), in eval mode.

        Args:
            directory: the adapter directory.
            llm: load the frozen LLM from here instead of the path stored in the adapter.
            encoders: modality -> frozen encoder path, replacing the stored ones (`{"image": "/models/vit"}`).
            device: move the model there (`"cuda"`); default: the CPU.
            dtype: dtype of the frozen LLM and encoders (`"bfloat16"` on a GPU; keep float32 on a CPU).
            trust_remote_code: allow hub remote code for the LLM. Only the caller decides this; a config that
                asks for it is refused.
            interface_overrides: other replaced init args, e.g. `{"image": {"feature_cache": "cache/"}}`.
            interface_classes: interface classes from outside xllm that the adapter may name.
        """
        config = read_config(directory)
        if config.get("llm") is None:
            raise ValueError(
                f"{directory} is a stage-0 interface checkpoint (no LLM yet); train stage 1 from it with init_adapter"
            )
        if not trust_remote_code and (config.get("trust_remote_code") or config["llm"].get("trust_remote_code")):
            raise ValueError(
                f"adapter {directory}: its config asks for trust_remote_code, and xllm never takes that from a file; "
                "nothing was loaded. If you trust the LLM's code, pass trust_remote_code=True yourself"
            )
        config = apply_overrides(config, llm=llm, encoders=encoders, interface_overrides=interface_overrides,
                                 dtype=dtype)
        check_paths(directory, config)
        interfaces = {}
        for name, spec in config["interfaces"].items():
            interfaces[name] = build_interface(name, spec, interface_classes)
            check_encoder_width(directory, name, spec, interfaces[name])
        model = cls.from_paths(
            config["llm"]["path"], interfaces, llm_dtype=config["llm"].get("dtype", "float32"),
            trust_remote_code=trust_remote_code, template=config["template"], system_prompt=config.get("system_prompt"),
        )
        trained, now = config["llm"].get("hidden_size"), llm_hidden_size(model.llm)
        if trained is not None and trained != now:
            raise ValueError(
                f"adapter {directory} was trained for an LLM of hidden size {trained}, but {config['llm']['path']} has "
                f"hidden size {now}: pass the LLM it was trained with (llm=...)"
            )
        if config.get("lora"):
            model.enable_lora(LoraSettings(**config["lora"]))
        load_weights(model, directory, strict=True)
        model.eval()
        return model.to(device) if device is not None else model

    def save_pretrained(self, directory: str | Path, stage: int | None = None, trained_on: str | None = None) -> Path:
        """Write an adapter directory: the trainable tensors (interfaces, projections, LoRA), config, model card."""
        llm = {
            "llm": {"path": self.llm_path, "dtype": self.llm_dtype, "hidden_size": llm_hidden_size(self.llm)},
            "template": self.template, "system_prompt": self.system_prompt, "lora": lora_to_dict(self.lora),
        }
        return write_checkpoint(directory, self.trainable_state_dict(), dict(self.interfaces), stage, llm, trained_on)

    # --- what trains -------------------------------------------------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        return [self.llm] + [m for interface in self.interfaces.values() for m in interface.frozen_modules()]

    def enable_lora(self, settings: LoraSettings) -> None:
        """Wrap the LLM with LoRA (stage 2). The base weights stay frozen; only LoRA matrices train."""
        self.llm = apply_lora(self.llm, settings)
        self.lora = settings

    def train(self, mode: bool = True) -> XLLM:
        # Lightning calls .train() on the whole model each epoch; frozen parts must stay in eval mode.
        super().train(mode)
        keep_frozen_in_eval(self, self.frozen_modules(), mode)
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the parameters that train: what an adapter file and a checkpoint hold."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    @property
    def device(self) -> torch.device:
        return input_embeddings(self.llm).weight.device

    # --- data --------------------------------------------------------------------------------------
    def processor(self, max_length: int = 2048) -> ConversationProcessor:
        """The one tokenizer of conversations for this model (LLM ids, labels, interfaces' instruction ids)."""
        tokenizers = {m: i.instruction_tokenizer() for m, i in self.interfaces.items()}
        return ConversationProcessor(
            tokenizer=self.tokenizer,
            template=self.template,
            sentinels=dict(self.sentinels),
            max_tokens={m: i.max_tokens for m, i in self.interfaces.items()},
            max_length=max_length,
            system_prompt=self.system_prompt,
            instruction_tokenizers={m: t for m, t in tokenizers.items() if t is not None},
        )

    def collator(self) -> ConversationCollator:
        return ConversationCollator(self.tokenizer.pad_token_id, {m: i.collate for m, i in self.interfaces.items()})

    def batch(
        self,
        conversations: Sequence[Sequence[Mapping[str, str]]],
        media: Sequence[MediaInput] | None = None,
        prompt: bool = True,
        max_length: int = 2048,
    ) -> dict[str, Any]:
        """Conversations + their media (paths, or items already loaded) -> the batch training uses.

        `prompt=True` ends each conversation with the assistant cue (for `generate`); `prompt=False` encodes
        whole conversations with their labels (for a teacher-forced loss)."""
        media = list(media) if media is not None else [{} for _ in conversations]
        if len(media) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but {len(media)} media entries")
        processor = self.processor(max_length)
        loaded = self.load_media(media)
        items = []
        for index, (turns, item_media) in enumerate(zip(conversations, loaded)):
            turns = normalize_turns(list(turns), f"conversation {index}")
            text = "".join(t["value"] for t in turns)
            for modality, interface in self.interfaces.items():
                given, wanted = len(item_media.get(modality, [])), text.count(interface.placeholder)
                if given != wanted:
                    raise ValueError(f"conversation {index}: {wanted} {interface.placeholder} placeholder(s) but "
                                     f"{given} {modality} item(s)")
            record = {"id": str(index), "source": f"conversation {index}", "conversations": turns, "media": {}}
            encoded = processor.encode_prompt(turns) if prompt else processor.encode(record)
            items.append({"id": str(index), **encoded, "media": item_media})
        return self.collator()(items)

    def prepare_media(self, media: Sequence[MediaInput]) -> None:
        """Let each interface prepare all of its paths at once (e.g. cache their features in batches)."""
        for modality, interface in self.interfaces.items():
            paths = [v for entry in media for v in _as_list(entry.get(modality, [])) if isinstance(v, str)]
            if paths:
                interface.prepare_media(paths)

    def load_media(self, media: Sequence[MediaInput]) -> list[dict[str, list[Item]]]:
        """Each entry's media as loaded items: paths are prepared and loaded, loaded items pass through."""
        media = [{m: _as_list(v) for m, v in entry.items()} for entry in media]
        unknown = sorted({m for entry in media for m in entry if m not in self.interfaces})
        if unknown:
            raise ValueError(f"media of {unknown} given, but the model has interfaces for {sorted(self.interfaces)} only")
        self.prepare_media(media)
        loaders = {m: i.media_loader() for m, i in self.interfaces.items() if any(m in entry for entry in media)}
        return [{m: [loaders[m](v) if isinstance(v, str) else v for v in values] for m, values in entry.items()}
                for entry in media]

    # --- compute -----------------------------------------------------------------------------------
    def encode_media(self, media: Mapping[str, MediaBatch]) -> dict[int, ModalityTokens]:
        """Run each interface on its batch of items: sentinel -> `ModalityTokens`."""
        out = {}
        for modality, items in media.items():
            if modality not in self.interfaces:
                raise ValueError(f"batch has {modality} items but the model has no {modality} interface")
            out[self.sentinels[modality]] = self.interfaces[modality](items)
        return out

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
        media: Mapping[str, MediaBatch],
        padding_side: str = "right",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return splice_modality_tokens(
            input_ids, attention_mask, labels, input_embeddings(self.llm), self.encode_media(media), padding_side,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        media: Mapping[str, MediaBatch],
        labels: torch.Tensor | None = None,
    ) -> XLLMOutput:
        """LLM output on the spliced batch; `.loss` is the mean next-token loss over assistant tokens.

        With `labels`, `.logits` holds only the positions that predict a label (`[n_labels, vocab]`): the LM
        head over a large vocabulary is a big share of a small LLM's step (SmolLM2: 28M of 135M parameters),
        and only those positions enter the loss. Without labels, `.logits` is the whole `[batch, length, vocab]`."""
        embeds, mask, labels = self.embed_inputs(input_ids, attention_mask, labels, media)
        tokens = int(mask.sum())
        media_tokens = tokens - int((attention_mask.bool() & (input_ids >= 0)).sum())
        if labels is None:
            out = self.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
            return XLLMOutput(None, out.logits, tokens, media_tokens)
        if not self._keeps_logits():
            out = self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False)
            return XLLMOutput(out.loss, out.logits, tokens, media_tokens)
        predicts = torch.zeros_like(labels, dtype=torch.bool)
        predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False, logits_to_keep=predicts).logits
        # The same mean over supervised tokens that transformers' causal-LM loss computes on the full logits.
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:][predicts[:, :-1]])
        return XLLMOutput(loss, logits, tokens, media_tokens)

    def _keeps_logits(self) -> bool:
        """Whether the LLM's forward takes `logits_to_keep` (transformers' own models do; hub remote code may not)."""
        base = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        return _forward_takes_logits_to_keep(type(base))

    def embed_prompts(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """A prompt batch (from `batch`) spliced and left-padded on the LLM's device: `(inputs_embeds,
        attention_mask)`, so every prompt's next token sits in the last column."""
        device = self.device
        media = {m: b.to(device) for m, b in batch["media"].items()}
        embeds, mask, _ = self.embed_inputs(
            batch["input_ids"].to(device), batch["attention_mask"].to(device), None, media, padding_side="left"
        )
        return embeds, mask

    @torch.no_grad()
    def generate_ids(
        self, batch: Mapping[str, Any], max_new_tokens: int = 64, conversation_cache: ConversationCache | None = None,
        **generate_kwargs: Any,
    ) -> Any:
        """The LLM's `generate` on a prompt batch (from `batch`), with its KV cache: the output with the new
        token ids in `sequences` (and per-step `logits` when `output_logits=True` is passed).

        With `conversation_cache` (one conversation), the keys/values of the longest prefix this prompt shares
        with the cached prompt + reply are reused and only the rest is computed; the cache then holds this turn."""
        embeds, mask = self.embed_prompts(batch)
        if conversation_cache is not None:
            generate_kwargs[_CACHE_KWARG] = conversation_cache.take(embeds, self.llm.config)
        output = self.llm.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id, return_dict_in_generate=True, **generate_kwargs,
        )
        if conversation_cache is not None:
            new_embeds = input_embeddings(self.llm)(output.sequences[:, :-1])
            conversation_cache.keep(embeds, new_embeds, generate_kwargs[_CACHE_KWARG])
        return output

    def generate(
        self, batch: Mapping[str, Any], max_new_tokens: int = 64, conversation_cache: ConversationCache | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Replies to a prompt batch (from `batch`): the decoded new text of each (see `generate_ids`)."""
        output = self.generate_ids(batch, max_new_tokens, conversation_cache, **generate_kwargs)
        return self.tokenizer.batch_decode(output.sequences, skip_special_tokens=True)

    def reply(
        self,
        conversations: Sequence[Sequence[Mapping[str, str]]],
        media: Sequence[MediaInput] | None = None,
        max_new_tokens: int = 64,
        **generate_kwargs: Any,
    ) -> list[str]:
        """The next assistant reply of each conversation (greedy unless sampling arguments are given)."""
        generate_kwargs.setdefault("do_sample", False)
        replies = self.generate(self.batch(conversations, media), max_new_tokens, **generate_kwargs)
        return [text.strip() for text in replies]

    def chat(
        self, messages: Sequence[Mapping[str, str]], media: MediaInput | None = None, max_new_tokens: int = 64,
        **generate_kwargs: Any,
    ) -> str:
        """The assistant's reply to one conversation: `messages` as `{"from": "user", "value": "<image>\\n..."}`
        (or `{"role", "content"}`), `media` as `{"image": "photo.jpg"}` (paths, lists of paths, or loaded items)."""
        return self.reply([messages], [media or {}], max_new_tokens, **generate_kwargs)[0]

    def stream(
        self, messages: Sequence[Mapping[str, str]], media: MediaInput | None = None, max_new_tokens: int = 64,
        **generate_kwargs: Any,
    ) -> Iterator[str]:
        """`chat`, with the reply's text yielded piece by piece as it is generated (greedy unless sampling
        arguments are given); the pieces join to what `chat` returns, before stripping. Pass a
        `conversation_cache=ConversationCache()` on every turn of one conversation to reuse its KV cache."""
        from transformers import TextIteratorStreamer

        generate_kwargs.setdefault("do_sample", False)
        batch = self.batch([messages], [media or {}])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self.generate(batch, max_new_tokens, streamer=streamer, **generate_kwargs)
            except BaseException as err:  # re-raised in the caller's thread, after the stream ends
                errors.append(err)
                streamer.end()

        # transformers streams from a generating thread: the caller reads pieces while tokens are produced.
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]
