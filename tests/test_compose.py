"""One model from adapters trained on their own (issue 26, step 1): `XLLM.from_adapters` and `init_adapters:`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_image_interface, make_model, text_side
from tests.test_video import clip, video_interface, video_model
from xllm.llm import LoraSettings
from xllm.model import XLLM
from xllm.training import XLLMModule

IMAGE_Q = [{"from": "user", "value": "<image>\nIs there a red circle?"}]
VIDEO_Q = [{"from": "user", "value": "<video>\nWhat happens?"}]
BOTH_Q = [{"from": "user", "value": "<image>\n<video>\nIs the picture a frame of the clip?"}]


@pytest.fixture(scope="module")
def adapters(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("compose")
    image = make_model(tiny).eval().save_pretrained(folder / "image", stage=2)
    video = video_model(tiny).eval().save_pretrained(folder / "video", stage=2)
    media = {"image": str(tiny / "data" / "images" / "test_00000.png"),
             "video": clip(tiny, folder, "clip.mkv", [0, 1, 2, 3])}
    return folder, image, video, media


def test_composed_interfaces_answer_as_their_own_adapters_and_reload_as_one(adapters, tmp_path):
    _, image, video, media = adapters
    joint = XLLM.from_adapters({"image": image, "video": video})
    assert sorted(joint.interfaces) == ["image", "video"]
    assert joint.chat(IMAGE_Q, {"image": media["image"]}, max_new_tokens=6) == \
        XLLM.from_pretrained(image).chat(IMAGE_Q, {"image": media["image"]}, max_new_tokens=6)
    assert joint.chat(VIDEO_Q, {"video": media["video"]}, max_new_tokens=6) == \
        XLLM.from_pretrained(video).chat(VIDEO_Q, {"video": media["video"]}, max_new_tokens=6)
    own = dict(joint.named_parameters())
    for modality, directory in (("image", image), ("video", video)):
        assert all(torch.equal(own[k], v) for k, v in load_file(str(directory / "adapter.safetensors")).items())

    # Both media in one conversation: each item's tokens at its own placeholder (4 + 4 media tokens).
    batch = joint.processor()([BOTH_Q], [media], prompt=True)
    with torch.no_grad():
        out = joint(batch["input_ids"], batch["attention_mask"], batch["media"])
    assert out.media_tokens == 8
    both = joint.chat(BOTH_Q, media, max_new_tokens=6)

    saved = joint.save_pretrained(tmp_path / "joint", stage=2)
    assert sorted(json.loads((saved / "config.json").read_text())["interfaces"]) == ["image", "video"]
    script = f"""
import json
from xllm import XLLM
model = XLLM.from_pretrained({str(saved)!r})
print(json.dumps([model.chat({IMAGE_Q!r}, {{"image": {media["image"]!r}}}, max_new_tokens=6),
                  model.chat({BOTH_Q!r}, {media!r}, max_new_tokens=6)]))
"""
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert json.loads(fresh.stdout.strip().splitlines()[-1]) == [
        joint.chat(IMAGE_Q, {"image": media["image"]}, max_new_tokens=6), both]


def test_adapters_that_do_not_share_the_llm_or_template_are_refused_naming_both(adapters, tiny):
    folder, image, video, _ = adapters
    glm_image = make_model(tiny, llm="glm", template="glm4").save_pretrained(folder / "glm_image", stage=2)
    with pytest.raises(ValueError, match=rf"adapters {glm_image} \(image\) and {video} \(video\) differ in llm.path"):
        XLLM.from_adapters({"image": glm_image, "video": video})
    other_template = XLLM.from_paths(str(tiny / "llama"), {"video": video_interface(tiny)}, template="glm4")
    glm4_video = other_template.save_pretrained(folder / "glm4_video", stage=2)
    with pytest.raises(ValueError, match=r"differ in template: 'vicuna_v1' vs 'glm4'"):
        XLLM.from_adapters({"image": image, "video": glm4_video})
    with pytest.raises(ValueError, match=r"has no 'audio' interface \(it has \['image'\]\)"):
        XLLM.from_adapters({"audio": image})
    lora = make_model(tiny)
    lora.enable_lora(LoraSettings(r=2, alpha=4))
    with pytest.raises(ValueError, match="holds LoRA matrices"):
        XLLM.from_adapters({"image": lora.save_pretrained(folder / "lora_image", stage=2), "video": video})


def test_training_starts_from_composed_adapters(adapters, tiny):
    _, image, video, _ = adapters
    interfaces = {"image": make_image_interface(tiny), "video": video_interface(tiny)}
    module = XLLMModule(llm=str(tiny / "llama"), interfaces=interfaces, stage=2, template="vicuna_v1",
                        init_adapters={"image": str(image), "video": str(video)})
    own = dict(module.model.named_parameters())
    for directory in (image, video):
        assert all(torch.equal(own[k], v) for k, v in load_file(str(directory / "adapter.safetensors")).items())
    with pytest.raises(ValueError, match="trained with template 'vicuna_v1'"):
        XLLMModule(llm=str(tiny / "llama"), interfaces={"image": make_image_interface(tiny)}, stage=2,
                   template="glm4", init_adapters={"image": str(image)})


def test_one_conversation_holds_an_image_a_clip_and_speech_in_chat_serve_and_the_library(adapters, tiny):
    """A composed model reads all three in one conversation: `model.chat`, an `xllm chat` session, and one
    `xllm serve` request with image_url, video_url and input_audio parts through the official client."""
    import base64

    import openai
    from fastapi.testclient import TestClient

    from tests.test_speech import speech_interface
    from xllm.apps.chat import ChatSession
    from xllm.apps.serve import ChatCompletions, create_app

    folder, image, video, media = adapters
    speech = XLLM.from_paths(str(tiny / "llama"), {"audio": speech_interface(tiny)}, template="vicuna_v1")
    audio_adapter = speech.save_pretrained(folder / "audio", stage=1)
    joint = XLLM.from_adapters({"image": image, "video": video, "audio": audio_adapter})
    wav = str(sorted((tiny / "data" / "audio").glob("*.wav"))[0])
    everything = {**media, "audio": wav}
    turns = [{"from": "user", "value": "<image>\n<video>\n<audio>\nWhat do they share?"}]
    expected = joint.chat(turns, everything, max_new_tokens=5)

    session = ChatSession(joint, max_new_tokens=5)
    for modality, path in (("image", media["image"]), ("video", media["video"]), ("audio", wav)):
        session.attach(modality, path)
    assert "".join(session.ask("What do they share?")).strip() == expected

    def data_url(path: str, mime: str) -> str:
        return f"data:{mime};base64," + base64.b64encode(open(path, "rb").read()).decode()

    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", max_retries=0,
                           http_client=TestClient(create_app(ChatCompletions(joint, "joint"))))
    reply = client.chat.completions.create(model="joint", max_tokens=5, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(media["image"], "image/png")}},
        {"type": "video_url", "video_url": {"url": data_url(media["video"], "video/x-matroska")}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(open(wav, "rb").read()).decode(),
                                                "format": "wav"}},
        {"type": "text", "text": "What do they share?"}]}])
    assert reply.choices[0].message.content == expected


def test_a_spoken_question_gives_the_picture_q_former_the_model_own_transcript(adapters, tiny):
    """`<image>\\n<audio>` and no text: the image Q-Former reads the model's transcript of the audio (the processor's
    `spoken_instructions`); a turn with text, or its own `instruction`, keeps it; `transcribe_prompt = None` turns
    it off."""
    from tests.test_speech import speech_interface

    folder, _, _, media = adapters
    image = make_model(tiny, qformer=text_side(tiny)).save_pretrained(folder / "aware_image", stage=2)
    speech = XLLM.from_paths(str(tiny / "llama"), {"audio": speech_interface(tiny)}, template="vicuna_v1")
    joint = XLLM.from_adapters({"image": image, "audio": speech.save_pretrained(folder / "spoken", stage=1)})
    wav = str(sorted((tiny / "data" / "audio").glob("*.wav"))[0])
    both = {"image": media["image"], "audio": wav}
    heard = joint.transcribe("audio", [wav])[0]
    assert heard.strip()
    tokenize = joint.interfaces["image"].instruction_tokenizer()

    def read_by_q_former(turns) -> list[int]:
        ids = joint.processor()([turns], [both])["media"]["image"]
        return ids.instruction_ids[0][ids.instruction_mask[0].bool()].tolist()

    assert read_by_q_former([{"from": "user", "value": "<image>\n<audio>"}]) == tokenize(heard.strip())
    assert read_by_q_former([{"from": "user", "value": "<image>\n<audio>\nIs it red?"}]) == tokenize("Is it red?")
    assert read_by_q_former([{"from": "user", "value": "<image>\n<audio>", "instruction": "is it red"}]) == \
        tokenize("is it red")
    spoken = [{"from": "user", "value": "<image>\n<audio>"}]
    assert joint.chat(spoken, both, max_new_tokens=5) == joint.chat(
        [{**spoken[0], "instruction": heard.strip()}], both, max_new_tokens=5)
    joint.transcribe_prompt = None
    assert read_by_q_former(spoken) == tokenize("")
