"""`xllm chat`: a multi-turn conversation with media, streamed, through the same path as `XLLM.chat`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import make_model, text_side
from xllm.apps.chat import ChatSession
from xllm.model import XLLM


def test_a_session_replies_as_model_chat_does_turn_after_turn(tiny, tmp_path):
    model = make_model(tiny, qformer=text_side(tiny)).eval()
    photo = str(tiny / "data" / "images" / "test_00000.png")
    session = ChatSession(model, max_new_tokens=6)
    session.attach("image", photo)
    first = "".join(session.ask("Is there a red circle?")).strip()
    turns = [{"from": "user", "value": "<image>\nIs there a red circle?"}]
    assert first == model.chat(turns, {"image": photo}, max_new_tokens=6)

    assert session.cache.reused == 0

    # The second turn sees the first exchange and the image attached to it; it reuses the first turn's KV cache
    # (the prompt, image tokens included, and the reply), and answers as a model.chat that recomputes all does.
    second = "".join(session.ask("And a square?")).strip()
    turns += [{"from": "assistant", "value": first}, {"from": "user", "value": "And a square?"}]
    assert second == model.chat(turns, {"image": [photo]}, max_new_tokens=6)
    assert len(session.turns) == 4 and session.media == {"image": [photo]}
    first_prompt = model.embed_prompts(model.processor()([turns[:1]], [{"image": photo}]))[0].shape[1]  # image tokens in
    assert session.cache.reused >= first_prompt

    # A third turn with a second image: still equal, still reusing.
    other = str(tiny / "data" / "images" / "test_00001.png")
    session.attach("image", other)
    third = "".join(session.ask("Which one is brighter?")).strip()
    turns += [{"from": "assistant", "value": second}, {"from": "user", "value": "<image>\nWhich one is brighter?"}]
    assert third == model.chat(turns, {"image": [photo, other]}, max_new_tokens=6)
    assert session.cache.reused > first_prompt

    session.reset()
    assert "".join(session.ask("Hello")).strip() == model.chat([{"from": "user", "value": "Hello"}], max_new_tokens=6)


def test_the_command_reads_a_script_on_stdin(tiny, tmp_path):
    directory = make_model(tiny).save_pretrained(tmp_path / "adapter")
    command = Path(sys.executable).parent / "xllm"
    assert command.is_file() or shutil.which("xllm"), "make install registers the `xllm` command"
    photo = tiny / "data" / "images" / "test_00000.png"
    script = "\n".join([f"/image {photo}", "Is there a red circle?", "What colour is it?", "/audio clip.wav",
                        "/image missing.png", "/reset", "Hello", "/quit", "never read"]) + "\n"
    out = subprocess.run([str(command), "chat", "--adapter", str(directory), "--max_new_tokens", "3"], input=script,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert text.count("xllm: ") == 3, text
    assert f"(image attached: {photo})" in text and "(new conversation)" in text
    assert "error: this model reads image, not audio" in text and "error: no such file: missing.png" in text


def test_an_undecodable_image_is_reported_and_the_conversation_goes_on(tiny, tmp_path):
    model: XLLM = make_model(tiny).eval()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    session = ChatSession(model, max_new_tokens=3)
    session.attach("image", str(broken))
    try:
        list(session.ask("What is this?"))
        raise AssertionError("an undecodable image must raise")
    except ValueError as err:
        assert "broken.png" in str(err)
    assert session.turns == []  # nothing half-done joined the conversation
