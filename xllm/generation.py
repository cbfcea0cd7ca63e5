"""Generation helpers around a Hugging Face LLM: a conversation's KV cache reused across turns, and streaming.

Both work on input embeddings (media tokens have no ids), so they sit below `XLLM` and know nothing of media.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import GenerationMixin

# transformers 5.x renames generate's `past_key_values` to `cache` (the old name warns until 6.0).
CACHE_KWARG = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters else "past_key_values"


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


def stream_pieces(generate: Callable[..., Any], tokenizer: Any) -> Iterator[str]:
    """Run `generate(streamer=...)` and yield the reply's text piece by piece as tokens are produced.

    transformers streams from a generating thread: the caller reads pieces while tokens are produced, and an error
    in generation is re-raised in the caller's thread once the stream ends."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            generate(streamer=streamer)
        except BaseException as err:  # re-raised in the caller's thread, after the stream ends
            errors.append(err)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]
