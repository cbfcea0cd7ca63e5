"""Continuous batching for `xllm serve`: rows join and leave between decode steps, on spliced input embeddings.

One worker thread owns the model and loops: admit what waits (up to `max_batch` rows in all), then run one decode
step for every active row. A row leaves the step it ends (its own `max_new_tokens`, a stop string, an end id, or
its client going away), so no request waits for another's reply to finish. Admission is a batched prefill of the
newcomers — their media encoded and spliced together (`XLLM.embed_prompts`), then one LLM forward over what their
prompts do not share with a recent prompt (`PrefixCache`) — whose keys/values are joined to the running cache
(`BatchCache`). Each row keeps its own temperature, stop strings and stream, as with `xllm.apps.batching`, whose
`Generation` it fills, and its tools as `xllm.apps.tool_calls` sets them (declared in the prompt; a `CallConstraint`
masks the row's logits before its token is chosen); the queue is bounded the same way (`QueueFull`, answered 503).

Why by hand: transformers 5.24's continuous batching (`generate_batch`, `ContinuousBatchingManager`) takes token
ids only, and media tokens are input embeddings; the loop here is the LLM's own forward with a transformers
`DynamicCache`, one step at a time, and transformers' sampling warpers.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from xllm.apps.batching import Generation, end_ids, enqueue
from xllm.generation import BatchCache, PrefixCache, check_joinable
from xllm.llm import input_embeddings
from xllm.model import XLLM

# A group's prompts that share this many more positions with each other than with any held prefix compute the
# shared part once, first (eight clients with one new system prompt at once).
SHARED_GROUP_PREFIX = 32


class ContinuousBatch:
    """The rows decoding together, stepped by the caller: `admit` newcomers, `step` every row once.

    Each row computes what it would alone (see `BatchCache`), so its greedy reply is `XLLM.chat`'s.

    Args:
        model: the loaded model.
        prefix_cache_mb: megabytes of keys/values of recent prompts and replies kept for reuse (0: none).
    """

    def __init__(self, model: XLLM, prefix_cache_mb: float = 256.0) -> None:
        check_joinable(model.llm)
        self.model = model
        self.rows: list[Generation] = []
        self.prompts: list[torch.Tensor] = []  # each row's prompt embeddings (its cache's first columns)
        self.cache: BatchCache | None = None
        self.next_ids = torch.zeros(0, dtype=torch.long)  # each row's last token, fed at the next step
        self.prefixes = PrefixCache(int(prefix_cache_mb * 2**20))
        self.eos_ids = end_ids(model)
        self.stats: Counter[str] = Counter()  # steps, row_steps, admitted, prefills, finished, cancelled, errors
        # Sampled rows: their own temperature, then the LLM's top-k / top-p as `generate` applies them (its default
        # top-k is 50).
        config = model.llm.generation_config
        warpers = [TopKLogitsWarper(config.top_k if config.top_k is not None else 50)]
        if config.top_p is not None and config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(config.top_p))
        self.warpers = LogitsProcessorList(warpers)

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def admit(self, generations: Sequence[Generation]) -> None:
        """Prefill `generations` together and add them to the running rows; their first token is streamed now."""
        generations = [g for g in generations if not self._cancelled(g)]
        if not generations:
            return
        self.stats["admitted"] += len(generations)
        self.stats["prefills"] += 1
        batch = self.model.processor()([g.turns for g in generations], [g.media for g in generations],
                                       tools=[g.tools for g in generations])  # tools hook
        embeds, mask = self.model.embed_prompts(batch)
        prompts = [row[keep.bool()] for row, keep in zip(embeds, mask)]
        self._compute_shared_prefixes(prompts)
        cache, logits = BatchCache.prefill(self.model.llm, prompts, [self.prefixes.longest(p) for p in prompts])
        for row, prompt in enumerate(prompts):
            self.prefixes.add(prompt, cache.row(row))
        ids = self._choose(logits, generations)
        if self.cache is None:
            self.cache = cache
        else:
            self.cache.join(cache)
        self.rows += generations
        self.prompts += prompts
        self.next_ids = torch.cat([self.next_ids.to(ids.device), ids])
        self._retire([g.add_token(int(t), self.eos_ids, self.model.tokenizer) for g, t in zip(generations, ids)])

    @torch.no_grad()
    def step(self) -> None:
        """One decode step for every row: feed each row's last token, take its next one, retire the finished."""
        self._retire([self._cancelled(g) for g in self.rows])
        if not self.rows:
            return
        self.stats["steps"] += 1
        self.stats["row_steps"] += len(self.rows)
        embeds = input_embeddings(self.model.llm)(self.next_ids[:, None])
        ids = self._choose(self.cache.forward(self.model.llm, embeds), self.rows)
        self.next_ids = ids
        self._retire([g.add_token(int(t), self.eos_ids, self.model.tokenizer) for g, t in zip(self.rows, ids)])

    def fail(self, error: BaseException) -> None:
        """End every row with `error` (a step failed: the cache is no longer trustworthy) and start empty."""
        self.stats["errors"] += len(self.rows)
        for generation in self.rows:
            generation.end("error", error)
        self.rows, self.prompts, self.cache = [], [], None
        self.next_ids = self.next_ids[:0]

    def run(self, generations: Sequence[Generation]) -> None:
        """Generate `generations` to their ends: admit them together, then step until every row has left."""
        self.admit(generations)
        while self.rows:
            self.step()

    # --- bookkeeping ---------------------------------------------------------------------------------
    def _cancelled(self, generation: Generation) -> bool:
        if generation.cancelled and generation.finish is None:
            generation.end("cancelled")
            self.stats["cancelled"] += 1
        return generation.finish is not None

    def _choose(self, logits: torch.Tensor, rows: Sequence[Generation]) -> torch.Tensor:
        """Each row's next token: the best one for greedy rows, a sample for the others (their temperature, then
        the warpers)."""
        for row, generation in enumerate(rows):  # tools hook: first, so sampling only sees the tokens a call allows
            if generation.constraint is not None:
                allowed = generation.constraint.mask(generation._ids, logits.shape[-1])
                if allowed is not None:
                    logits[row] = logits[row].masked_fill(~allowed.to(logits.device), float("-inf"))
        ids = logits.argmax(-1)
        sampled = [row for row, g in enumerate(rows) if g.temperature > 0]
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            temperatures = torch.tensor([rows[r].temperature for r in sampled], device=logits.device)
            scores = self.warpers(None, logits[index] / temperatures[:, None])
            ids[index] = torch.multinomial(scores.softmax(-1), 1).flatten()
        return ids

    def _retire(self, done: list[bool]) -> None:
        """Drop the finished rows; a finished reply's keys/values are kept for a next turn that repeats it."""
        if not any(done):
            return
        for row, finished in enumerate(done):
            generation = self.rows[row]
            if finished and generation.finish in ("stop", "length"):
                self.stats["finished"] += 1
                # The reply's tokens fed back so far (not the last one) follow the prompt in the row's cache.
                fed = int(self.cache.positions[row]) - len(self.prompts[row])
                if fed > 0:
                    ids = torch.tensor(generation._ids[:fed], device=self.next_ids.device)
                    reply = input_embeddings(self.model.llm)(ids)
                    self.prefixes.add(torch.cat([self.prompts[row], reply]), self.cache.row(row))
        keep = [row for row, finished in enumerate(done) if not finished]
        self.rows = [self.rows[r] for r in keep]
        self.prompts = [self.prompts[r] for r in keep]
        self.next_ids = self.next_ids[keep]
        if keep:
            self.cache.keep(keep)
        else:
            self.cache = None

    def _compute_shared_prefixes(self, prompts: list[torch.Tensor]) -> None:
        """Compute once, first, what several prompts of a group share beyond any held prefix (the same new system
        prompt, or media, arriving together), so that each then takes it from `prefixes`."""
        if self.prefixes.max_bytes <= 0:
            return
        for _ in range(len(prompts) - 1):
            held = [self.prefixes.peek(p) for p in prompts]
            best, shared = 0, None
            for i in range(len(prompts)):
                for j in range(i + 1, len(prompts)):
                    length = min(len(prompts[i]), len(prompts[j])) - 1
                    n = int((prompts[i][:length] == prompts[j][:length]).all(-1).cumprod(0).sum())
                    if n - max(held[i], held[j]) >= SHARED_GROUP_PREFIX and n > best:
                        best, shared = n, prompts[i][:n]
            if shared is None:
                return
            self.stats["prefills"] += 1
            cache, _ = BatchCache.prefill(self.model.llm, [shared], [self.prefixes.longest(shared)])
            self.prefixes.add(shared, cache.row(0))


class ContinuousBatcher:
    """The one worker that runs every generation of a model, rows joining and leaving between decode steps.

    Args:
        model: the loaded model.
        max_batch: most rows decoding together.
        max_queue: most requests waiting; more are refused with `QueueFull`.
        prefix_cache_mb: megabytes of keys/values of recent prompts and replies kept for reuse (0: none).
    """

    def __init__(self, model: XLLM, max_batch: int = 8, max_queue: int = 64, prefix_cache_mb: float = 256.0) -> None:
        self.batch = ContinuousBatch(model, prefix_cache_mb)
        self.max_batch, self.eos_ids = max_batch, self.batch.eos_ids
        self.waiting: queue.Queue[Generation] = queue.Queue(maxsize=max_queue)
        threading.Thread(target=self._loop, daemon=True, name="xllm-continuous").start()

    def submit(self, generation: Generation) -> Generation:
        return enqueue(self.waiting, generation)

    def _take(self) -> list[Generation]:
        """What waits, up to the free rows; blocks while no row is active (nothing else to do)."""
        taken: list[Generation] = []
        if not len(self.batch):
            taken.append(self.waiting.get())
        while len(self.batch) + len(taken) < self.max_batch:
            try:
                taken.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        return taken

    def _loop(self) -> None:
        while True:
            newcomers = self._take()
            try:
                self.batch.admit(newcomers)
            except BaseException as err:  # the newcomers' error; the running rows go on
                for generation in newcomers:
                    generation.end("error", err)
                if self.batch.rows and any(g in self.batch.rows for g in newcomers):
                    self.batch.fail(err)  # joined before failing: the running cache is unsure
            try:
                self.batch.step()
            except BaseException as err:  # reported to every running row; the worker goes on
                self.batch.fail(err)
