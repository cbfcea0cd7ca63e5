"""Generation helpers around a Hugging Face LLM: a conversation's KV cache reused across turns, streaming, and the
KV caches continuous batching needs (`BatchCache`: rows that join and leave between decode steps; `PrefixCache`:
keys/values of earlier prompts that later ones begin with).

All work on input embeddings (media tokens have no ids), so they sit below `XLLM` and know nothing of media.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from transformers import DynamicCache, GenerationMixin
from transformers.cache_utils import DynamicLayer

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


# One layer's keys and values, `[rows, kv_heads, positions, head_dim]` each.
LayerKV = tuple[torch.Tensor, torch.Tensor]


def _layers(cache: DynamicCache) -> list[LayerKV]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros before its entries along `dim`, to `length` entries."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim)


@functools.cache
def _forward_takes_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def check_joinable(llm: Any) -> None:
    """Refuse, saying why, an LLM whose KV cache `BatchCache` cannot join row-wise (sliding-window, linear-attention
    or other special layers keep state that left padding would corrupt)."""
    layers = DynamicCache(config=llm.config).layers
    special = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if special:
        raise ValueError(f"continuous batching joins full-attention KV caches row by row, but this LLM's cache has "
                         f"{', '.join(special)} layers: use dynamic batching (xllm serve --batching dynamic)")


class BatchCache:
    """The LLM's keys/values of the rows that decode together, as one transformers `DynamicCache`, plus which of its
    columns each row uses (`mask`, `[rows, columns]`) and each row's next position id.

    Rows join (`join`: a prefilled group's cache) and leave (`keep`) between decode steps; a row's columns need not
    be contiguous (a reused prefix, padding, then the rest of its prompt): the attention mask hides the gaps and
    explicit position ids count only the used columns, so a row computes what it would alone.

    Why by hand: `DynamicCache` keeps chosen rows (`batch_select_indices`) but cannot put two caches of different
    lengths side by side, nor drop columns from the left, which joining and leaving need; transformers' own
    continuous batching (a paged cache) takes token ids only, and media tokens are input embeddings."""

    def __init__(self, layers: list[LayerKV], mask: torch.Tensor, positions: torch.Tensor, config: Any) -> None:
        self.cache = DynamicCache(ddp_cache_data=layers) if layers else DynamicCache(config=config)
        self.mask, self.positions, self.config = mask, positions, config

    def __len__(self) -> int:
        return self.mask.shape[0]

    @classmethod
    def prefill(cls, llm: Any, prompts: Sequence[torch.Tensor], prefixes: Sequence[tuple[int, list[LayerKV]]] = (),
                ) -> tuple[BatchCache, torch.Tensor]:
        """Run the LLM on a group of prompts (`[length_i, hidden]` input embeddings each) in one forward, each after
        its already computed prefix (`(length, keys/values of one row)` from `PrefixCache.longest`; none: from the
        start): `(their BatchCache, each prompt's next-token logits [rows, vocab])`."""
        prefixes = list(prefixes) or [(0, [])] * len(prompts)
        longest_prefix = max(n for n, _ in prefixes)
        rows, device = len(prompts), prompts[0].device
        layers = []
        if longest_prefix:
            template = next(kv for n, kv in prefixes if n)
            for layer, (keys, values) in enumerate(template):
                shape = (rows, keys.shape[1], longest_prefix, keys.shape[3])
                row_keys, row_values = keys.new_zeros(shape), values.new_zeros(shape)
                for row, (n, kv) in enumerate(prefixes):
                    if n:
                        row_keys[row, :, longest_prefix - n:] = kv[layer][0][0, :, :n]
                        row_values[row, :, longest_prefix - n:] = kv[layer][1][0, :, :n]
                layers.append((row_keys, row_values))
        lengths = torch.tensor([n for n, _ in prefixes], device=device)
        mask = (torch.arange(longest_prefix, device=device) >= longest_prefix - lengths[:, None]).long()
        batch = cls(layers, mask, lengths.clone(), llm.config)
        rests = [prompt[n:] for prompt, (n, _) in zip(prompts, prefixes)]
        width = max(len(rest) for rest in rests)
        embeds = prompts[0].new_zeros((rows, width, prompts[0].shape[-1]))
        new_mask = torch.zeros((rows, width), dtype=torch.long, device=device)
        for row, rest in enumerate(rests):
            embeds[row, width - len(rest):] = rest
            new_mask[row, width - len(rest):] = 1
        return batch, batch.forward(llm, embeds, new_mask)

    def forward(self, llm: Any, embeds: torch.Tensor, new_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Append columns (`embeds`, `[rows, columns, hidden]`; `new_mask` marks the used ones, default all) to every
        row and return each row's logits at the last column (`[rows, vocab]`, float32)."""
        if new_mask is None:
            new_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        position_ids = (self.positions[:, None] + new_mask.cumsum(1) - 1).clamp(min=0)
        self.mask = torch.cat([self.mask, new_mask], 1)
        self.positions = self.positions + new_mask.sum(1)
        base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
        keep = {"logits_to_keep": 1} if _forward_takes_logits_to_keep(type(base)) else {}
        out = llm(inputs_embeds=embeds, attention_mask=self.mask, position_ids=position_ids, use_cache=True,
                  **{CACHE_KWARG: self.cache}, **keep)
        return out.logits[:, -1].float()

    def join(self, other: BatchCache) -> None:
        """Put `other`'s rows after this cache's rows, the shorter cache left-padded with masked zero columns."""
        length = max(self.mask.shape[1], other.mask.shape[1])
        layers = [(torch.cat([_left_pad(k, length, 2), _left_pad(k2, length, 2)]),
                   torch.cat([_left_pad(v, length, 2), _left_pad(v2, length, 2)]))
                  for (k, v), (k2, v2) in zip(_layers(self.cache), _layers(other.cache))]
        self.cache = DynamicCache(ddp_cache_data=layers)
        self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(other.mask, length, 1)])
        self.positions = torch.cat([self.positions, other.positions])

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in this order), and drop the leading columns none of them uses."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        used = self.mask.any(0)
        first = int(used.long().argmax()) if bool(used.any()) else self.mask.shape[1]
        if first:
            layers = [(k[:, :, first:], v[:, :, first:]) for k, v in _layers(self.cache)]
            self.cache = DynamicCache(ddp_cache_data=layers)
            self.mask = self.mask[:, first:]

    def row(self, index: int) -> list[LayerKV]:
        """Row `index`'s keys/values at its used columns, in order (`[1, kv_heads, positions, head_dim]` per layer)."""
        columns = self.mask[index].nonzero().flatten()
        return [(k[index:index + 1, :, columns], v[index:index + 1, :, columns]) for k, v in _layers(self.cache)]


class PrefixCache:
    """Keys/values of recent prompts (and of finished replies), for later prompts that begin the same way: the same
    system prompt, the same media, an earlier turn of the same conversation.

    A prompt takes the longest prefix any entry shares with it, compared on input embeddings as `ConversationCache`
    does (media tokens have no ids), and only the rest is computed; its last position is always computed (its logits
    are needed). Least recently used entries go first when the entries' keys/values pass `max_bytes`; an entry that
    another one begins with is dropped as redundant.

    Args:
        max_bytes: most bytes of keys/values held (0: nothing is reused).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: list[tuple[torch.Tensor, list[LayerKV]]] = []  # (embeds [n, hidden], keys/values), LRU first
        self.reused = 0  # positions taken from entries, in all
        self.computed = 0  # positions `prefill` computed, in all (see `longest`)

    @property
    def bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for _, layers in self.entries for k, v in layers)

    def _best(self, embeds: torch.Tensor) -> tuple[int, int | None]:
        """(shared positions, entry index) of the entry that shares the longest prefix with `embeds`."""
        best, found = 0, None
        for index, (held, _) in enumerate(self.entries):
            length = min(len(held), len(embeds) - 1)
            shared = int((held[:length] == embeds[:length]).all(-1).cumprod(0).sum())
            if shared > best:
                best, found = shared, index
        return best, found

    def peek(self, embeds: torch.Tensor) -> int:
        """How many positions of `embeds` (`[length, hidden]`) `longest` would take from an entry."""
        return self._best(embeds)[0]

    def longest(self, embeds: torch.Tensor) -> tuple[int, list[LayerKV]]:
        """`(n, keys/values)` of the longest prefix of `embeds` (`[length, hidden]`) an entry holds, n < length."""
        best, found = self._best(embeds)
        self.reused += best
        self.computed += len(embeds) - best
        if found is None:
            return 0, []
        entry = self.entries.pop(found)
        self.entries.append(entry)  # most recently used last
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in entry[1]]

    def add(self, embeds: torch.Tensor, layers: list[LayerKV]) -> None:
        """Hold the keys/values of `embeds` (`[length, hidden]`; `layers` from `BatchCache.row`)."""
        if self.max_bytes <= 0 or not len(embeds):
            return
        for held, _ in self.entries:
            if len(held) >= len(embeds) and torch.equal(held[:len(embeds)], embeds):
                return  # already held as (the start of) an entry
        self.entries = [(held, kv) for held, kv in self.entries
                        if not (len(held) < len(embeds) and torch.equal(embeds[:len(held)], held))]
        self.entries.append((embeds, layers))
        while self.entries and self.bytes > self.max_bytes:
            self.entries.pop(0)
