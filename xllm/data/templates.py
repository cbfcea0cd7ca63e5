"""Chat templates as *segments*: `(text, supervised)` pieces whose concatenation is the prompt string.

Supervised pieces are the assistant replies (with their end-of-turn token); everything else — system
prompt, user turns, role markers, media placeholders — gets label -100. Segments are tokenized one by one,
both in training and at inference, so the prompt the model sees when generating is token-for-token the
prompt it was trained on.

Three kinds: the tokenizer's own jinja `chat_template` (`template: tokenizer`), and the built-in
`vicuna_v1` (Vicuna v1.1 / X-LLM's ChatGLM-free setup) and `glm4` (GLM-4 chat).

Tool use (declarations, calls, results): the tokenizer's own template renders them where it writes Hermes
`<tool_call>` blocks (Qwen2.5, Hermes: checked once by rendering a probe); every other template — SmolLM2's
ignores `tools` — gets them lowered onto system/user/assistant text in the same Hermes format first
(`xllm.data.tool_format`), so calls are supervised with their assistant turn and tool results never are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from xllm.data.tool_format import ToolCall, assistant_text, call_text, declarations_text, responses_text

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
              "tool": "tool"}

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    thoughts: str = ""  # an assistant turn's LLaVA-Plus thoughts, written before its words
    name: str = ""  # a tool turn's tool
    tool_call_id: str = ""  # the call a tool turn answers


def message_of(turn: Mapping[str, Any]) -> Message:
    """A normalized turn (`xllm.data.records.normalize_turns`) as a `Message`."""
    calls = tuple(ToolCall(c["name"], c["arguments"], c["id"]) for c in turn.get("tool_calls", ()))
    return Message(turn["from"], turn["value"], calls, turn.get("thoughts", ""), turn.get("name", ""),
                   turn.get("tool_call_id", ""))


Segments = list[tuple[str, bool]]


def _with_system(messages: list[Message], system_prompt: str | None) -> list[Message]:
    if system_prompt is not None and not (messages and messages[0].role == "system"):
        return [Message("system", system_prompt), *messages]
    return messages


def _vicuna_v1(messages: list[Message], tokenizer, system_prompt, add_generation_prompt) -> Segments:
    eos = tokenizer.eos_token or ""
    messages = _with_system(messages, system_prompt or VICUNA_SYSTEM)
    segments: Segments = [(tokenizer.bos_token or "", False)] if tokenizer.bos_token else []
    prompt = ""
    for message in messages:
        if message.role == "system":
            prompt += message.content + " "
        elif message.role == "user":
            prompt += f"USER: {message.content} ASSISTANT:"
        else:
            segments.append((prompt, False))
            segments.append((f" {message.content}{eos}", True))
            prompt = ""
    if add_generation_prompt or prompt:
        segments.append((prompt, False))
    return [s for s in segments if s[0]]


def _glm4(messages: list[Message], tokenizer, system_prompt, add_generation_prompt) -> Segments:
    eos = tokenizer.eos_token or ""
    messages = _with_system(messages, system_prompt)
    prompt = "[gMASK]<sop>"
    segments: Segments = []
    for message in messages:
        if message.role in ("system", "user"):
            prompt += f"<|{message.role}|>\n{message.content}"
        else:
            segments.append((prompt + "<|assistant|>", False))
            segments.append((f"\n{message.content}{eos}", True))
            prompt = ""
    if add_generation_prompt:
        prompt += "<|assistant|>"
    if prompt:
        segments.append((prompt, False))
    return segments


def _openai_message(message: Message) -> dict[str, Any]:
    """A `Message` as transformers' chat templates read it (calls' arguments as objects)."""
    if message.role == "tool":
        return {"role": "tool", "content": message.content, "name": message.name,
                "tool_call_id": message.tool_call_id}
    chat: dict[str, Any] = {"role": message.role,
                            "content": "\n".join(p for p in (message.thoughts, message.content) if p)}
    if message.tool_calls:
        chat["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                              for c in message.tool_calls]
    return chat


def _tokenizer_template(messages: list[Message], tokenizer, system_prompt, add_generation_prompt,
                        tools: Sequence[Mapping[str, Any]] | None = None) -> Segments:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'tokenizer' needs a tokenizer with a chat_template; set template: vicuna_v1 or glm4")
    messages = _with_system(messages, system_prompt)
    tool_kwargs = {"tools": list(tools)} if tools else {}

    def render(upto: int, generation: bool) -> str:
        chat = [_openai_message(m) for m in messages[:upto]]
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation, **tool_kwargs)

    # Derive assistant spans by rendering growing prefixes; this needs a prefix-stable template.
    segments: Segments = []
    done = ""
    for index, message in enumerate(messages):
        if message.role != "assistant":
            continue
        prefix = render(index, generation=True)
        full = render(index + 1, generation=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise ValueError(
                "the tokenizer's chat_template is not prefix-stable (an earlier turn renders differently once "
                "later turns exist), so assistant spans cannot be found; set template: vicuna_v1 or glm4"
            )
        segments.append((prefix[len(done):], False))
        segments.append((full[len(prefix):], True))
        done = full
    tail = render(len(messages), generation=add_generation_prompt)
    if not tail.startswith(done):
        raise ValueError("the tokenizer's chat_template is not prefix-stable; set template: vicuna_v1 or glm4")
    segments.append((tail[len(done):], False))
    return [s for s in segments if s[0]]


# The chat templates by name: one renderer each. A new template is a function and a line here.
TEMPLATES = {"tokenizer": _tokenizer_template, "vicuna_v1": _vicuna_v1, "glm4": _glm4}
# The system message a template writes when the caller gives none (tool declarations join it).
DEFAULT_SYSTEM = {"vicuna_v1": VICUNA_SYSTEM}

_PROBE_CALL = ToolCall("xllm_probe_tool", {"xllm_probe_arg": "xllm_probe_value"}, "call_xllm_probe")
_PROBE_TOOLS = [{"type": "function", "function": {
    "name": "xllm_probe_tool", "description": "A probe.",
    "parameters": {"type": "object", "properties": {"xllm_probe_arg": {"type": "string"}}}}}]
_native_tools: dict[str, bool] = {}  # chat_template source -> whether it renders tools in the Hermes format


def renders_tools_natively(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's chat template declares tools, writes calls as Hermes `<tool_call>` blocks (the format
    `xllm.data.tool_format` parses and the constrained decoder writes) and shows tool results: one probe render."""
    source = getattr(tokenizer, "chat_template", None)
    if not isinstance(source, str):
        return False
    if source not in _native_tools:
        probe = [Message("user", "xllm probe"), Message("assistant", "", (_PROBE_CALL,)),
                 Message("tool", "xllm_probe_result", name="xllm_probe_tool", tool_call_id="call_xllm_probe")]
        try:
            text = tokenizer.apply_chat_template([_openai_message(m) for m in probe], tools=_PROBE_TOOLS,
                                                 tokenize=False)
        except Exception:  # a template that fails on tool messages (SmolLM2's, on content None) renders none
            text = ""
        _native_tools[source] = (call_text(_PROBE_CALL) in text and "xllm_probe_result" in text
                                 and text.count("xllm_probe_tool") >= 2)
    return _native_tools[source]


def lower_tools(messages: list[Message], tools: Sequence[Mapping[str, Any]] | None, system: str | None) -> list[Message]:
    """Tool declarations, calls and results as plain system/user/assistant messages in the Hermes format: the
    declarations join the system message (`system` when there is none), calls follow their turn's words, and
    consecutive results become one user turn."""
    out: list[Message] = []
    results: list[str] = []
    for message in messages:
        if message.role == "tool":
            results.append(message.content)
            continue
        if results:
            out.append(Message("user", responses_text(results)))
            results = []
        if message.role == "assistant" and (message.tool_calls or message.thoughts):
            message = Message("assistant", assistant_text(message.content, message.tool_calls, message.thoughts))
        out.append(message)
    if results:
        out.append(Message("user", responses_text(results)))
    if tools:
        block = declarations_text(tools)
        if out and out[0].role == "system":
            out[0] = Message("system", f"{out[0].content}\n\n{block}")
        else:
            out.insert(0, Message("system", f"{system}\n\n{block}" if system else block))
    return out


def render_segments(
    messages: list[Message],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    system_prompt: str | None = None,
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> Segments:
    """Render `messages` with `template`; `add_generation_prompt` ends with the assistant cue for generation.
    `tools` (OpenAI function declarations) are declared in the system message."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {tuple(TEMPLATES)}, got {template!r}")
    if tools or any(m.tool_calls or m.thoughts or m.role == "tool" for m in messages):
        if template == "tokenizer" and renders_tools_natively(tokenizer):
            return _tokenizer_template(messages, tokenizer, system_prompt, add_generation_prompt, tools)
        messages = lower_tools(messages, tools, system_prompt or DEFAULT_SYSTEM.get(template))
    return TEMPLATES[template](messages, tokenizer, system_prompt, add_generation_prompt)
