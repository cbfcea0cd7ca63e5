"""How tool use looks as text: the Hermes format (Qwen2.5, Hermes, vLLM's `hermes` parser), written and read here.

A conversation's tool parts lower onto the three roles every chat template renders:

- the tools a conversation may call become a block in its system message (`<tools>` one JSON schema a line);
- an assistant turn's calls follow its text as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`;
- a tool's result becomes a user turn `<tool_response>\\n...\\n</tool_response>` (consecutive results share one, as
  Qwen2.5's template writes them), so it is never a label: only assistant turns are.

`parse_reply` reads a generated reply back: its calls and the text around them. A reply whose call block is not
a JSON object with a `name` and `arguments` (or names a tool that was not offered) is answered as plain text,
`malformed` saying why, as vLLM's hermes parser does — never an exception.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"

# Qwen2.5's wording (the Hermes format's best-known trained users): a model that knows it needs no fine-tuning.
TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_POSTAMBLE = (
    "</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
    "</tool_call>"
)


@dataclass
class ToolCall:
    """One call: the tool's name, its arguments, and the id that its result refers back to."""

    name: str
    arguments: dict[str, Any]
    id: str = ""


@dataclass
class ParsedReply:
    """A generated reply read back: the text outside call blocks (`content`), the calls in order, and — when a call
    block could not be read — `malformed` (why), with `calls` empty and `content` the whole reply."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)
    malformed: str | None = None


def tool_name(tool: Mapping[str, Any]) -> str:
    """The name of a tool declaration, OpenAI's `{"type": "function", "function": {...}}` or a bare function."""
    function = tool.get("function", tool)
    return function["name"] if isinstance(function, Mapping) and isinstance(function.get("name"), str) else ""


def declarations_text(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system-message block that declares `tools` (each an OpenAI tool or a bare function schema)."""
    lines = [json.dumps(t if "function" in t else {"type": "function", "function": t}) for t in tools]
    return "\n".join([TOOLS_PREAMBLE, *lines, TOOLS_POSTAMBLE])


def call_text(call: ToolCall) -> str:
    """One call as the model writes it (`json.dumps`'s separators, which the constrained decoder also uses)."""
    return f"{CALL_OPEN}\n{json.dumps({'name': call.name, 'arguments': call.arguments})}\n{CALL_CLOSE}"


def assistant_text(content: str, calls: Sequence[ToolCall], thoughts: str = "") -> str:
    """An assistant turn's whole text: its thoughts (LLaVA-Plus), its words, then its calls, a line apart."""
    return "\n".join(part for part in (thoughts, content, *map(call_text, calls)) if part)


def responses_text(results: Sequence[str]) -> str:
    """The user turn that carries one or more consecutive tool results."""
    return "\n".join(f"{RESPONSE_OPEN}\n{result}\n{RESPONSE_CLOSE}" for result in results)


_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|\Z)", re.DOTALL)


def read_call(block: str, closed: bool = True) -> ToolCall | str:
    """A call block's JSON as a `ToolCall`, or why it is not one. An unclosed block (the reply ended inside it) may
    end in part of `</tool_call>` after its JSON."""
    try:
        data, end = json.JSONDecoder().raw_decode(block)
    except json.JSONDecodeError as err:
        return f"the call is not valid JSON ({err.msg} at character {err.pos})"
    rest = block[end:].strip()
    if rest and (closed or not CALL_CLOSE.startswith(rest)):
        return f"the call has text after its JSON object: {rest[:40]!r}"
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return "the call is not a JSON object with a string 'name'"
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string, as OpenAI sends them
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return f"the arguments of {data['name']} are not a JSON object"
    if not isinstance(arguments, dict):
        return f"the arguments of {data['name']} are not a JSON object"
    return ToolCall(data["name"], arguments)


def parse_reply(text: str, tool_names: Sequence[str] | None = None) -> ParsedReply:
    """The calls in a generated reply (Hermes `<tool_call>` blocks; an unclosed last block is read to the end) and the
    text around them. With `tool_names`, a call to any other name makes the reply malformed too."""
    calls: list[ToolCall] = []
    outside: list[str] = []
    last = 0
    for match in _BLOCK.finditer(text):
        outside.append(text[last:match.start()])
        last = match.end()
        call = read_call(match.group(1).strip(), closed=match.group(0).endswith(CALL_CLOSE))
        if isinstance(call, str):
            return ParsedReply(text.strip(), [], call)
        if tool_names is not None and call.name not in tool_names:
            return ParsedReply(text.strip(), [], f"the call names {call.name!r}, which is not one of the tools offered "
                                                 f"({', '.join(tool_names) or 'none'})")
        calls.append(call)
    outside.append(text[last:])
    return ParsedReply("".join(outside).strip(), calls)
