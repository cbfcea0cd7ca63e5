"""OpenAI function calling for `xllm serve`: the request's `tools` and `tool_choice`, its `tool_calls` / `role:
"tool"` history, and the reply's `tool_calls` (whole, or streamed as `delta.tool_calls[index]`).

The server only *declares* tools and reads calls: the client runs them and sends each result back as a
`role: "tool"` message, as OpenAI's protocol says, so nothing a request names is ever imported or run here.

- `tool_choice: "auto"` (the default with tools): the tools are declared in the prompt and the reply is read for
  Hermes `<tool_call>` blocks (`xllm.data.tool_format`). A block that does not parse, or that names a tool not
  offered, leaves the reply as text (`content`), never an error.
- `"required"` / `{"type": "function", "function": {"name": ...}}`: decoding is constrained to one call of any
  tool / of that one, with arguments that parse and fit its schema (`xllm.skills.constrain`), whatever the model.
- `"none"`: the tools are not declared and nothing is read as a call.

`serve.py` and its two schedulers (`batching.py`, `continuous.py`) call these through a few marked hooks; everything
about tools lives here.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jsonschema

from xllm.data.records import BadSampleError, normalize_tools, normalize_turns
from xllm.data.tool_format import CALL_OPEN, ParsedReply, parse_reply, tool_name
from xllm.skills.constrain import CallConstraint

MESSAGE_TOOL_FIELDS = ("tool_calls", "tool_call_id", "name")


class ToolRequestError(ValueError):
    """A request whose tools, tool choice or tool messages cannot be used (answered 400, naming `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def message_tool_fields(message: Mapping[str, Any]) -> dict[str, Any]:
    """The tool fields of an OpenAI message, to ride along with its turn (checked by `checked_turns`)."""
    return {key: message[key] for key in MESSAGE_TOOL_FIELDS if message.get(key) is not None}


def checked_turns(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A request's turns in xllm's form (calls and results paired by id), or a 400 that says what is wrong."""
    try:
        return normalize_turns(turns, "messages")
    except BadSampleError as err:
        raise ToolRequestError(err.problem, "messages") from err


def tool_settings(body: Mapping[str, Any]) -> dict[str, Any]:
    """`{"tools": declared tools or None, "tool_choice": None | "required" | a name}` from a request: the tools go
    into the prompt unless `tool_choice` is `none`; a choice other than `auto` constrains decoding."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice not in (None, "none"):
            raise ToolRequestError("tool_choice needs tools", "tool_choice")
        return {"tools": None, "tool_choice": None}
    try:
        tools = normalize_tools(tools, "tools")
    except BadSampleError as err:
        raise ToolRequestError(err.problem, "tools") from err
    names = [tool_name(t) for t in tools]
    if len(set(names)) != len(names):
        raise ToolRequestError("two tools share a name", "tools")
    for tool in tools:
        try:
            jsonschema.Draft202012Validator.check_schema(tool["function"]["parameters"])
        except jsonschema.SchemaError as err:
            raise ToolRequestError(f"tool {tool_name(tool)}: parameters are not a JSON schema: {err.message}",
                                   "tools") from err
    choice = "auto" if choice is None else choice
    if isinstance(choice, Mapping):
        function = choice.get("function")
        choice = function.get("name") if isinstance(function, Mapping) else None
        if choice not in names:
            raise ToolRequestError(f"tool_choice names {choice!r}, which is not one of the tools ({', '.join(names)})",
                                   "tool_choice")
    elif choice not in ("auto", "none", "required"):
        raise ToolRequestError("tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": "
                               "{\"name\": ...}}", "tool_choice")
    if choice == "none":
        return {"tools": None, "tool_choice": None}
    return {"tools": tools, "tool_choice": None if choice == "auto" else choice}


def with_constraint(settings: Mapping[str, Any], tokenizer: Any, eos_ids: Sequence[int]) -> dict[str, Any]:
    """The generation's settings with the constraint its `tool_choice` asks for (built here, in the request's thread:
    compiling a grammar is that request's work, and a schema it cannot compile is that request's 400)."""
    settings = dict(settings)
    choice = settings.pop("tool_choice", None)
    if choice is not None:
        settings["constraint"] = CallConstraint(tokenizer, settings["tools"], None if choice == "required" else choice,
                                                eos_ids)
    return settings


def openai_calls(parsed: ParsedReply) -> list[dict[str, Any]]:
    """The reply's calls in OpenAI's shape, each with a fresh id and its arguments as a JSON string."""
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call.name, "arguments": json.dumps(call.arguments)}} for call in parsed.calls]


def tool_reply(text: str, tools: Sequence[Mapping[str, Any]], finish: str | None) -> tuple[dict[str, Any], str | None]:
    """`(message, finish_reason)` of a reply to a request with tools: its calls (`finish_reason: "tool_calls"`) and
    the text around them, or — with no call, or a call that cannot be read — the text as it is."""
    parsed = parse_reply(text, [tool_name(t) for t in tools])
    if not parsed.calls:
        return {"role": "assistant", "content": parsed.content}, finish
    return {"role": "assistant", "content": parsed.content or None, "tool_calls": openai_calls(parsed)}, "tool_calls"


class ToolCallStream:
    """A streamed reply to a request with tools, as `delta`s: text streams as it comes until a `<tool_call>` may be
    starting; from there the text is held to the end, then read as `tool_reply` reads it — each call one
    `delta.tool_calls[index]` (id, name and the whole arguments), or the held text as content if it is no call."""

    def __init__(self, tools: Sequence[Mapping[str, Any]]) -> None:
        self.names = [tool_name(t) for t in tools]
        self.text = ""  # everything generated so far
        self.sent = 0  # how much of it went out as content
        self.calls = False

    def feed(self, piece: str) -> list[dict[str, Any]]:
        self.text += piece
        start = self.text.find(CALL_OPEN, self.sent)
        end = start if start >= 0 else len(self.text) - _partial_open(self.text)
        if end <= self.sent:
            return []
        delta, self.sent = {"content": self.text[self.sent:end]}, end
        return [delta]

    def close(self) -> list[dict[str, Any]]:
        """The deltas for what was held back."""
        parsed = parse_reply(self.text, self.names)
        rest = self.text[self.sent:]
        if not parsed.calls:
            return [{"content": rest}] if rest else []
        self.calls = True
        outside = parse_reply(rest, self.names).content
        deltas = [{"content": outside}] if outside else []
        return deltas + [{"tool_calls": [{"index": i, **call}]} for i, call in enumerate(openai_calls(parsed))]

    def finish_reason(self, finish: str | None) -> str | None:
        return "tool_calls" if self.calls else finish


def _partial_open(text: str) -> int:
    """How many characters at the end of `text` could be the start of `<tool_call>` (held back until known)."""
    for size in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-size:]):
            return size
    return 0
