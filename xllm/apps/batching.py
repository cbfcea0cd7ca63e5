"""Requests that arrive together generate together: dynamic batching for `xllm serve`, and the one request's state
(`Generation`) that both of serve's schedulers fill.

`BatchGenerator` (`xllm serve --batching dynamic`): one worker thread owns the model. It takes the first waiting
request, gathers whatever else arrives within a short window (up to `max_batch`), and runs one left-padded
`generate` over all of them; each row keeps its own `max_tokens`, temperature and stop strings, streams its own
text, and finishes on its own (the others go on). Requests that arrive while a batch runs wait for the next one,
and a batch runs until its longest reply ends: `xllm.apps.continuous` (the default) admits and retires rows between
decode steps instead. The queue is bounded: a full queue is refused at once (`QueueFull`, answered 503), never a
hang.

Why by hand: the generation loop is transformers' own; what is written here is only the per-row bookkeeping it
calls each step (a `StoppingCriteria` that adds each row's new token to its `Generation`, and a `LogitsProcessor`
for per-row temperature).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from xllm.model import XLLM
from xllm.skills.constrain import RowConstraints


def end_ids(model: XLLM) -> set[int]:
    """The ids `generate` ends a row at: the generation config's (it may list several) and the tokenizer's."""
    configured = getattr(model.llm.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, (list, tuple)) else [configured]
    return {i for i in (*ids, model.tokenizer.eos_token_id) if i is not None}


class QueueFull(RuntimeError):
    """The server has as much queued work as it accepts; the client should retry later."""


def enqueue(waiting: "queue.Queue[Generation]", generation: Generation) -> Generation:
    """Put a request in a scheduler's queue, or refuse it with `QueueFull` (both schedulers' `submit`)."""
    try:
        waiting.put_nowait(generation)
    except queue.Full:
        raise QueueFull(f"the server has {waiting.maxsize} requests waiting; retry later") from None
    return generation


@dataclass(eq=False)  # one request's state: two are the same only if they are one object
class Generation:
    """One request's generation: what to generate, and the text as it is produced (read with `pieces()`).

    turns: the conversation; media: modality -> loaded items (decoded by the request's thread, so a bad file is
    that request's 400, not the batch's); stop: strings that end the reply (not included)."""

    turns: list[dict[str, str]]
    media: dict[str, list[Any]]
    max_new_tokens: int = 256
    temperature: float = 0.0
    stop: list[str] = field(default_factory=list)
    text: str = ""
    tokens: int = 0
    finish: str | None = None  # "stop" (end of turn or a stop string), "length", "cancelled" or "error"
    error: BaseException | None = None
    tools: list[dict[str, Any]] | None = None  # tools hook: declared in the prompt (xllm.apps.tool_calls)
    constraint: Any = None  # tools hook: a `CallConstraint` this row's tokens must follow, or None
    cancelled: bool = False  # set by `cancel()`: the scheduler frees the row at its next step
    _ids: list[int] = field(default_factory=list)
    _sent: int = 0
    _queue: queue.Queue = field(default_factory=queue.Queue)

    def pieces(self) -> Iterator[str]:
        """The reply's text piece by piece as it is generated; raises the generation's error, if any."""
        while True:
            piece = self._queue.get()
            if piece is None:
                break
            yield piece
        if self.error is not None:
            raise self.error

    def wait(self) -> str:
        """The whole reply (stripped, as `XLLM.chat` returns it)."""
        for _ in self.pieces():
            pass
        return self.text.strip()

    def cancel(self) -> None:
        """Stop generating (the client went away): the scheduler frees this row before its next step."""
        self.cancelled = True

    def add_token(self, token: int, eos_ids: set[int], tokenizer: Any) -> bool:
        """Take the next generated token: end of turn, or new text (cut at a stop string; `max_new_tokens`
        reached ends it too), streamed as it comes. True when the reply is finished."""
        if token in eos_ids:
            self.finish = "stop"
        else:
            self._ids.append(token)
            self.tokens += 1
            self.text = tokenizer.decode(self._ids, skip_special_tokens=True)
            cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.finish = self.text[:cut], "stop"
            elif self.tokens >= self.max_new_tokens:
                self.finish = "length"
        self._emit(final=self.finish is not None)
        return self.finish is not None

    def end(self, finish: str, error: BaseException | None = None) -> None:
        """Finish without a new token (cancelled, failed, or out of the batch's length): the stream ends."""
        if self.finish is None:
            self.finish, self.error = finish, error
            self._emit(final=True)

    def _emit(self, final: bool) -> None:
        # Hold back what could still become a stop string or an incomplete character.
        hold = 0 if final else max((len(s) - 1 for s in self.stop), default=0)
        end = len(self.text) - hold
        if not final and self.text.endswith("\ufffd"):
            end = min(end, len(self.text) - 1)
        if end > self._sent:
            self._queue.put(self.text[self._sent:end])
            self._sent = end
        if final:
            self._queue.put(None)


class RowBookkeeping(StoppingCriteria):
    """Called by `generate` after each step: adds each row's new token to its `Generation`, and says which rows are
    done (end of turn, a stop string, their own `max_new_tokens`, or cancelled)."""

    def __init__(self, rows: list[Generation], tokenizer: Any, eos_ids: set[int]) -> None:
        self.rows, self.tokenizer, self.eos = rows, tokenizer, eos_ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.BoolTensor:
        done = torch.zeros(len(self.rows), dtype=torch.bool, device=input_ids.device)
        for row, generation in enumerate(self.rows):
            if generation.cancelled:
                generation.end("cancelled")
            if generation.finish is None:
                generation.add_token(int(input_ids[row, -1]), self.eos, self.tokenizer)
            done[row] = generation.finish is not None
        return done


class RowTemperature(LogitsProcessor):
    """Per-row sampling in one batch: greedy rows keep only their best token, the others are divided by their
    temperature (then transformers' own sampling warpers apply, as for a single request)."""

    def __init__(self, temperatures: list[float]) -> None:
        self.temperatures = temperatures

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = scores.clone()
        for row, temperature in enumerate(self.temperatures):
            if temperature > 0:
                out[row] = scores[row] / temperature
            else:
                best = scores[row].argmax()
                out[row] = torch.full_like(scores[row], float("-inf"))
                out[row, best] = scores[row, best]
        return out


class BatchGenerator:
    """The one worker that runs every generation of a model, in batches.

    Args:
        model: the loaded model.
        max_batch: most requests generated together.
        max_queue: most requests waiting; more are refused with `QueueFull`.
        window_s: how long the first request of a batch waits for others to join it.
    """

    def __init__(self, model: XLLM, max_batch: int = 8, max_queue: int = 64, window_s: float = 0.02) -> None:
        self.model, self.max_batch, self.window_s = model, max_batch, window_s
        self.waiting: queue.Queue[Generation] = queue.Queue(maxsize=max_queue)
        self.batches: list[int] = []  # the size of each batch run (for tests and logs)
        self.eos_ids = end_ids(model)
        threading.Thread(target=self._loop, daemon=True, name="xllm-batches").start()

    def submit(self, generation: Generation) -> Generation:
        return enqueue(self.waiting, generation)

    def _gather(self) -> list[Generation]:
        batch = [self.waiting.get()]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self.waiting.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._gather()
            try:
                self.run(batch)
            except BaseException as err:  # reported to every request of the batch; the worker goes on
                for generation in batch:
                    generation.end("error", err)

    @torch.no_grad()
    def run(self, batch: list[Generation]) -> None:
        """Generate every request of `batch` together (called by the worker; callable directly in tests)."""
        self.batches.append(len(batch))
        prompts = self.model.processor()([g.turns for g in batch], [g.media for g in batch],
                                         tools=[g.tools for g in batch])  # tools hook
        sampling = any(g.temperature > 0 for g in batch)
        bookkeeping = RowBookkeeping(batch, self.model.tokenizer, self.eos_ids)
        settings: dict[str, Any] = {"do_sample": sampling, "stopping_criteria": StoppingCriteriaList([bookkeeping])}
        # tools hook: constrained rows first, so temperature and sampling only see the tokens a call allows
        processors = [RowConstraints([g.constraint for g in batch])] if any(g.constraint for g in batch) else []
        if sampling:
            processors.append(RowTemperature([g.temperature for g in batch]))
        if processors:
            settings["logits_processor"] = LogitsProcessorList(processors)
        self.model.generate_ids(prompts, max(g.max_new_tokens for g in batch), **settings)
        for generation in batch:  # rows that ran to the batch's length without their own end
            generation.end("length")
