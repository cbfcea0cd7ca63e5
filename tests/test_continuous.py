"""Continuous batching: rows join and leave between decode steps, and every greedy reply stays the one-at-a-time one."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn

from tests.conftest import make_model, text_side
from tests.test_serve import free_port
from xllm.apps.batching import Generation
from xllm.apps.continuous import ContinuousBatch
from xllm.apps.serve import ChatCompletions, create_app


@pytest.fixture(scope="module")
def model(tiny):
    return make_model(tiny, qformer=text_side(tiny)).eval()


def request(model, tiny, index: int, question: str = "is there a shape?", **settings) -> Generation:
    image = str(tiny / "data" / "images" / f"test_0000{index % 4}.png")
    media = model.processor().load_media([{"image": [image]}])[0]
    return Generation([{"from": "user", "value": f"<image>\nQuestion {index}: {question}"}], media, **settings)


def alone(model, generation: Generation) -> str:
    """The reply `XLLM.chat` gives this request on its own (greedy)."""
    return model.chat(generation.turns, generation.media, max_new_tokens=generation.max_new_tokens)


def test_rows_join_mid_decode_and_leave_at_their_own_end_with_the_one_at_a_time_replies(model, tiny):
    lengths = [3, 10, 5, 12, 4, 7]
    rows = [request(model, tiny, i, max_new_tokens=n) for i, n in enumerate(lengths)]
    expected = [alone(model, row) for row in rows]
    stop = expected[3].split()[1] if len(expected[3].split()) > 1 else expected[3][2:4]
    stopped = request(model, tiny, 3, max_new_tokens=12, stop=[stop])
    sampled = request(model, tiny, 2, max_new_tokens=8, temperature=1.5)
    batch = ContinuousBatch(model)
    batch.admit(rows[:2])
    batch.step()
    batch.step()
    batch.admit([rows[2], sampled])  # joins two rows that are mid-reply
    batch.step()
    batch.admit([*rows[3:], stopped])  # joins one row fewer: the first has left at its own max_tokens
    assert rows[0].finish == "length" and rows[0] not in batch.rows
    while len(batch):
        batch.step()
    assert [row.wait() for row in rows] == expected
    assert all(row.tokens <= n and (row.finish == "length") == (row.tokens == n) for row, n in zip(rows, lengths))
    assert stopped.finish == "stop" and stopped.wait() == expected[3][:expected[3].find(stop)].strip()
    assert 1 <= sampled.tokens <= 8  # sampled beside greedy rows, which stayed exact

    again = [request(model, tiny, i, max_new_tokens=n) for i, n in enumerate(lengths)]
    reused, computed = batch.prefixes.reused, batch.prefixes.computed
    batch.run(again)  # the same prompts: their keys/values are taken from the prefix cache, the replies unchanged
    assert [row.wait() for row in again] == expected
    print("reused", batch.prefixes.reused - reused, "computed", batch.prefixes.computed - computed)
    assert batch.prefixes.reused - reused > 4 * (batch.prefixes.computed - computed)


def test_no_request_waits_for_another_reply_and_a_cancelled_row_leaves_at_once(model, tiny):
    long, short, cancelled = (request(model, tiny, i, max_new_tokens=n) for i, n in enumerate((200, 3, 200)))
    batch = ContinuousBatch(model, prefix_cache_mb=0)
    batch.admit([long, cancelled])
    batch.step()
    batch.admit([short])
    for _ in range(3):
        batch.step()
    assert short.finish == "length" and long.finish is None  # the short reply did not wait for the long one
    cancelled.cancel()
    batch.step()
    assert cancelled.finish == "cancelled" and batch.rows == [long] and batch.stats["cancelled"] == 1
    assert batch.prefixes.reused == 0  # no prefix cache: nothing reused
    long.cancel()
    batch.step()
    assert not batch.rows and batch.cache is None


def test_a_client_that_disconnects_frees_its_row(model, tiny):
    completions = ChatCompletions(model, "tiny", max_batch=1)  # one row: the next request needs the first's
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(completions), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    # The tiny model answers "hi" with 2000+ tokens and no end (checked): ~2 minutes here without the disconnect.
    body = {"model": "tiny", "max_tokens": 4000, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        with httpx.stream("POST", url, json=body, timeout=30) as response:
            next(response.iter_lines())  # the stream has begun: the row is generating
        # Without the disconnect freeing it, this request would wait for the first's 4000 tokens.
        answer = httpx.post(url, json={**body, "max_tokens": 3, "stream": False}, timeout=20)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
        assert completions.batches.batch.stats["cancelled"] == 1
    finally:
        server.should_exit = True
