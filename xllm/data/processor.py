"""Conversations + media -> batches: `MultimodalProcessor` (the model's processor) over `ConversationProcessor`
(conversation -> `input_ids` + `labels` + each media item's instruction ids: all tokenization in one place).

Each `<image>` / `<video>` / `<audio>` placeholder becomes a single negative sentinel id (LLaVA's trick);
`XLLM` later replaces it by that item's interface tokens. Labels are the token ids on assistant replies and
-100 everywhere else. Lengths are counted *after* expansion (each item at its interface's `max_tokens`, an
upper bound), so truncation to `max_length` knows where each modality span lies and never cuts into one.
For instruction-aware interfaces the processor also emits, per item, the interface tokenizer's ids of the user
turn holding it (as transformers' InstructBLIP processor emits `qformer_input_ids`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from xllm.data.collator import ConversationCollator
from xllm.data.records import BadSampleError, check_placeholders, normalize_turns
from xllm.data.templates import message_of, render_segments
from xllm.interfaces.base import Item, ModalityInterface, placeholder
from xllm.tensors import IGNORE_INDEX


@dataclass
class ConversationProcessor:
    """Tokenizes conversations for one model: its tokenizer, template and modality token counts.

    Args:
        tokenizer: the LLM's tokenizer.
        template: `tokenizer`, `vicuna_v1` or `glm4` (see `xllm.data.templates`).
        sentinels: modality -> negative id standing for one media item in `input_ids`.
        max_tokens: modality -> most LLM tokens one item expands to.
        max_length: longest expanded sequence (text + modality tokens).
        system_prompt: optional system message added to every conversation.
        instruction_tokenizers: modality -> `text -> ids` of an instruction-aware interface's own tokenizer.
    """

    tokenizer: PreTrainedTokenizerBase
    template: str
    sentinels: dict[str, int]
    max_tokens: dict[str, int]
    max_length: int = 2048
    system_prompt: str | None = None
    instruction_tokenizers: dict[str, Callable[[str], list[int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        placeholders = "|".join(re.escape(placeholder(m)) for m in self.sentinels)
        self._split = re.compile(f"({placeholders})") if placeholders else None

    def _tokenize_segments(self, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        for text, supervised in segments:
            pieces = self._split.split(text) if self._split else [text]
            for piece in pieces:
                if not piece:
                    continue
                modality = piece[1:-1] if self._split and self._split.fullmatch(piece) else None
                if modality is not None:
                    ids.append(self.sentinels[modality])
                    labels.append(IGNORE_INDEX)
                    continue
                piece_ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids.extend(piece_ids)
                labels.extend(piece_ids if supervised else [IGNORE_INDEX] * len(piece_ids))
        return ids, labels

    def split_turn(self, value: str) -> tuple[list[str], str]:
        """A turn's text as (the modality of each placeholder in reading order, its words without them)."""
        if not self._split:
            return [], " ".join(value.split())
        return [p[1:-1] for p in self._split.findall(value)], " ".join(self._split.sub(" ", value).split())

    def media_instructions(self, conversations: list[dict[str, str]]) -> dict[str, list[str]]:
        """modality -> for each item in reading order, the text of the turn that holds it (placeholders removed), or
        the turn's `instruction` when it has one. An item a tool returned (a skill's edited picture) is read with
        the last user turn's words: it is looked at for the question that made the model call the tool."""
        out: dict[str, list[str]] = {m: [] for m in self.sentinels}
        asked = ""
        for turn in conversations:
            found, words = self.split_turn(turn["value"])
            if turn["from"] == "user":
                asked = turn.get("instruction", words)
            text = turn.get("instruction", asked if turn["from"] == "tool" else words)
            for modality in found:
                out[modality].append(text)
        return out

    def instruction_ids(self, conversations: list[dict[str, str]]) -> dict[str, list[list[int]]]:
        """modality -> for each item, its instruction's ids in the interface's own tokenizer (empty list for a
        modality whose interface reads no instruction)."""
        texts = self.media_instructions(conversations)
        return {m: [self.instruction_tokenizers[m](t) for t in texts[m]] if m in self.instruction_tokenizers else []
                for m in self.sentinels}

    def expanded_length(self, ids: list[int]) -> int:
        by_sentinel = {s: self.max_tokens[m] for m, s in self.sentinels.items()}
        return sum(by_sentinel.get(i, 1) for i in ids)

    def encode(self, record: dict[str, Any]) -> dict[str, Any]:
        """Tokenize a normalized record; raise `BadSampleError` if it cannot fit `max_length` whole."""
        messages = [message_of(t) for t in record["conversations"]]
        segments = render_segments(messages, self.tokenizer, self.template, self.system_prompt,
                                   tools=record.get("tools"))
        ids, labels = self._tokenize_segments(segments)
        length = self.expanded_length(ids)
        truncated = False
        if length > self.max_length:
            ids, labels = self._truncate(record, ids, labels, length)
            truncated = True
        if all(label == IGNORE_INDEX for label in labels):
            raise BadSampleError(record["source"], record["id"], "no assistant tokens after tokenization", "empty_conversation")
        return {
            "input_ids": ids, "labels": labels, "truncated": truncated,
            "instruction_ids": self.instruction_ids(record["conversations"]),
        }

    def _truncate(self, record: dict[str, Any], ids: list[int], labels: list[int], length: int):
        sentinel_set = set(self.sentinels.values())
        budget = self.max_length
        keep = 0
        for token in ids:
            cost = self.expanded_length([token])
            if cost > budget:
                break
            budget -= cost
            keep += 1
        dropped = ids[keep:]
        if any(token in sentinel_set for token in dropped):
            raise BadSampleError(
                record["source"], record["id"],
                f"{length} tokens (with media) exceed max_length={self.max_length}, and truncating would cut a "
                "media item; raise max_length or shorten the conversation",
                "too_long",
            )
        if all(label == IGNORE_INDEX for label in labels[:keep]):
            raise BadSampleError(
                record["source"], record["id"],
                f"{length} tokens (with media) exceed max_length={self.max_length}, and no assistant token "
                "survives truncation; raise max_length or shorten the prompt",
                "too_long",
            )
        return ids[:keep], labels[:keep]

    def encode_prompt(self, conversations: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
                      ) -> dict[str, Any]:
        """A prompt ending in the assistant cue, for generation: `{"input_ids", "labels" (all -100),
        "instruction_ids"}`, the same shape `encode` gives, so one collator batches both. `tools`: the function
        declarations the model may call (see `xllm.data.tool_format`)."""
        messages = [message_of(t) for t in conversations]
        segments = render_segments(
            messages, self.tokenizer, self.template, self.system_prompt, add_generation_prompt=True, tools=tools
        )
        ids, _ = self._tokenize_segments(segments)
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids), "instruction_ids": self.instruction_ids(conversations)}


MediaInput = Mapping[str, "str | Item | Sequence[str | Item]"]
Transcriber = Callable[[str, list[Item]], list[str]]  # (modality, loaded spoken items) -> their words


def _as_list(value: Any) -> list:
    """One media value (a path or a loaded item) or a sequence of them, as a list."""
    return [value] if isinstance(value, (str, torch.Tensor, dict)) else list(value)


class MultimodalProcessor:
    """Conversations + their media -> the batch `XLLM` reads, for training, evaluation and inference alike.

    Owns the LLM's tokenizer and chat template (through `ConversationProcessor`, `text`), each interface's media
    loading and batching, and the placeholder check; `XLLM.processor()` builds the one that matches a model, as
    transformers pairs a model with its processor. Nothing modality-specific is written here: every modality
    comes from its interface (placeholder, token budget, instruction tokenizer, loader, collate).

    Args:
        tokenizer: the LLM's tokenizer.
        template: chat template name (see `xllm.data.templates.TEMPLATES`).
        interfaces: modality -> interface.
        sentinels: modality -> the negative id that stands for one item in `input_ids`.
        system_prompt: optional system message for every conversation.
        max_length: longest expanded sequence (text + media tokens).
        transcribe: `(modality, loaded items) -> their words`, for spoken questions (see `spoken_instructions`).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str, interfaces: Mapping[str, ModalityInterface],
                 sentinels: Mapping[str, int], system_prompt: str | None = None, max_length: int = 2048,
                 transcribe: Transcriber | None = None) -> None:
        self.interfaces = dict(interfaces)
        self.transcribe = transcribe
        tokenizers = {m: i.instruction_tokenizer() for m, i in self.interfaces.items()}
        self.text = ConversationProcessor(
            tokenizer=tokenizer, template=template, sentinels=dict(sentinels),
            max_tokens={m: i.max_tokens for m, i in self.interfaces.items()}, max_length=max_length,
            system_prompt=system_prompt, instruction_tokenizers={m: t for m, t in tokenizers.items() if t is not None},
        )
        self.collator = ConversationCollator(tokenizer.pad_token_id, {m: i.collate for m, i in self.interfaces.items()})

    def encode_prompt(self, conversation: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
                      ) -> dict[str, Any]:
        """Token ids of a prompt that ends in the assistant cue (see `ConversationProcessor.encode_prompt`)."""
        return self.text.encode_prompt(normalize_turns(list(conversation), "conversation"), tools)

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

    def __call__(
        self,
        conversations: Sequence[Sequence[Mapping[str, str]]],
        media: Sequence[MediaInput] | None = None,
        prompt: bool = True,
        tools: Sequence[Sequence[Mapping[str, Any]] | None] | None = None,
    ) -> dict[str, Any]:
        """Conversations + their media (paths, or items already loaded) -> a batch.

        `prompt=True` ends each conversation with the assistant cue (for `XLLM.generate`); `prompt=False` encodes
        whole conversations with their labels (for a teacher-forced loss). `tools`: for each conversation, the
        function declarations it may call (or None)."""
        media = list(media) if media is not None else [{} for _ in conversations]
        if len(media) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but {len(media)} media entries")
        tools = list(tools) if tools is not None else [None] * len(conversations)
        loaded = self.load_media(media)
        conversations = [normalize_turns(list(turns), f"conversation {i}") for i, turns in enumerate(conversations)]
        for index, (turns, item_media) in enumerate(zip(conversations, loaded)):
            check_placeholders(turns, {m: len(item_media.get(m, [])) for m in self.interfaces},
                               f"conversation {index}", what="item")
        self.spoken_instructions(conversations, loaded)
        items = []
        for index, (turns, item_media) in enumerate(zip(conversations, loaded)):
            source = f"conversation {index}"
            record = {"id": str(index), "source": source, "conversations": turns, "media": {}, "tools": tools[index]}
            encoded = self.text.encode_prompt(turns, tools[index]) if prompt else self.text.encode(record)
            items.append({"id": str(index), **encoded, "media": item_media})
        return self.collator(items)

    def spoken_instructions(self, conversations: list[list[dict[str, str]]], media: list[dict[str, list[Item]]]) -> None:
        """Give a spoken question's words to the instruction-aware interfaces of its turn, in place.

        A Q-Former reads its turn's text, and a user turn that holds a picture and a spoken question (`<image>\n
        <audio>`) has none: its `instruction` becomes the words of its spoken items (`transcribe`, the model's own
        transcript), so the Q-Former reads the question the LLM hears. Turns with text or an `instruction` of their
        own keep them. (Chosen on the joint demo's val split: docs/demo_joint.md.)"""
        aware = set(self.text.instruction_tokenizers)
        spoken = {m for m, i in self.interfaces.items() if i.spoken}
        if self.transcribe is None or not aware or not spoken:
            return
        wanted: dict[str, list[tuple[dict[str, str], Item]]] = {m: [] for m in spoken}
        for turns, item_media in zip(conversations, media):
            seen = {m: 0 for m in spoken}
            for turn in turns:
                found, words = self.text.split_turn(turn["value"])
                held = {m: [item_media[m][seen[m] + k] for k in range(found.count(m))] for m in spoken}
                for m in spoken:
                    seen[m] += found.count(m)
                if turn["from"] == "user" and "instruction" not in turn and not words and aware & set(found):
                    for m in spoken:
                        wanted[m] += [(turn, item) for item in held[m]]
        for modality, pairs in wanted.items():
            if pairs:
                for (turn, _), text in zip(pairs, self.transcribe(modality, [item for _, item in pairs])):
                    turn["instruction"] = " ".join(filter(None, [turn.get("instruction", ""), text.strip()]))
