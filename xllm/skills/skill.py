"""A skill: a typed Python function the model may call. Its JSON schema comes from its signature and Google-style
docstring (transformers' `get_json_schema`, the schema `apply_chat_template(tools=...)` reads); xllm checks each
call's arguments against it (`jsonschema`), runs the function with a time limit and turns whatever happens — a
result, an exception, a timeout, bad arguments — into the text the model reads next. Nothing a skill does ends the
conversation.

    def locate(shape: Literal["circle", "square"], colour: str) -> list[int]:
        \"\"\"Find a shape in the picture.

        Args:
            shape: the shape to find
            colour: its colour
        \"\"\"

A skill returns text (a `str`), anything JSON can write (written as JSON), a picture (`PIL.Image.Image`, saved
as PNG and shown to the model as a new `<image>`), or a `SkillOutput` (text plus media paths of any modality).
"""

from __future__ import annotations

import json
import threading
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
from transformers.utils import get_json_schema


@dataclass
class SkillOutput:
    """A skill's result with media: `text`, and `media` as modality -> file paths (e.g. an edited picture); the
    model sees each item at a placeholder in front of the text, as a user turn's media."""

    text: str = ""
    media: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class SkillResult:
    """What one call gave the model: `text` (the result, or the error), `media` it returned, and `error` (None when
    the skill ran and returned)."""

    text: str
    media: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None


def skill_schema(function: Callable[..., Any]) -> dict[str, Any]:
    """The OpenAI tool declaration of `function` (`{"type": "function", "function": {"name", "description",
    "parameters"}}`), from its type hints and Google-style docstring. A return type JSON schema cannot write
    (a picture, `SkillOutput`) is left out of the declaration."""
    try:
        schema = get_json_schema(function)
    except Exception as err:
        hints = dict(getattr(function, "__annotations__", {}))
        if "return" not in hints:
            raise ValueError(f"skill {getattr(function, '__name__', function)!r}: {err}") from err
        hints.pop("return")
        # The same function without its return hint (get_json_schema reads annotations, nothing else changes).
        bare = types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__,
                                  function.__closure__)
        bare.__doc__, bare.__annotations__, bare.__kwdefaults__ = function.__doc__, hints, function.__kwdefaults__
        try:
            schema = get_json_schema(bare)
        except Exception as err2:
            raise ValueError(f"skill {function.__name__!r}: {err2}") from err2
    schema["function"].pop("return", None)
    return schema


class Skill:
    """One callable skill: the function, its declaration (`schema`), argument checks and a timed run.

    Args:
        function: a typed function with a Google-style docstring (see the module's docstring).
        timeout_s: how long a call may run before the model is told it timed out.
        media_dir: where returned pictures are written (each call its own file).
    """

    def __init__(self, function: Callable[..., Any], timeout_s: float = 30.0, media_dir: str | Path | None = None
                 ) -> None:
        self.function, self.timeout_s = function, timeout_s
        self.schema = skill_schema(function)
        self.name: str = self.schema["function"]["name"]
        self.media_dir = Path(media_dir) if media_dir is not None else None
        self._calls = 0

    def check(self, arguments: Any) -> str | None:
        """Why `arguments` do not fit this skill's parameters, or None when they do."""
        if not isinstance(arguments, Mapping):
            return f"arguments must be a JSON object, got {json.dumps(arguments, default=str)}"
        error = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator(self.schema["function"]["parameters"]).iter_errors(dict(arguments)))
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path)
        return error.message + (f" (at {where})" if where else "")

    def __call__(self, arguments: Mapping[str, Any]) -> SkillResult:
        """Run the skill on `arguments`; every failure becomes an error result for the model, never an exception."""
        problem = self.check(arguments)
        if problem is not None:
            return SkillResult(f"error: invalid arguments for {self.name}: {problem}", error="invalid_arguments")
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["value"] = self.function(**arguments)
            except BaseException as err:  # reported to the model as the call's result
                outcome["error"] = err

        # A thread cannot be killed: one that overruns is left running (daemon) and the model is told it timed out.
        worker = threading.Thread(target=run, daemon=True, name=f"xllm-skill-{self.name}")
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            return SkillResult(f"error: {self.name} did not finish within {self.timeout_s:g} s", error="timeout")
        if "error" in outcome:
            err = outcome["error"]
            return SkillResult(f"error: {self.name} raised {type(err).__name__}: {err}", error="raised")
        try:
            return self._as_result(outcome["value"])
        except Exception as err:  # a result that cannot be shown (unwritable picture, ...)
            return SkillResult(f"error: {self.name} returned {type(outcome['value']).__name__}, which cannot be shown "
                               f"to the model ({err})", error="bad_result")

    def _as_result(self, value: Any) -> SkillResult:
        if isinstance(value, SkillOutput):
            return SkillResult(value.text, {m: list(paths) for m, paths in value.media.items()})
        if isinstance(value, str):
            return SkillResult(value)
        if _is_picture(value):
            if self.media_dir is None:
                raise ValueError("no media_dir to write pictures into")
            self.media_dir.mkdir(parents=True, exist_ok=True)
            self._calls += 1
            path = self.media_dir / f"{self.name}_{id(self):x}_{self._calls}.png"
            value.save(path)
            return SkillResult("", {"image": [str(path)]})
        return SkillResult(json.dumps(value, default=_plain))


def _plain(value: Any) -> Any:
    """numpy and torch values as JSON can write them; anything else is refused (`TypeError`)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _is_picture(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(value, Image.Image)
