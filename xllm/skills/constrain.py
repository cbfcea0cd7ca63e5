"""Decoding constrained to one tool call whose arguments parse and fit the tool's schema, whatever the model.

OpenAI's `tool_choice: "required"` (any of the tools) and a named function (that one) promise a call. A
`CallConstraint` makes the promise hold: at each step of transformers' `generate` it masks every token that
cannot continue `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (the Hermes block
`xllm.data.tool_format` reads, with `json.dumps`'s separators), then allows only the end of the turn. The grammar
is llguidance's (a Lark rule around the tools' JSON schemas, compiled against the tokenizer's vocabulary): a
well-kept Rust matcher that vLLM and SGLang use, so xllm writes only the per-row glue to `generate`.

A call can still be cut by `max_new_tokens`; the reply is then incomplete text (`finish_reason: "length"`).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor

from xllm.data.tool_format import CALL_CLOSE, CALL_OPEN, tool_name

# Calls written as json.dumps writes them, with no freedom in whitespace (a small model could loop on it).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_vocabularies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {eos ids: LLTokenizer}


def _llg_tokenizer(tokenizer: Any, eos_ids: tuple[int, ...]) -> Any:
    """llguidance's view of a Hugging Face fast tokenizer (~1.7 s for SmolLM2's 49k tokens: built once)."""
    import llguidance.hf

    per_tokenizer = _vocabularies.setdefault(tokenizer, {})
    if eos_ids not in per_tokenizer:
        per_tokenizer[eos_ids] = llguidance.hf.from_tokenizer(tokenizer, eos_token=list(eos_ids) or None)
    return per_tokenizer[eos_ids]


def call_schema(tools: Sequence[Mapping[str, Any]], name: str | None = None) -> dict[str, Any]:
    """The JSON schema of one call object `{"name", "arguments"}` to any of `tools` (or to `name` only). Arguments
    that the tool's schema leaves open get `additionalProperties: false`: still calls that fit the schema, and a
    model cannot wander into invented keys."""
    options = []
    for tool in tools:
        if name is not None and tool_name(tool) != name:
            continue
        parameters = dict(tool.get("function", tool).get("parameters") or {"type": "object", "properties": {}})
        parameters.setdefault("type", "object")
        parameters.setdefault("properties", {})
        parameters.setdefault("additionalProperties", False)
        options.append({"type": "object", "properties": {"name": {"const": tool_name(tool)}, "arguments": parameters},
                        "required": ["name", "arguments"], "additionalProperties": False})
    if not options:
        raise ValueError(f"no tool named {name!r} among the tools offered" if name else "no tools to call")
    return {"x-guidance": JSON_LAYOUT, **(options[0] if len(options) == 1 else {"anyOf": options})}


class CallConstraint:
    """One generation constrained to one call of `tools` (or of the tool `name`).

    Args:
        tokenizer: the LLM's fast tokenizer.
        tools: OpenAI tool declarations.
        name: the one tool to call (OpenAI's named `tool_choice`); None: any of them (`required`).
        eos_ids: the ids that end the turn (default: the tokenizer's end of sequence).

    Raises `ValueError` when the schema cannot be compiled (e.g. a keyword llguidance does not implement)."""

    def __init__(self, tokenizer: Any, tools: Sequence[Mapping[str, Any]], name: str | None = None,
                 eos_ids: Sequence[int] = ()) -> None:
        import llguidance

        eos = tuple(sorted(set(eos_ids))) or (tokenizer.eos_token_id,)
        self.eos = set(eos)
        # One optional leading space or newline: templates differ in what follows the assistant cue.
        lark = (f'start: /[ \\n]?/ {json.dumps(CALL_OPEN + chr(10))} call {json.dumps(chr(10) + CALL_CLOSE)}\n'
                f'call: %json {json.dumps(call_schema(tools, name))}\n')
        self.matcher = llguidance.LLMatcher(_llg_tokenizer(tokenizer, eos), llguidance.LLMatcher.grammar_from_lark(lark),
                                            log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"the tools' schemas cannot constrain decoding: {self.matcher.get_error()}")
        self.consumed = 0
        self.free = False  # done (the call and its end were written) or derailed: the row decodes freely

    def mask(self, generated: Sequence[int], vocab_size: int) -> torch.Tensor | None:
        """After the row has generated `generated` (all its new ids so far): which ids may come next (`[vocab_size]`
        booleans), or None when the row is no longer constrained."""
        for token in generated[self.consumed:]:
            self.consumed += 1
            if self.free:
                continue
            if not self.matcher.consume_token(int(token)):
                self.free = True  # only when something after this processor changed the choice: leave the row be
            elif int(token) in self.eos:
                self.free = True
        if self.free:
            return None
        allowed = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8) > 0
        out = torch.zeros(vocab_size, dtype=torch.bool)
        n = min(vocab_size, allowed.numel())
        out[:n] = allowed[:n]
        return out


class RowConstraints(LogitsProcessor):
    """Per-row constraints in one batched `generate` (None: that row is free). Put it first among the logits
    processors, so sampling and per-row temperature only ever see allowed tokens."""

    def __init__(self, constraints: Sequence[CallConstraint | None]) -> None:
        self.constraints = list(constraints)
        self.start: int | None = None  # input_ids' length at the first step: what the rows generate comes after

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        for row, constraint in enumerate(self.constraints):
            if constraint is None:
                continue
            allowed = constraint.mask(input_ids[row, self.start:].tolist(), scores.shape[-1])
            if allowed is not None:
                scores[row] = scores[row].masked_fill(~allowed.to(scores.device), float("-inf"))
        return scores
