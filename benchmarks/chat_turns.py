"""Seconds per chat turn with the LLM's KV cache carried across turns (`xllm chat`'s way) and without, side by side.

    python benchmarks/chat_turns.py --adapter runs/demo/stage2/adapter --image .cache/demo/data/images/test_00000.png

One conversation of `--turns` questions about one image, asked twice on the same model: once recomputing the
whole conversation every turn, once reusing the previous turns' keys/values (`ConversationCache`). Replies are
greedy, so both runs must give the same replies (checked). Time to first token is what the cache shortens.
"""

from __future__ import annotations

import argparse
import time

from xllm.apps.chat import ChatSession
from xllm.generation import ConversationCache
from xllm.model import XLLM

QUESTIONS = ["Is there a blue circle in the image?", "Describe the image.", "How many shapes are there?",
             "Is there a red square?", "What colour is the triangle?", "Is there a green circle?",
             "Describe the image briefly.", "Is there a yellow square?"]


def one_run(model: XLLM, image: str, turns: int, max_new_tokens: int, reuse: bool) -> list[tuple]:
    """(seconds to the first piece, seconds for the turn, reply, positions in the conversation) of each turn."""
    session = ChatSession(model, max_new_tokens)
    session.attach("image", image)
    rows = []
    for question in (QUESTIONS * 4)[:turns]:
        if not reuse:
            session.cache = ConversationCache()  # a fresh cache each turn: the whole conversation is recomputed
        start, first, pieces = time.perf_counter(), None, []
        for piece in session.ask(question):
            first = first if first is not None else time.perf_counter() - start
            pieces.append(piece)
        seconds = time.perf_counter() - start
        positions = len(session.cache.embeds) if session.cache.embeds is not None else 0
        rows.append((first or float("nan"), seconds, "".join(pieces).strip(), positions))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=24)
    args = parser.parse_args()
    model = XLLM.from_pretrained(args.adapter).eval()
    one_run(model, args.image, 1, 4, reuse=False)  # warm-up
    recompute = one_run(model, args.image, args.turns, args.max_new_tokens, reuse=False)
    reuse = one_run(model, args.image, args.turns, args.max_new_tokens, reuse=True)
    print(f"{'turn':>4} {'positions':>9}  {'first token: recompute':>22} {'reuse':>7} {'ratio':>6}   "
          f"{'turn: recompute':>15} {'reuse':>7}")
    for turn, ((f0, t0, r0, _), (f1, t1, r1, n)) in enumerate(zip(recompute, reuse), 1):
        assert r0 == r1, f"turn {turn}: the cache changed the reply: {r0!r} vs {r1!r}"
        print(f"{turn:>4} {n:>9}  {f0:>20.3f} s {f1:>6.3f}s {f0 / f1:>5.1f}x   {t0:>13.3f} s {t1:>6.3f}s")
    mean = lambda rows, i: sum(r[i] for r in rows[1:]) / max(1, len(rows) - 1)  # noqa: E731
    print(f"turns 2-{args.turns}: first token {mean(recompute, 0):.3f} s -> {mean(reuse, 0):.3f} s "
          f"({mean(recompute, 0) / mean(reuse, 0):.1f}x); turn {mean(recompute, 1):.3f} s -> {mean(reuse, 1):.3f} s")


if __name__ == "__main__":
    main()
