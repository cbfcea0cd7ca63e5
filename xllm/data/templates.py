"""Chat templates as *segments*: `(text, supervised)` pieces whose concatenation is the prompt string.

Supervised pieces are the assistant replies (with their end-of-turn token); everything else — system
prompt, user turns, role markers, media placeholders — gets label -100. Segments are tokenized one by one,
both in training and at inference, so the prompt the model sees when generating is token-for-token the
prompt it was trained on.

Three kinds: the tokenizer's own jinja `chat_template` (`template: tokenizer`), and the built-in
`vicuna_v1` (Vicuna v1.1 / X-LLM's ChatGLM-free setup) and `glm4` (GLM-4 chat).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


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


def _tokenizer_template(messages: list[Message], tokenizer, system_prompt, add_generation_prompt) -> Segments:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'tokenizer' needs a tokenizer with a chat_template; set template: vicuna_v1 or glm4")
    messages = _with_system(messages, system_prompt)

    def render(upto: int, generation: bool) -> str:
        chat = [{"role": m.role, "content": m.content} for m in messages[:upto]]
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation)

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


def render_segments(
    messages: list[Message],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    system_prompt: str | None = None,
    add_generation_prompt: bool = False,
) -> Segments:
    """Render `messages` with `template`; `add_generation_prompt` ends with the assistant cue for generation."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {tuple(TEMPLATES)}, got {template!r}")
    return TEMPLATES[template](messages, tokenizer, system_prompt, add_generation_prompt)
