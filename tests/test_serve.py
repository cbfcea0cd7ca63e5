"""`xllm serve`: the official `openai` client talks to it; answers equal `XLLM.chat`'s, errors use OpenAI's shape."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from tests.conftest import make_model, text_side
from xllm.apps.batching import BatchGenerator, Generation
from xllm.apps.serve import ChatCompletions, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


server_of: dict = {}  # client -> the ChatCompletions behind it (what the tests inspect)


@pytest.fixture(scope="module")
def server(tiny):
    model = make_model(tiny, qformer=text_side(tiny)).eval()
    images = tiny / "data" / "images"
    completions = ChatCompletions(model, "tiny", media_dirs=[images], max_media=3)
    port = free_port()
    config = uvicorn.Config(create_app(completions, max_request_bytes=2**20), host="127.0.0.1", port=port,
                            log_level="warning")
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if uvicorn_server.started:
            break
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    server_of[client] = completions
    yield model, client, images, port
    uvicorn_server.should_exit = True
    thread.join(timeout=10)


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def ask(text: str, image: Path | None = None) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}}] if image else []
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def test_an_answer_about_an_image_plain_and_streamed(server):
    model, client, images, _ = server
    image = images / "test_00000.png"
    expected = model.chat([{"from": "user", "value": "<image>\nIs there a red circle?"}], {"image": str(image)},
                          max_new_tokens=6)
    response = client.chat.completions.create(model="tiny", messages=[ask("Is there a red circle?", image)],
                                              max_tokens=6)
    assert response.choices[0].message.content == expected
    assert response.usage.prompt_tokens > 4 and response.usage.completion_tokens >= 1
    assert [m.id for m in client.models.list().data] == ["tiny"]

    stream = client.chat.completions.create(model="tiny", messages=[ask("Is there a red circle?", image)],
                                            max_tokens=6, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces).strip() == expected


def test_a_conversation_continues_and_a_path_inside_an_allowed_folder_works(server):
    model, client, images, _ = server
    image = images / "test_00001.png"
    first = client.chat.completions.create(model="tiny", max_tokens=5, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(image)}},
                                     {"type": "text", "text": "What is there?"}]}]).choices[0].message.content
    second = client.chat.completions.create(model="tiny", max_tokens=5, messages=[
        ask("What is there?", image), {"role": "assistant", "content": first},
        {"role": "user", "content": "And what colour?"}]).choices[0].message.content
    assert second == model.chat([{"from": "user", "value": "<image>\nWhat is there?"},
                                 {"from": "assistant", "value": first},
                                 {"from": "user", "value": "And what colour?"}], {"image": str(image)}, max_new_tokens=5)


def test_bad_requests_get_openai_errors(server, tmp_path):
    _, client, images, port = server
    with pytest.raises(openai.BadRequestError, match="'messages' must be a non-empty list"):
        client.chat.completions.create(model="tiny", messages=[])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png")
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="cannot decode image"):
            client.chat.completions.create(model="tiny", messages=[ask("What is this?", broken)], stream=stream)
    with pytest.raises(openai.BadRequestError, match="too many media items: at most 3"):
        client.chat.completions.create(model="tiny", messages=[ask("?", images / "test_00000.png")] * 4 + [
            {"role": "user", "content": "?"}])
    outside = tmp_path / "photo.png"
    outside.write_bytes((images / "test_00000.png").read_bytes())
    with pytest.raises(openai.BadRequestError, match="not inside a folder this server may read"):
        client.chat.completions.create(model="tiny", messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(outside)}}]}])
    too_big = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=b"x" * (2**20 + 1))
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]["message"]


def test_eight_concurrent_clients_each_get_their_own_answer(server):
    model, client, images, _ = server
    questions = [(images / f"test_0000{i % 4}.png", f"Question {i}: is there a shape?") for i in range(8)]
    expected = [model.chat([{"from": "user", "value": f"<image>\n{q}"}], {"image": str(p)}, max_new_tokens=5)
                for p, q in questions]

    def one(index: int) -> str:
        path, question = questions[index]
        return client.chat.completions.create(model="tiny", messages=[ask(question, path)],
                                              max_tokens=5).choices[0].message.content

    stats = server_of[client].batches.batch.stats
    steps, row_steps = stats["steps"], stats["row_steps"]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(8))) == expected
    assert stats["row_steps"] - row_steps > stats["steps"] - steps  # rows decoded together, not one by one


def test_each_request_of_a_dynamic_batch_keeps_its_own_length_stop_and_temperature(server):
    model, client, images, _ = server
    dynamic = BatchGenerator(model)  # `xllm serve --batching dynamic` (continuous: tests/test_continuous.py)
    image = str(images / "test_00002.png")
    turns = [{"from": "user", "value": "<image>\nDescribe the picture."}]
    full = model.chat(turns, {"image": image}, max_new_tokens=12)
    short = model.chat(turns, {"image": image}, max_new_tokens=3)
    stop = full.split()[2] if len(full.split()) > 2 else full[-2:]
    rows = [Generation(turns, model.processor().load_media([{"image": [image]}])[0], **settings)
            for settings in ({"max_new_tokens": 12}, {"max_new_tokens": 3}, {"max_new_tokens": 12, "stop": [stop]},
                             {"max_new_tokens": 12, "temperature": 1.5})]
    dynamic.run(rows)
    assert [r.wait() for r in rows[:2]] == [full, short]
    assert rows[1].finish == "length" and rows[1].tokens == 3
    assert rows[2].finish == "stop" and rows[2].wait() == full[:full.find(stop)].strip()
    assert rows[3].tokens <= 12 and rows[3].finish in ("stop", "length")  # sampled beside greedy rows


@pytest.mark.parametrize("batching", ["continuous", "dynamic"])
def test_a_full_queue_is_a_503_in_openai_shape_never_a_hang(tiny, batching):
    model = make_model(tiny).eval()
    completions = ChatCompletions(model, "tiny", max_batch=1, max_queue=1, batching=batching)
    release = threading.Event()
    busy = lambda batch: release.wait(30)  # noqa: E731 - the worker stays busy with its first request
    if batching == "continuous":
        completions.batches.batch.admit = busy
    else:
        completions.batches.run = busy
    media = completions.model.processor().load_media([{}])[0]
    completions.batches.submit(Generation([{"from": "user", "value": "hi"}], media))
    for _ in range(100):  # the worker has taken it: the queue is empty again
        if completions.batches.waiting.empty():
            break
        time.sleep(0.01)
    completions.batches.submit(Generation([{"from": "user", "value": "hi"}], media))  # fills the queue
    from fastapi.testclient import TestClient

    response = TestClient(create_app(completions)).post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
    release.set()
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "server_error" and "retry later" in response.json()["error"]["message"]


def test_a_video_adapter_is_served_and_reads_video_url_parts(tiny, tmp_path):
    from tests.test_video import clip, video_model

    model = video_model(tiny).eval()
    path = clip(tiny, tmp_path, "clip.mkv", [0, 1, 2, 3])
    expected = model.chat([{"from": "user", "value": "<video>\nWhat happens?"}], {"video": path}, max_new_tokens=5)
    from fastapi.testclient import TestClient

    client = TestClient(create_app(ChatCompletions(model, "tiny-video")))
    url = "data:video/x-matroska;base64," + base64.b64encode(Path(path).read_bytes()).decode()
    video = {"type": "video_url", "video_url": {"url": url}}
    answered = client.post("/v1/chat/completions", json={"model": "tiny-video", "max_tokens": 5, "messages": [
        {"role": "user", "content": [video, {"type": "text", "text": "What happens?"}]}]})
    assert answered.status_code == 200, answered.text
    assert answered.json()["choices"][0]["message"]["content"] == expected
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    refused = client.post("/v1/chat/completions", json={"model": "tiny-video", "messages": [
        {"role": "user", "content": [image]}]})
    assert refused.status_code == 400 and "video_url" in refused.json()["error"]["message"]


def chromium() -> str:
    """Debian's Chromium (`make test` installs it when run as root, as CI is); skipped, saying why, without it."""
    path = os.environ.get("XLLM_CHROMIUM") or shutil.which("chromium")
    if not path or not Path(path).exists():
        pytest.skip("no Chromium: `make test` installs Debian's `chromium` when run as root (apt-get)")
    return path


def test_the_page_in_a_headless_browser_streams_answers_and_continues_the_conversation(server, tmp_path):
    from playwright.sync_api import sync_playwright

    model, _, images, port = server
    image = images / "test_00002.png"
    first_turn = [{"from": "user", "value": "<image>\nIs there a blue square?"}]
    first = model.chat(first_turn, {"image": str(image)}, max_new_tokens=128)
    second = model.chat([*first_turn, {"from": "assistant", "value": first},
                         {"from": "user", "value": "What else?"}], {"image": str(image)}, max_new_tokens=128)
    # The flags keep Chromium from reaching for Google's services, which a closed network refuses.
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True, args=args)
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/")
        page.set_input_files("#file", str(image))
        page.fill("#text", "Is there a blue square?")
        page.click("#send")
        page.wait_for_selector("#answer-1[data-done=true]", timeout=60_000)
        assert page.text_content("#answer-1").strip() == f"xllm: {first}"
        assert page.locator("#log img").count() == 1  # the attached image is shown with the question
        page.fill("#text", "What else?")
        page.press("#text", "Enter")
        page.wait_for_selector("#answer-3[data-done=true]", timeout=60_000)
        assert page.text_content("#answer-3").strip() == f"xllm: {second}"
        page.screenshot(path=str(tmp_path / "page.png"))
        browser.close()
