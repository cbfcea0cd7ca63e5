"""Reading the LLaVA-style JSON/JSONL conversation format, with errors that name the file, line and record.

```json
{"id": "0999999", "image": "my_data/hongyadong.jpg",
 "conversations": [{"from": "human", "value": "<image>\\n这张照片拍摄于哪里?"},
                   {"from": "gpt", "value": "这是一张拍摄于重庆市洪崖洞景区的照片."}]}
```
A key named after a modality of the model (`image`, `video`, `audio`, any other an interface declares;
or its plural) holds a path or a list of paths, and the conversation needs exactly as many `<modality>`
placeholders. Paths resolve against the media root; a path that leads outside it (absolute, or climbing out
with `..`) is refused unless the caller allows it (`allow_outside_root`), so a data file cannot make training or
evaluation read arbitrary files of the machine it runs on.

Tool use (docs/skills.md): a record may declare `tools` (OpenAI's function declarations) and its turns may call
them and hold their results, in OpenAI's dialect (`tool_calls`, `role: "tool"`) or LLaVA-Plus's (`thoughts`,
`actions`, the skill's output as the next human turn); both read into one form (`normalize_turns`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from xllm.data.templates import ROLE_NAMES
from xllm.interfaces.base import placeholder

OnBadSample = Literal["error", "skip"]


class BadSampleError(ValueError):
    """A record that cannot be used, with where it came from and why."""

    def __init__(self, source: str, record_id: str | None, problem: str, reason: str = "other") -> None:
        self.source, self.record_id, self.problem, self.reason = source, record_id, problem, reason
        where = f"{source} (id {record_id})" if record_id is not None else source
        super().__init__(f"{where}: {problem}")


@dataclass
class BadSamples:
    """The one place that decides what a bad sample does: `error` raises it, `skip` counts it by reason.

    Keeps the first few messages for the start-of-training report; the training loop logs the counts."""

    policy: OnBadSample = "error"
    counts: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def reject(self, error: BadSampleError) -> None:
        """Raise `error` under the `error` policy; count it under `skip`."""
        if self.policy == "error":
            raise error
        self.counts[error.reason] += 1
        if len(self.examples) < 5:
            self.examples.append(str(error))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def raw_records(path: Path) -> list[tuple[str, Any]]:
    """(source, parsed-or-error) pairs. A JSON list file or JSONL, one object per line."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise BadSampleError(f"{path}:{err.lineno}", None, f"malformed JSON: {err.msg}", "malformed_json") from err
        return [(f"{path}[{i}]", item) for i, item in enumerate(items)]
    return [(f"{path}:{number}", parse_line(f"{path}:{number}", line))
            for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def parse_line(source: str, line: str) -> Any:
    """One JSONL line parsed, or the `BadSampleError` that names it (`normalize_record` raises it)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        return BadSampleError(source, None, f"malformed JSON line: {err.msg}", "malformed_json")


def normalize_turns(conversations: list[Any], source: str = "conversation", record_id: str | None = None) -> list[dict[str, Any]]:
    """`[{"from": "user"|"assistant"|"system"|"tool", "value": str}]` from xllm/LLaVA turns (`from`/`value`,
    `human`/`gpt`) or OpenAI-style messages (`role`/`content`). A turn may carry `instruction`: the text its
    instruction-aware interfaces (Q-Formers) read instead of the turn's own, e.g. the words of a spoken question.

    Tool use, in either dialect, becomes one form (see `tool_turns`): an assistant turn's calls are
    `"tool_calls": [{"id", "name", "arguments": {...}}]` (and LLaVA-Plus's `thoughts` stay as `"thoughts"`); a
    tool's result is a `{"from": "tool", "value", "name", "tool_call_id"}` turn."""
    turns = []
    calls = ToolCallBook(source, record_id)
    for index, turn in enumerate(conversations):
        role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        value = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        role = ROLE_NAMES.get(role) if isinstance(role, str) else None
        if role == "tool" or (role == "user" and calls.llava_plus_pending):
            turns.append(calls.result(index, turn, value))
            continue
        if role == "assistant" and value is None and (turn.get("tool_calls") or turn.get("actions")):
            value = ""  # OpenAI's `content: null` beside calls
        if not isinstance(value, str) or role is None:
            raise BadSampleError(
                source, record_id,
                f"turn {index} must be {{'from': one of {sorted(ROLE_NAMES)}, 'value': str}}, got {turn!r}",
                "malformed_record",
            )
        normalized: dict[str, Any] = {"from": role, "value": value}
        if role == "assistant":
            normalized.update(calls.calls_of(index, turn))
        instruction = turn.get("instruction")
        if instruction is not None:
            if not isinstance(instruction, str):
                raise BadSampleError(source, record_id, f"turn {index}: 'instruction' must be a string, got "
                                     f"{instruction!r}", "malformed_record")
            normalized["instruction"] = instruction
        turns.append(normalized)
    return turns


class ToolCallBook:
    """The calls of one conversation as it is read, so each tool result finds the call it answers.

    OpenAI: an assistant message's `tool_calls` (`{"id", "type": "function", "function": {"name", "arguments":
    JSON string}}`; arguments may also be an object, as transformers writes them) and `role: "tool"` messages with
    `tool_call_id`. LLaVA-Plus: a `gpt` turn's `thoughts`, `actions` (`[{"API_name", "API_params"}]`) and `value`;
    the *human* turn right after a turn with actions holds the skill's output (LLaVA-Plus runs one skill per user
    turn: that turn answers the first action) and becomes a tool turn, its text unchanged. A result with no call
    before it, an unknown `tool_call_id` or arguments that are not a JSON object is a `BadSampleError`."""

    def __init__(self, source: str, record_id: str | None) -> None:
        self.source, self.record_id = source, record_id
        self.by_id: dict[str, dict[str, Any]] = {}
        self.unanswered: list[dict[str, Any]] = []
        self.llava_plus_pending = False

    def _bad(self, index: int, problem: str) -> BadSampleError:
        return BadSampleError(self.source, self.record_id, f"turn {index}: {problem}", "malformed_record")

    def calls_of(self, index: int, turn: dict[str, Any]) -> dict[str, Any]:
        """The internal fields of an assistant turn: `tool_calls` (and `thoughts`), if it has any."""
        fields: dict[str, Any] = {}
        if "thoughts" in turn and turn["thoughts"]:
            if not isinstance(turn["thoughts"], str):
                raise self._bad(index, f"'thoughts' must be a string, got {turn['thoughts']!r}")
            fields["thoughts"] = turn["thoughts"]
        raw = turn.get("tool_calls") or []
        actions = turn.get("actions") or []
        if not isinstance(raw, list) or not isinstance(actions, list):
            raise self._bad(index, "'tool_calls' and 'actions' must be lists")
        calls = []
        for number, call in enumerate([*raw, *actions]):
            if not isinstance(call, dict):
                raise self._bad(index, f"call {number} must be an object, got {call!r}")
            function = call.get("function", call)
            name = function.get("name", call.get("API_name")) if isinstance(function, dict) else None
            arguments = function.get("arguments", call.get("API_params", {})) if isinstance(function, dict) else None
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError as err:
                    raise self._bad(index, f"the arguments of call {number} ({name}) are not JSON: {err.msg}") from err
            if not isinstance(name, str) or not name or not isinstance(arguments, dict):
                raise self._bad(index, f"call {number} needs a name and arguments that are a JSON object, got {call!r}")
            call_id = call.get("id") or f"call_{index}_{number}"
            calls.append({"id": str(call_id), "name": name, "arguments": arguments})
        for call in calls:
            self.by_id[call["id"]] = call
        self.unanswered = list(calls)
        self.llava_plus_pending = bool(actions)
        if calls:
            fields["tool_calls"] = calls
        return fields

    def result(self, index: int, turn: Any, value: Any) -> dict[str, Any]:
        """A tool result as `{"from": "tool", "value", "name", "tool_call_id"}` (content that is not a string: its
        text parts joined, or its JSON)."""
        if not isinstance(turn, dict):
            raise self._bad(index, f"expected an object, got {turn!r}")
        self.llava_plus_pending = False
        call_id, name = turn.get("tool_call_id"), turn.get("name")
        if call_id is not None:
            call = self.by_id.get(str(call_id))
            if call is None:
                raise self._bad(index, f"tool_call_id {call_id!r} answers no call made before it")
        else:
            call = next((c for c in self.unanswered if name in (None, c["name"])), None)
            if call is None:
                raise self._bad(index, "a tool result with no call before it")
        if call in self.unanswered:
            self.unanswered.remove(call)
        if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
            value = "".join(str(p.get("text", "")) for p in value)
        elif value is None or not isinstance(value, str):
            value = json.dumps(value)
        normalized = {"from": "tool", "value": value, "name": call["name"], "tool_call_id": call["id"]}
        if isinstance(turn.get("instruction"), str):
            normalized["instruction"] = turn["instruction"]
        return normalized


def normalize_tools(tools: Any, source: str, record_id: str | None = None) -> list[dict[str, Any]]:
    """A record's (or request's) `tools` as OpenAI tool declarations, each `{"type": "function", "function":
    {"name", "description", "parameters"}}` (a bare function schema is wrapped)."""
    if not isinstance(tools, list):
        raise BadSampleError(source, record_id, f"'tools' must be a list, got {type(tools).__name__}",
                             "malformed_record")
    out = []
    for number, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise BadSampleError(source, record_id, f"tool {number} needs a function with a name, got {tool!r}",
                                 "malformed_record")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise BadSampleError(source, record_id, f"tool {function['name']}: 'parameters' must be a JSON schema "
                                 "object", "malformed_record")
        out.append({"type": "function", "function": {**function, "parameters": parameters}})
    return out


def check_placeholders(turns: list[dict[str, str]], counts: dict[str, int], source: str,
                       record_id: str | None = None, what: str = "file") -> None:
    """Each modality's placeholders must match its media items one to one, and sit in user or system turns only.

    counts: modality -> number of media items given for the conversation; `what` names them in the error."""
    text = "".join(t["value"] for t in turns)
    for modality, expected in counts.items():
        marker = placeholder(modality)
        found = text.count(marker)
        if found != expected:
            raise BadSampleError(
                source, record_id,
                f"{found} {marker} placeholder(s) but {expected} {modality} {what}(s)", "placeholder_mismatch",
            )
        for turn in turns:
            if turn["from"] == "assistant" and marker in turn["value"]:
                raise BadSampleError(
                    source, record_id, f"{marker} inside an assistant turn is not supported", "malformed_record"
                )


def normalize_record(
    source: str, raw: Any, modalities: list[str], media_root: str | None, allow_outside_root: bool = False,
) -> dict[str, Any]:
    """Validate one parsed record and return `{"id", "source", "conversations", "media": {modality: [abs paths]}}`."""
    if isinstance(raw, BadSampleError):
        raise raw
    if not isinstance(raw, dict):
        raise BadSampleError(source, None, f"expected a JSON object, got {type(raw).__name__}", "malformed_record")
    record_id = str(raw["id"]) if "id" in raw else None
    conversations = raw.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise BadSampleError(source, record_id, "empty or missing 'conversations'", "empty_conversation")
    turns = normalize_turns(conversations, source, record_id)
    if not any(t["from"] == "assistant" and (t["value"].strip() or t.get("tool_calls")) for t in turns):
        raise BadSampleError(source, record_id, "no non-empty assistant ('gpt') turn to learn from", "empty_conversation")

    text = "".join(t["value"] for t in turns)
    media: dict[str, list[str]] = {}
    # Fields the format does not use (an MME `category`, an `image_id`...) stay with the record for its reader.
    fields: dict[str, Any] = {}
    for key, value in raw.items():
        modality = key if key in modalities else key.removesuffix("s")
        if modality not in modalities:
            if key in ("id", "conversations", "tools"):
                continue
            # A media key of a modality this model lacks: its placeholders give it away.
            if placeholder(key) in text or placeholder(modality) in text:
                raise BadSampleError(
                    source, record_id, f"has '{key}' but the model has no {modality} interface", "unknown_modality"
                )
            fields[key] = value
            continue
        paths = [value] if isinstance(value, str) else value
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise BadSampleError(source, record_id, f"'{key}' must be a path or a list of paths", "malformed_record")
        media.setdefault(modality, []).extend(paths)

    check_placeholders(turns, {m: len(media.get(m, [])) for m in modalities}, source, record_id)

    resolved: dict[str, list[str]] = {}
    for modality, paths in media.items():
        resolved[modality] = []
        for path in paths:
            full = path if os.path.isabs(path) or media_root is None else os.path.join(media_root, path)
            if media_root is not None and not allow_outside_root and not _inside(full, media_root):
                raise BadSampleError(
                    source, record_id, f"{modality} path {path!r} leads outside the media root {media_root} "
                    "(allow it with allow_media_outside_root: true / --allow_media_outside_root if you trust this "
                    "file, or set media_root to a folder that holds the media)", "media_outside_root",
                )
            if not os.path.isfile(full):
                raise BadSampleError(source, record_id, f"{modality} file not found: {full}", "missing_media")
            resolved[modality].append(full)
    record = {"id": record_id or source, "source": source, "conversations": turns, "media": resolved, "fields": fields}
    if raw.get("tools") is not None:
        record["tools"] = normalize_tools(raw["tools"], source, record_id)
    return record


def _inside(path: str, root: str) -> bool:
    """Whether `path` lies in `root`, by their normalised absolute forms (lexically: a symlink the user placed in
    the root is theirs to place)."""
    path, root = os.path.abspath(path), os.path.abspath(root)
    return os.path.commonpath([path, root]) == root


def read_records(
    path: str | Path,
    modalities: list[str],
    media_root: str | None = None,
    bad_samples: BadSamples | None = None,
    allow_outside_root: bool = False,
) -> list[dict[str, Any]]:
    """Read and validate every record of a JSON/JSONL file.

    With `bad_samples` of policy `error` (the default) the first bad record raises `BadSampleError`; with
    `skip` it is dropped and counted there. `media_root` defaults to the data file's folder; media paths outside
    it are refused unless `allow_outside_root`.
    """
    bad_samples = bad_samples if bad_samples is not None else BadSamples()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    root = media_root if media_root is not None else str(path.parent)
    records = []
    for source, raw in raw_records(path):
        try:
            records.append(normalize_record(source, raw, modalities, root, allow_outside_root))
        except BadSampleError as err:
            bad_samples.reject(err)
    return records
