"""XLLM: modality interfaces + a frozen LLM. Interface tokens are spliced into the LLM's input embeddings.

Each media item is one negative sentinel id in `input_ids` (see `xllm.data.processor`); `forward` runs every
interface once on all items of its modality in the batch (a `MediaBatch`), then `splice_modality_tokens`
replaces each sentinel by exactly that item's tokens (`ModalityTokens`: counts may differ per item), in reading
order. Nothing here knows which modalities exist: a new interface plugs in through `ModalityInterface`.

One inference path: `chat(messages, media)` for one conversation, `reply` for many, both on the model's processor
(`processor()`: conversations + media paths -> the batch training uses) and `generate`; evaluation and MME scoring
use the processor + `generate` / `generate_ids` (with each step's logits) or `forward(..., per_row=True)`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from xllm.adapters.compose import compose_configs
from xllm.adapters.format import load_weights
from xllm.adapters.load import adapter_config, build_interfaces
from xllm.adapters.save import write_checkpoint
from xllm.data.processor import MediaInput, MultimodalProcessor
from xllm.frozen import keep_frozen_in_eval
from xllm.generation import CACHE_KWARG, ConversationCache, stream_pieces
from xllm.interfaces.base import MediaBatch, ModalityInterface, ModalityTokens
from xllm.interfaces.placeholders import with_stand_ins
from xllm.llm import (
    LoraSettings,
    apply_lora,
    input_embeddings,
    llm_hidden_size,
    llm_record,
    load_frozen_llm,
    load_tokenizer,
    lora_to_dict,
)
from xllm.skills.loop import chat_with_skills
from xllm.splice import splice_modality_tokens
from xllm.tensors import IGNORE_INDEX

SENTINEL_BASE = -200  # LLaVA's IMAGE_TOKEN_INDEX; one id per modality counts down from here


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
    row_loss_sums: torch.Tensor | None = None  # `[batch]` summed loss over each row's labels (`per_row=True`)
    row_label_counts: torch.Tensor | None = None  # `[batch]` how many labels each row has (`per_row=True`)


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
        llm_dtype: str = "float32", trust_remote_code: bool = False,
        template: str = "tokenizer", system_prompt: str | None = None,
        llm_quantization: Mapping[str, Any] | None = None,
    ) -> XLLM:
        """Load the LLM (quantised as it loads, when asked) and tokenizer from a path (or hub id); freeze the LLM."""
        model = load_frozen_llm(llm, dtype=llm_dtype, trust_remote_code=trust_remote_code, quantization=llm_quantization)
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
        interface_classes: Sequence[type] = (), llm_quantization: Mapping[str, Any] | bool | None = None,
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
            llm_quantization: `{"bits": 8}`: a quantised LLM; False: full precision; None: as the adapter was trained.
        """
        config = adapter_config(directory, llm=llm, encoders=encoders, dtype=dtype, llm_quantization=llm_quantization,
                                trust_remote_code=trust_remote_code, interface_overrides=interface_overrides)
        model = cls._assemble(config, build_interfaces(directory, config, interface_classes), trust_remote_code,
                              str(directory))
        load_weights(model, directory, strict=True)
        model.eval()
        return model.to(device) if device is not None else model

    @classmethod
    def from_adapters(cls, adapters: Mapping[str, str | Path], device: str | torch.device | None = None,
                      interface_classes: Sequence[type] = (), **overrides: Any) -> XLLM:
        """One model with the interfaces of several adapters, each trained on its own: `{"image": DIR, "video": DIR,
        "audio": DIR}`, each modality's interface and tensors from its adapter. They must share the frozen LLM and
        the chat template (see `xllm.adapters.compose`); `save_pretrained` then writes one adapter. `overrides`:
        `llm`, `encoders`, `dtype`, `trust_remote_code`, `interface_overrides`, as `from_pretrained` takes them."""
        config = compose_configs(adapters, **overrides)
        interfaces = {m: build_interfaces(adapters[m], {"interfaces": {m: spec}}, interface_classes)[m]
                      for m, spec in config["interfaces"].items()}
        model = cls._assemble(config, interfaces, overrides.get("trust_remote_code", False),
                              ", ".join(map(str, adapters.values())))
        for modality, directory in adapters.items():
            load_weights(model, directory, strict=True, prefix=f"interfaces.{modality}.")
        model.eval()
        return model.to(device) if device is not None else model

    @classmethod
    def _assemble(cls, config: Mapping[str, Any], interfaces: dict[str, ModalityInterface], trust_remote_code: bool,
                  source: str) -> XLLM:
        """The model an adapter config describes, before its trained tensors are loaded."""
        model = cls.from_paths(
            config["llm"]["path"], interfaces, llm_dtype=config["llm"].get("dtype", "float32"),
            trust_remote_code=trust_remote_code, template=config["template"], system_prompt=config.get("system_prompt"),
            llm_quantization=config["llm"].get("quantization"))
        trained, now = config["llm"].get("hidden_size"), llm_hidden_size(model.llm)
        if trained is not None and trained != now:
            raise ValueError(
                f"adapter {source} was trained for an LLM of hidden size {trained}, but {config['llm']['path']} has "
                f"hidden size {now}: pass the LLM it was trained with (llm=...)"
            )
        if config.get("lora"):
            model.enable_lora(LoraSettings(**config["lora"]))
        return model

    def save_pretrained(self, directory: str | Path, stage: int | None = None, trained_on: str | None = None) -> Path:
        """Write an adapter directory: the trainable tensors (interfaces, projections, LoRA), config, model card."""
        llm = {
            "llm": llm_record(self.llm, self.llm_path, self.llm_dtype),  # with its quantisation, if any
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
    def processor(self, max_length: int = 2048) -> MultimodalProcessor:
        """This model's processor: conversations + media -> the batch `forward` and `generate` read."""
        return MultimodalProcessor(self.tokenizer, self.template, dict(self.interfaces), self.sentinels,
                                   self.system_prompt, max_length,
                                   transcribe=self.transcribe if self.transcribe_prompt else None)

    # The request a speech interface was trained to answer with its words (the speech demo's stage 1). A spoken
    # question about a picture is transcribed with it, and the picture's Q-Former reads the transcript; set it to
    # the prompt your speech adapter learned, or to None to leave such turns without an instruction.
    transcribe_prompt: str | None = "Transcribe the audio."

    def transcribe(self, modality: str, items: Sequence[Any], max_new_tokens: int = 32) -> list[str]:
        """The words of spoken items (paths or loaded), greedy, through this model: `transcribe_prompt` asked of
        each."""
        conversation = [{"from": "user", "value": f"<{modality}>\n{self.transcribe_prompt}"}]
        return self.reply([conversation] * len(items), [{modality: [item]} for item in items], max_new_tokens)

    # --- compute -----------------------------------------------------------------------------------
    def encode_media(self, media: Mapping[str, MediaBatch]) -> dict[int, ModalityTokens]:
        """Run each interface on its batch of items, in the interfaces' order: sentinel -> `ModalityTokens`."""
        unknown = sorted(set(media) - set(self.interfaces))
        if unknown:
            raise ValueError(f"batch has {unknown[0]} items but the model has no {unknown[0]} interface")
        return {self.sentinels[m]: self.interfaces[m](media[m]) for m in self.interfaces if m in media}

    def embed_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
                     media: Mapping[str, MediaBatch], padding_side: str = "right",
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
        per_row: bool = False,
    ) -> XLLMOutput:
        """LLM output on the spliced batch; `.loss` is the mean next-token loss over assistant tokens.

        With `labels`, `.logits` holds only the positions that predict a label (`[n_labels, vocab]`): the LM
        head over a large vocabulary is a big share of a small LLM's step (SmolLM2: 28M of 135M parameters),
        and only those positions enter the loss. Without labels, `.logits` is the whole `[batch, length, vocab]`.
        `per_row=True` also gives each row's summed loss and label count (evaluation's per-sample loss)."""
        stand_ins: set[str] = set()
        if self.every_interface_runs:  # sharded: each rank runs each interface any rank needs (placeholders.py)
            media, stand_ins = with_stand_ins(media, list(self.interfaces), input_ids.device)
        encoded = self.encode_media(media)
        zero = sum(encoded.pop(self.sentinels[m]).embeds.sum() * 0.0 for m in stand_ins)
        embeds, mask, labels = splice_modality_tokens(input_ids, attention_mask, labels, input_embeddings(self.llm),
                                                      encoded, "right")
        tokens = int(mask.sum())
        media_tokens = tokens - int((attention_mask.bool() & (input_ids >= 0)).sum())
        if labels is None:
            out = self.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
            return XLLMOutput(None, out.logits, tokens, media_tokens)
        predicts = torch.zeros_like(labels, dtype=torch.bool)
        predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        if self._keeps_logits():
            logits = self.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False,
                              logits_to_keep=predicts).logits
            kept = logits.reshape(-1, logits.shape[-1])  # one row per label, in reading order
            # The same mean over supervised tokens that transformers' causal-LM loss computes on the full logits.
            loss = F.cross_entropy(kept.float(), labels[:, 1:][predicts[:, :-1]])
        else:
            out = self.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False)
            loss, logits = out.loss, out.logits
            kept = logits[predicts] if per_row else None
        loss = loss + zero
        if self.every_interface_in_loss and self.training:
            loss = loss + self.every_parameter_zero()
        output = XLLMOutput(loss, logits, tokens, media_tokens)
        if per_row:
            losses = F.cross_entropy(kept.float(), labels[:, 1:][predicts[:, :-1]], reduction="none")
            rows = predicts.nonzero()[:, 0]
            output.row_loss_sums = losses.new_zeros(labels.shape[0]).index_add_(0, rows, losses)
            output.row_label_counts = predicts.sum(dim=1)
        return output

    # DDP needs a gradient for every trained parameter at every step: a rank whose batch holds no clip leaves the
    # video interface without one, and a C-Former's CIF weights never get one from the LLM's loss. Training sets
    # this under DDP; sharded (FSDP2), `every_interface_runs` has every rank run the same interfaces instead.
    every_interface_in_loss: bool = False
    every_interface_runs: bool = False

    def every_parameter_zero(self) -> torch.Tensor:
        """Zero through every trained interface parameter: each gets an exact zero gradient (a parameter that gets
        zero on every rank still moves by AdamW's momentum and decay: mix modalities per batch)."""
        trained = [p.sum() for p in self.interfaces.parameters() if p.requires_grad]
        return torch.stack(trained).sum() * 0.0 if trained else torch.zeros((), device=self.device)

    def _keeps_logits(self) -> bool:
        """Whether the LLM's forward takes `logits_to_keep` (transformers' own models do; hub remote code may not)."""
        base = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        return _forward_takes_logits_to_keep(type(base))

    def embed_prompts(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """A prompt batch (from `processor()`) spliced and left-padded on the LLM's device: `(inputs_embeds,
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
        """The LLM's `generate` on a prompt batch (from `processor()`), with its KV cache: the output with the new
        token ids in `sequences` (and per-step `logits` when `output_logits=True` is passed).

        With `conversation_cache` (one conversation), the keys/values of the longest prefix this prompt shares
        with the cached prompt + reply are reused and only the rest is computed; the cache then holds this turn."""
        embeds, mask = self.embed_prompts(batch)
        if conversation_cache is not None:
            generate_kwargs[CACHE_KWARG] = conversation_cache.take(embeds, self.llm.config)
        output = self.llm.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id, return_dict_in_generate=True, **generate_kwargs,
        )
        if conversation_cache is not None:
            new_embeds = input_embeddings(self.llm)(output.sequences[:, :-1])
            conversation_cache.keep(embeds, new_embeds, generate_kwargs[CACHE_KWARG])
        return output

    def generate(
        self, batch: Mapping[str, Any], max_new_tokens: int = 64, conversation_cache: ConversationCache | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Replies to a prompt batch (from `processor()`): the decoded new text of each (see `generate_ids`)."""
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
        replies = self.generate(self.processor()(conversations, media), max_new_tokens, **generate_kwargs)
        return [text.strip() for text in replies]

    def chat(self, messages: Sequence[Mapping[str, Any]], media: MediaInput | None = None, max_new_tokens: int = 64,
             tools: Sequence[Any] | None = None, **generate_kwargs: Any) -> Any:
        """The assistant's reply to one conversation: `messages` as `{"from": "user", "value": "<image>\\n..."}`
        (or `{"role", "content"}`), `media` as `{"image": "photo.jpg"}` (paths, lists of paths, or loaded items).
        With `tools` (typed functions): a `SkillChat` from the skills loop (`xllm.skills.chat_with_skills`)."""
        if tools is None:
            return self.reply([messages], [media or {}], max_new_tokens, **generate_kwargs)[0]
        return chat_with_skills(self, messages, media, tools, max_new_tokens, **generate_kwargs)

    def stream(
        self, messages: Sequence[Mapping[str, str]], media: MediaInput | None = None, max_new_tokens: int = 64,
        **generate_kwargs: Any,
    ) -> Iterator[str]:
        """`chat`, with the reply's text yielded piece by piece as it is generated (greedy unless sampling
        arguments are given); the pieces join to what `chat` returns, before stripping. Pass a
        `conversation_cache=ConversationCache()` on every turn of one conversation to reuse its KV cache."""
        generate_kwargs.setdefault("do_sample", False)
        batch = self.processor()([messages], [media or {}])
        yield from stream_pieces(
            lambda streamer: self.generate(batch, max_new_tokens, streamer=streamer, **generate_kwargs), self.tokenizer)
