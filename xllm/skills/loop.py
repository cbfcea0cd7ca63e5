"""The skills loop: the model calls, xllm checks and runs the skill, the result joins the conversation, the model
goes on — until it answers without a call, or `max_rounds` replies have called.

Each round is one generation through the model's one inference path (its processor with the skills declared,
then `generate`). A call's result comes back as a tool turn (`{"from": "tool", ...}`, rendered as Hermes
`<tool_response>`); a skill that raises, times out, gets bad arguments or is not there gives the model an error
text as its result, and the conversation goes on. A reply whose call block cannot be read is the answer, as
text (`SkillChat.malformed` says why). Media a skill returns (an edited picture) join the conversation at the
tool turn, as a user's media do, and the model reads them in the next round.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import LogitsProcessorList

from xllm.data.records import normalize_turns
from xllm.data.tool_format import parse_reply
from xllm.skills.constrain import CallConstraint, RowConstraints
from xllm.skills.skill import Skill, SkillResult


@dataclass
class SkillCall:
    """One call the model made and what it got back."""

    id: str
    name: str
    arguments: dict[str, Any]
    result: str  # the text the model read (the result, or the error)
    error: str | None = None  # None, or invalid_arguments / raised / timeout / unknown_skill / bad_result
    media: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class SkillChat:
    """A conversation's turn with skills: the answer, every call, and the conversation to go on from.

    `turns` (xllm's turn form: user, assistant with `tool_calls`, tool results, the answer) and `media` (the
    caller's plus what skills returned) can be passed to the next `chat` as they are."""

    answer: str
    calls: list[SkillCall]
    turns: list[dict[str, Any]]
    media: dict[str, list[Any]]
    rounds: int  # generations run
    stopped: str  # "answer" (a reply without a call) or "max_rounds" (every reply called)
    malformed: str | None = None  # why the last reply's call block could not be read, if it could not


def as_skills(skills: Sequence[Callable[..., Any] | Skill], timeout_s: float, media_dir: str) -> dict[str, Skill]:
    """name -> `Skill` (functions are wrapped; their schemas are built now, so a bad docstring fails early)."""
    out: dict[str, Skill] = {}
    for skill in skills:
        skill = skill if isinstance(skill, Skill) else Skill(skill, timeout_s, media_dir)
        if skill.media_dir is None:
            skill.media_dir = media_dir
        if skill.name in out:
            raise ValueError(f"two skills are named {skill.name!r}")
        out[skill.name] = skill
    return out


def chat_with_skills(
    model: Any,
    messages: Sequence[Mapping[str, Any]],
    media: Mapping[str, Any] | None = None,
    skills: Sequence[Callable[..., Any] | Skill] = (),
    max_new_tokens: int = 64,
    max_rounds: int = 4,
    timeout_s: float = 30.0,
    tool_choice: str = "auto",
    media_dir: str | None = None,
    **generate_kwargs: Any,
) -> SkillChat:
    """Answer the conversation `messages` (any turn form `normalize_turns` reads), calling `skills` as the model
    asks (see the module's docstring).

    Args:
        model: an `XLLM`.
        skills: functions (their schemas from their signatures) or `Skill`s.
        max_rounds: most generations; a reply that still calls after that many ends the loop (`stopped`).
        timeout_s: each call's time limit (functions only; a `Skill` keeps its own).
        tool_choice: `auto` (the model decides), `none` (skills not declared, no call read), `required` (the first
            reply is constrained to a call of one of the skills) or a skill's name (the first reply calls it).
        media_dir: where pictures that skills return are written (default: a new temporary folder).
        generate_kwargs: passed to `generate` (greedy unless sampling arguments are given)."""
    named = as_skills(skills, timeout_s, media_dir or tempfile.mkdtemp(prefix="xllm-skills-"))
    tools = [skill.schema for skill in named.values()]
    if tool_choice not in ("auto", "none", "required") and tool_choice not in named:
        raise ValueError(f"tool_choice must be auto, none, required or one of the skills {sorted(named)}, got "
                         f"{tool_choice!r}")
    turns = normalize_turns(list(messages), "conversation")
    media = {m: list(v) if isinstance(v, (list, tuple)) else [v] for m, v in (media or {}).items()}
    generate_kwargs.setdefault("do_sample", False)
    processors = list(generate_kwargs.pop("logits_processor", None) or [])
    eos = getattr(model.llm.generation_config, "eos_token_id", None)
    eos_ids = [i for i in (eos if isinstance(eos, (list, tuple)) else [eos]) if i is not None]
    calls: list[SkillCall] = []
    for round_ in range(1, max_rounds + 1):
        constraint = None
        if round_ == 1 and tool_choice not in ("auto", "none"):
            constraint = CallConstraint(model.tokenizer, tools, None if tool_choice == "required" else tool_choice,
                                        eos_ids)
        batch = model.processor()([turns], [media], tools=[tools if tool_choice != "none" else None])
        extra = LogitsProcessorList([RowConstraints([constraint])] if constraint else []) + processors
        text = model.generate(batch, max_new_tokens, logits_processor=extra, **generate_kwargs)[0]
        parsed = parse_reply(text) if tool_choice != "none" else None  # an unknown name: an error result, below
        if parsed is None or not parsed.calls:
            answer = parsed.content if parsed is not None else text.strip()
            turns.append({"from": "assistant", "value": answer})
            return SkillChat(answer, calls, turns, media, round_, "answer", parsed.malformed if parsed else None)
        made = [{"id": f"call_{uuid.uuid4().hex[:24]}", "name": c.name, "arguments": c.arguments}
                for c in parsed.calls]
        turns.append({"from": "assistant", "value": parsed.content, "tool_calls": made})
        for call in made:
            result = named[call["name"]](call["arguments"]) if call["name"] in named else SkillResult(
                f"error: no skill named {call['name']}; the skills are {', '.join(named)}", error="unknown_skill")
            placeholders = "".join(f"<{m}>\n" * len(paths) for m, paths in result.media.items())
            for modality, paths in result.media.items():
                media.setdefault(modality, []).extend(paths)
            turns.append({"from": "tool", "value": placeholders + result.text, "name": call["name"],
                          "tool_call_id": call["id"]})
            calls.append(SkillCall(call["id"], call["name"], call["arguments"], result.text, result.error,
                                   result.media))
    return SkillChat(turns[-len(made) - 1]["value"], calls, turns, media, max_rounds, "max_rounds")
