"""`xllm serve` speaks OpenAI function calling to the official `openai` client, which runs the tools itself as the
protocol says: `tool_calls` with ids and `finish_reason: "tool_calls"`, the `role: "tool"` result answered,
streamed calls equal to whole ones, `none` never calls, a named function always is, and a call the model breaks
is a clean reply, never a 500. The tiny model never calls by itself: `required` and named calls are constrained
decoding; `auto`'s reading of calls is tested on text in the model's format."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import torch

from tests.test_serve import ask, server, server_of  # noqa: F401  (the module's server fixture)
from tests.test_skills import locate, measure
from xllm.apps.batching import BatchGenerator, Generation
from xllm.apps.continuous import ContinuousBatch
from xllm.apps.tool_calls import ToolCallStream, tool_reply, with_constraint
from xllm.skills import skill_schema

TOOLS = [skill_schema(locate), skill_schema(measure)]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
RUN = {"locate": locate}  # what the client runs when the model calls


def streamed(stream) -> tuple[str, dict[int, dict], str | None]:
    """A stream's content, its calls accumulated by index as a client does, and its finish reason."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta, finish = chunk.choices[0].delta, chunk.choices[0].finish_reason or finish
        content += delta.content or ""
        for part in delta.tool_calls or []:
            call = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = part.id or call["id"]
            call["name"] += part.function.name or ""
            call["arguments"] += part.function.arguments or ""
    return content, calls, finish


def test_a_named_tool_is_called_and_the_tool_result_gets_the_answer(server):  # noqa: F811
    model, client, images, _ = server
    image = images / "test_00000.png"
    messages = [ask("Where is the red circle?", image)]
    first = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=160,
                                           tool_choice={"type": "function", "function": {"name": "locate"}})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (made,) = choice.message.tool_calls
    assert made.id.startswith("call_") and made.type == "function" and made.function.name == "locate"
    arguments = json.loads(made.function.arguments)
    jsonschema.validate(arguments, PARAMETERS["locate"])

    # The client runs the tool and sends its result back; the server answers from the whole conversation.
    messages += [choice.message, {"role": "tool", "tool_call_id": made.id, "content": json.dumps(locate(**arguments))}]
    final = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=8)
    assert final.choices[0].message.tool_calls is None and final.choices[0].finish_reason in ("stop", "length")
    turns = [{"from": "user", "value": "<image>\nWhere is the red circle?"},
             {"from": "assistant", "value": "", "tool_calls": [{"id": made.id, "name": "locate", "arguments": arguments}]},
             {"role": "tool", "tool_call_id": made.id, "content": json.dumps(locate(**arguments))}]
    expected = model.generate(model.processor()([turns], [{"image": str(image)}], tools=[TOOLS]), 8, do_sample=False)
    assert final.choices[0].message.content == expected[0].strip()


def test_required_streamed_gives_the_same_call_and_none_never_calls(server):  # noqa: F811
    _, client, images, _ = server
    messages = [ask("How big is the square?", images / "test_00001.png")]
    whole = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="required",
                                           max_tokens=160)
    (made,) = whole.choices[0].message.tool_calls
    jsonschema.validate(json.loads(made.function.arguments), PARAMETERS[made.function.name])
    content, calls, finish = streamed(client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, tool_choice="required", max_tokens=160, stream=True))
    assert finish == "tool_calls" and content.strip() == "" and list(calls) == [0]
    assert calls[0]["id"].startswith("call_")
    assert (calls[0]["name"], calls[0]["arguments"]) == (made.function.name, made.function.arguments)

    auto = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=6)
    none = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none",
                                          max_tokens=6)
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")
    # `none` does not declare the tools: the prompt is the plain one (`auto`'s carries the declarations).
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens
    assert none.choices[0].message.content == plain.choices[0].message.content


def test_a_call_cut_short_is_a_clean_reply_never_a_500(server):  # noqa: F811
    _, client, _, _ = server
    messages = [{"role": "user", "content": "Where is the circle?"}]
    cut = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="required",
                                         max_tokens=12)
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.tool_calls is None
    assert cut.choices[0].message.content.startswith("<tool_call>")
    content, calls, finish = streamed(client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, tool_choice="required", max_tokens=12, stream=True))
    assert (content.strip(), calls, finish) == (cut.choices[0].message.content, {}, "length")


def test_bad_tool_requests_get_openai_errors_and_nothing_a_request_names_is_imported(server, tmp_path,  # noqa: F811
                                                                                     monkeypatch):
    _, client, _, _ = server
    question = [{"role": "user", "content": "Where?"}]
    cases = [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "paint"}}}, "names 'paint'"),
        ({"tool_choice": "required"}, "tool_choice needs tools"),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice must be none, auto, required"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "needs a function with a name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
         "parameters are not a JSON schema"),
        ({"messages": [*question, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
         "tool_call_id 'call_x' answers no call"),
        ({"messages": [*question, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "locate", "arguments": "{oops"}}]},
            {"role": "tool", "tool_call_id": "c", "content": "1"}]}, "are not JSON"),
    ]
    for extra, message in cases:
        with pytest.raises(openai.BadRequestError, match=message):
            client.chat.completions.create(**{"model": "tiny", "messages": question, "max_tokens": 4, **extra})

    # A tool named after a module on the path is only declared: the client runs tools, the server imports nothing.
    marker = tmp_path / "imported"
    (tmp_path / "evil_tool.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    tool = {"type": "function", "function": {"name": "evil_tool", "parameters": {"type": "object", "properties": {}}}}
    reply = client.chat.completions.create(model="tiny", messages=question, tools=[tool], max_tokens=100,
                                           tool_choice={"type": "function", "function": {"name": "evil_tool"}})
    assert reply.choices[0].message.tool_calls[0].function.name == "evil_tool" and not marker.exists()


class ForcedText:
    """Test-only row constraint: the row writes `text` and its end (a tiny model never calls by itself)."""

    def __init__(self, tokenizer, text: str) -> None:
        self.ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    def mask(self, generated: list[int], vocab_size: int) -> torch.Tensor:
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        allowed[self.ids[min(len(generated), len(self.ids) - 1)]] = True
        return allowed


def test_auto_reads_a_call_the_model_wrote_whole_and_streamed(server):  # noqa: F811
    model, client, _, _ = server
    completions = server_of[client]
    turns = [{"from": "user", "value": "Where is the red circle?"}]
    text = 'Let me look.\n<tool_call>\n{"name": "locate", "arguments": {"shape": "circle", "colour": "red"}}\n</tool_call>'
    rows = [Generation(turns, {}, max_new_tokens=200, tools=TOOLS, constraint=ForcedText(model.tokenizer, text))
            for _ in range(2)]
    for row in rows:  # to the server's own scheduler
        completions.batches.submit(row)
    reply = completions.complete(rows[0], turns, {})["choices"][0]
    assert reply["finish_reason"] == "tool_calls" and reply["message"]["content"] == "Let me look."
    (made,) = reply["message"]["tool_calls"]
    assert made["function"] == {"name": "locate", "arguments": json.dumps({"shape": "circle", "colour": "red"})}
    events = [json.loads(e[6:]) for e in completions.chunks(rows[1], turns, {}) if e != "data: [DONE]\n\n"]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("content") or "" for d in deltas).strip() == "Let me look."
    assert [d["tool_calls"][0]["function"] for d in deltas if "tool_calls" in d] == [made["function"]]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("batching", ["continuous", "dynamic"])
def test_a_constrained_row_beside_free_rows_leaves_them_as_they_were(server, batching):  # noqa: F811
    model, _, images, _ = server
    image = str(images / "test_00002.png")
    turns = [{"from": "user", "value": "<image>\nDescribe the picture."}]
    alone = model.chat(turns, {"image": image}, max_new_tokens=8)
    declared = model.generate(model.processor()([turns], [{"image": image}], tools=[TOOLS]), 8, do_sample=False)
    media = model.processor().load_media([{"image": [image]}])[0]
    # The scheduler `xllm serve --batching ...` runs, driven directly (the server's own worker stays idle).
    scheduler = ContinuousBatch(model) if batching == "continuous" else BatchGenerator(model)
    required = with_constraint({"max_new_tokens": 160, "tools": TOOLS, "tool_choice": "required"}, model.tokenizer,
                               scheduler.eos_ids)
    rows = [Generation(turns, media, max_new_tokens=8), Generation(turns, media, **required),
            Generation(turns, media, max_new_tokens=8, temperature=1.5),
            Generation(turns, media, max_new_tokens=8, tools=TOOLS)]  # `auto`: declared in the prompt, not constrained
    if batching == "continuous":  # the tool rows join a row that is mid-reply
        scheduler.admit(rows[:1])
        scheduler.step()
        scheduler.run(rows[1:])
    else:
        scheduler.run(rows)
    assert rows[0].wait() == alone and rows[3].wait() == declared[0].strip()
    message, finish = tool_reply(rows[1].wait(), TOOLS, rows[1].finish)
    assert finish == "tool_calls" and len(message["tool_calls"]) == 1
    jsonschema.validate(json.loads(message["tool_calls"][0]["function"]["arguments"]),
                        PARAMETERS[message["tool_calls"][0]["function"]["name"]])


MODEL_TEXT = [  # (what a model wrote, the content, the calls as (name, arguments))
    ('<tool_call>\n{"name": "locate", "arguments": {"shape": "circle", "colour": "red"}}\n</tool_call>', None,
     [("locate", {"shape": "circle", "colour": "red"})]),
    ('Let me look.\n<tool_call>\n{"name": "locate", "arguments": {"shape": "square", "colour": "blue"}}\n</tool_call>'
     '\n<tool_call>\n{"name": "measure", "arguments": "{\\"shape\\": \\"square\\"}"}\n</tool_call>', "Let me look.",
     [("locate", {"shape": "square", "colour": "blue"}), ("measure", {"shape": "square"})]),
    ('<tool_call>\n{"name": "measure", "arguments": {"shape": "circle"}}\n</tool', None,
     [("measure", {"shape": "circle"})]),  # ended inside the closing tag: the call is whole
    ('<tool_call>\n{"name": "locate", "arguments": {"shape": "circ', '<tool_call>\n{"name": "locate", '
     '"arguments": {"shape": "circ', []),  # cut inside the JSON: text
    ('<tool_call>\n{"name": "paint", "arguments": {}}\n</tool_call>',
     '<tool_call>\n{"name": "paint", "arguments": {}}\n</tool_call>', []),  # a tool not offered: text
    ('<tool_call>\n[1, 2]\n</tool_call> and more', '<tool_call>\n[1, 2]\n</tool_call> and more', []),
    ("2 < 3 and <tool is not a call", "2 < 3 and <tool is not a call", []),
]


@pytest.mark.parametrize("text, content, calls", MODEL_TEXT)
def test_auto_reads_the_calls_a_model_writes_whole_and_streamed_in_any_pieces(text, content, calls):
    message, finish = tool_reply(text, TOOLS, "stop")
    assert message["content"] == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls", [])] \
        == calls
    assert finish == ("tool_calls" if calls else "stop")
    for size in (1, 3, 7, len(text)):  # streamed in pieces of any size: the same content and calls
        stream = ToolCallStream(TOOLS)
        deltas = [d for i in range(0, len(text), size) for d in stream.feed(text[i:i + size])] + stream.close()
        said = "".join(d.get("content", "") for d in deltas)
        made = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
        assert said.strip() == (content or "")
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in made] == calls
        assert [c["index"] for c in made] == list(range(len(calls)))
        assert stream.finish_reason("stop") == finish
