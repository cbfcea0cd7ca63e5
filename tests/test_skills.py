"""Skills: tool-use records in both dialects read into one form and train only on calls and answers; the skills
loop runs calls, hands every failure back to the model and goes on; `required` / named calls hold whatever the
model; skills come from installed packages' entry points and nothing else a file names is imported.

A tiny random model never calls by itself: `Scripted` makes the real `generate` write given replies (a logits
processor that allows one token per step), so the loop reads exactly what a model would write."""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path
from typing import Literal

import jsonschema
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, LogitsProcessor

from tests.conftest import make_model
from xllm.data.processor import ConversationProcessor
from xllm.data.records import BadSampleError, read_records
from xllm.data.templates import renders_tools_natively
from xllm.skills import SkillNotFound, find_skill, installed_skills, skill_schema
from xllm.tensors import IGNORE_INDEX

SHAPES = Literal["circle", "square", "triangle"]
COLOURS = Literal["red", "green", "blue"]


def locate(shape: SHAPES, colour: COLOURS) -> list[int]:
    """Find a shape in the picture.

    Args:
        shape: the shape to find
        colour: its colour
    """
    return [3, 4, 10, 12]


def measure(shape: SHAPES, scale: int = 1) -> dict:
    """Measure a shape's area in pixels.

    Args:
        shape: the shape to measure
        scale: pixels per unit
    """
    raise RuntimeError("the ruler broke")


def slow(seconds: float) -> str:
    """Wait.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "done"


def recolour(colour: COLOURS) -> Image.Image:
    """Paint the picture in one colour.

    Args:
        colour: the new colour
    """
    return Image.new("RGB", (32, 32), {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}[colour])


class Scripted(LogitsProcessor):
    """Test-only: each `generate` writes the next of `replies` (then its end), through the model's real path."""

    def __init__(self, tokenizer, replies: list[str]) -> None:
        self.replies = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in replies]
        self.index, self.last = -1, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if self.last is None or length <= self.last:  # a new generation began
            self.index, self.start = self.index + 1, length
        self.last = length
        ids = self.replies[self.index]
        forced = torch.full_like(scores, float("-inf"))
        forced[:, ids[min(length - self.start, len(ids) - 1)]] = 0.0
        return forced


def call(name: str, **arguments) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


# --- data --------------------------------------------------------------------------------------------

LOCATE_TOOL = skill_schema(locate)
OPENAI_RECORD = {"id": "openai", "tools": [LOCATE_TOOL], "conversations": [
    {"role": "user", "content": "Where is the red circle?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "locate", "arguments": json.dumps({"shape": "circle", "colour": "red"})}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "TOOL-OUTPUT [3, 4, 10, 12]"},
    {"role": "assistant", "content": "Top left, at (3, 4)."}]}
LLAVA_PLUS_RECORD = {"id": "llava_plus", "conversations": [
    {"from": "human", "value": "Where is the red circle?"},
    {"from": "gpt", "thoughts": "I need the detector.", "actions": [
        {"API_name": "locate", "API_params": {"shape": "circle", "colour": "red"}}], "value": "I will use locate."},
    {"from": "human", "value": "locate model outputs: TOOL-OUTPUT [3, 4, 10, 12]\n\nPlease summarize the model "
                               "outputs and answer my first question: Where is the red circle?"},
    {"from": "gpt", "thoughts": "Thanks to locate.", "actions": [], "value": "Top left, at (3, 4)."}]}

# A Hermes-style template that renders tools itself (as Qwen2.5's does), for the tokenizer-template path.
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "</tools><|im_end|>\n{% endif %}"
    "{%- for message in messages %}{%- if message.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ message.content }}\n</tool_response><|im_end|>\n{% else %}<|im_start|>{{ message.role }}\n"
    "{{ message.content or '' }}{%- for c in message.tool_calls or [] %}{% if message.content or not loop.first %}"
    "{{ '\\n' }}{% endif %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}"
    "\n</tool_call>{% endfor %}<|im_end|>\n{% endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_openai_and_llava_plus_records_read_into_one_form(tmp_path):
    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps(OPENAI_RECORD) + "\n" + json.dumps(LLAVA_PLUS_RECORD) + "\n")
    openai_turns, plus_turns = [r["conversations"] for r in read_records(data, ["image"])]
    for turns in (openai_turns, plus_turns):
        assert [t["from"] for t in turns] == ["user", "assistant", "tool", "assistant"]
        (made,) = turns[1]["tool_calls"]
        assert made["name"] == "locate" and made["arguments"] == {"shape": "circle", "colour": "red"}
        assert turns[2]["name"] == "locate" and turns[2]["tool_call_id"] == made["id"]
        assert "TOOL-OUTPUT" in turns[2]["value"] and turns[3]["value"] == "Top left, at (3, 4)."
    assert plus_turns[1]["thoughts"] == "I need the detector." and plus_turns[1]["value"] == "I will use locate."
    assert read_records(data, ["image"])[0]["tools"] == [LOCATE_TOOL]


@pytest.mark.parametrize("template", ["tokenizer", "hermes_tokenizer", "vicuna_v1", "glm4"])
def test_labels_cover_the_call_and_the_answer_never_the_tool_output(tiny, tmp_path, template):
    tokenizer = AutoTokenizer.from_pretrained(tiny / "llama")
    if template == "hermes_tokenizer":
        tokenizer.chat_template, template = HERMES_TEMPLATE, "tokenizer"
        assert renders_tools_natively(tokenizer)
    else:
        assert not renders_tools_natively(tokenizer)  # the tiny ChatML template ignores tools, as SmolLM2's does
    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps(OPENAI_RECORD) + "\n" + json.dumps(LLAVA_PLUS_RECORD) + "\n")
    processor = ConversationProcessor(tokenizer, template, {"image": -200}, {"image": 4})
    for record in read_records(data, ["image"]):
        encoded = processor.encode(record)
        prompt = tokenizer.decode(encoded["input_ids"])
        labels = tokenizer.decode([t for t in encoded["labels"] if t != IGNORE_INDEX])
        assert "TOOL-OUTPUT" in prompt and "TOOL-OUTPUT" not in labels
        assert call("locate", shape="circle", colour="red") in labels and "Top left, at (3, 4)." in labels
        assert ('"name": "locate", "description": "Find a shape' in prompt) == (record["id"] == "openai")
        assert "Find a shape" not in labels and "Where is the red circle" not in labels
        if record["id"] == "llava_plus":
            assert "I need the detector.\nI will use locate.\n<tool_call>" in labels


@pytest.mark.parametrize("turns, problem", [
    ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "nope", "content": "x"},
      {"role": "assistant", "content": "ok"}], "tool_call_id 'nope' answers no call"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}, {"role": "assistant", "content": "ok"}],
     "a tool result with no call before it"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "function": {"name": "locate", "arguments": "{not json"}}]}], "are not JSON"),
])
def test_a_bad_tool_record_is_refused_with_its_id(tmp_path, turns, problem):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"id": "rec7", "conversations": turns}) + "\n")
    with pytest.raises(BadSampleError, match=f"id rec7.*{problem}"):
        read_records(data, ["image"])


# --- the loop ----------------------------------------------------------------------------------------

def test_the_loop_runs_calls_and_every_failure_goes_back_to_the_model(tiny):
    model = make_model(tiny).eval()
    photo = str(tiny / "data" / "images" / "test_00000.png")
    question = [{"from": "user", "value": "<image>\nWhere is the red circle?"}]
    assert isinstance(model.chat(question, {"image": photo}, max_new_tokens=3), str)  # without tools: as before

    replies = [call("locate", shape="circle", colour="red"), call("locate", shape="hexagon", colour="red"),
               call("measure", shape="circle"), call("slow", seconds=3), call("paint", colour="red"),
               "The circle is at (3, 4)."]
    chat = model.chat(question, {"image": photo}, max_new_tokens=96, tools=[locate, measure, slow], timeout_s=0.5,
                      max_rounds=8, logits_processor=[Scripted(model.tokenizer, replies)])
    assert chat.answer == "The circle is at (3, 4)." and chat.stopped == "answer" and chat.rounds == 6
    assert [c.error for c in chat.calls] == [None, "invalid_arguments", "raised", "timeout", "unknown_skill"]
    assert chat.calls[0].result == "[3, 4, 10, 12]"
    assert "'hexagon' is not one of ['circle', 'square', 'triangle'] (at shape)" in chat.calls[1].result
    assert chat.calls[2].result == "error: measure raised RuntimeError: the ruler broke"
    assert chat.calls[3].result == "error: slow did not finish within 0.5 s"
    assert chat.calls[4].result.startswith("error: no skill named paint")
    # The conversation holds each call and its result, paired by id, and goes on from there.
    tools = [t for t in chat.turns if t["from"] == "tool"]
    assert [t["value"] for t in tools] == [c.result for c in chat.calls]
    assert [t["tool_call_id"] for t in tools] == [c.id for c in chat.calls]
    assert chat.turns[-1] == {"from": "assistant", "value": "The circle is at (3, 4)."}

    # Every reply calls: the loop stops after max_rounds; a call block that does not parse is the answer, as text.
    looping = model.chat(question, {"image": photo}, max_new_tokens=96, tools=[locate], max_rounds=2,
                         logits_processor=[Scripted(model.tokenizer, [replies[0]] * 2)])
    assert looping.stopped == "max_rounds" and looping.rounds == 2 and len(looping.calls) == 2
    broken = model.chat(question, {"image": photo}, max_new_tokens=96, tools=[locate],
                        logits_processor=[Scripted(model.tokenizer, ['<tool_call>\n{"name": "locate", "argu'])])
    assert broken.calls == [] and broken.answer.startswith("<tool_call>") and "not valid JSON" in broken.malformed


def test_a_picture_a_skill_returns_is_shown_to_the_model(tiny, tmp_path):
    model = make_model(tiny).eval()
    photo = str(tiny / "data" / "images" / "test_00000.png")
    chat = model.chat([{"from": "user", "value": "<image>\nMake it blue."}], {"image": photo}, max_new_tokens=96,
                      tools=[recolour], media_dir=str(tmp_path),
                      logits_processor=[Scripted(model.tokenizer, [call("recolour", colour="blue"), "Now it is blue."])])
    (made,) = chat.calls
    (picture,) = made.media["image"]
    assert Path(picture).parent == tmp_path and Image.open(picture).getpixel((0, 0)) == (0, 0, 255)
    assert chat.media["image"] == [photo, picture] and chat.answer == "Now it is blue."
    assert chat.turns[2]["from"] == "tool" and chat.turns[2]["value"].startswith("<image>\n")
    # The next round read it: its prompt holds both pictures, the new one at the tool's turn.
    batch = model.processor()([chat.turns[:3]], [chat.media])
    assert int((batch["input_ids"] == model.sentinels["image"]).sum()) == 2


@pytest.mark.parametrize("tool_choice", ["required", "measure"])
def test_a_required_or_named_call_parses_and_fits_its_schema_whatever_the_model(tiny, tool_choice):
    model = make_model(tiny).eval()
    schemas = {s["function"]["name"]: s["function"]["parameters"] for s in map(skill_schema, [locate, measure])}
    for seed in range(4):  # sampled at a high temperature: the constraint, not the model, makes the call
        torch.manual_seed(seed)
        chat = model.chat([{"from": "user", "value": "Hello"}], max_new_tokens=160, tools=[locate, measure],
                          tool_choice=tool_choice, max_rounds=1, do_sample=True, temperature=2.0)
        (made,) = chat.calls
        assert tool_choice == "required" or made.name == tool_choice
        jsonschema.validate(made.arguments, schemas[made.name])


# --- where skills come from ----------------------------------------------------------------------------

TOY_SKILLS = '''
def locate(shape: str) -> list:
    """Find a shape.

    Args:
        shape: the shape
    """
    return [1, 2, 3, 4]
'''


NOT_INSTALLED = '''open({marker!r}, "w").close()


def run(x: str) -> str:
    """Run.

    Args:
        x: anything
    """
    return x
'''


def test_an_installed_skill_is_found_and_one_not_installed_is_never_imported(tiny, tmp_path, monkeypatch, capsys):
    """`toy_skills` is installed as pip leaves a package (a module and a `.dist-info` declaring the entry point);
    `not_installed` is an importable module on the path that no package declares: a file never imports it."""
    from xllm.apps.chat import load_skills, main

    site = tmp_path / "site"
    site.mkdir()
    (site / "toy_skills.py").write_text(TOY_SKILLS)
    info = site / "toy_skills-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-skills\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[xllm.skills]\nlocate = toy_skills:locate\n")
    marker = tmp_path / "imported"
    (site / "not_installed.py").write_text(NOT_INSTALLED.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(site))
    assert installed_skills()["locate"] == "toy_skills:locate" and find_skill("locate")("circle") == [1, 2, 3, 4]

    # An adapter's config names skills: only installed ones load; a module it names is never imported.
    adapter = make_model(tiny).save_pretrained(tmp_path / "adapter")
    config = json.loads((adapter / "config.json").read_text())
    (adapter / "config.json").write_text(json.dumps({**config, "skills": ["locate"]}))
    assert [f.__name__ for f in load_skills(adapter)] == ["locate"]
    (adapter / "config.json").write_text(json.dumps({**config, "skills": ["not_installed:run"]}))
    with pytest.raises(SkillNotFound, match="'not_installed:run' is not an installed skill.*nothing was imported"):
        load_skills(adapter)
    with pytest.raises(SystemExit):  # the command says so and stops before it loads the model
        main(["--adapter", str(adapter)])
    assert "nothing was imported" in capsys.readouterr().err
    assert not marker.exists() and "not_installed" not in sys.modules
    # Named by the user on the command line, the same module is theirs to run.
    (adapter / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    main(["--adapter", str(adapter), "--skills", "not_installed:run", "--max_new_tokens", "2"])
    assert marker.exists() and "xllm: " in capsys.readouterr().out
    sys.modules.pop("not_installed", None), sys.modules.pop("toy_skills", None)


def test_xllm_chat_with_skills_prints_each_call_then_the_answer(tiny, monkeypatch, capsys):
    from xllm.apps.chat import ChatSession

    model = make_model(tiny).eval()
    session = ChatSession(model, 96, skills=[find_skill("tests.test_skills:locate", import_modules=True)],
                          logits_processor=[Scripted(model.tokenizer, [call("locate", shape="circle", colour="red"),
                                                                       "At (3, 4)."])])
    printed = "".join(session.ask("Where is the red circle?"))
    assert printed == "[locate(shape='circle', colour='red') -> [3, 4, 10, 12]]\nAt (3, 4)."
    assert [t["from"] for t in session.turns] == ["user", "assistant", "tool", "assistant"]
