"""Time to first token and tokens/s of a running `xllm serve`, for one client and for N concurrent ones.

    xllm serve --adapter runs/demo/stage2/adapter --port 8000 &
    python benchmarks/serve_latency.py --url http://127.0.0.1:8000/v1 --image photo.png --clients 8

Each client streams one answer to "Describe the image briefly."; tokens are the server's usage counts. Printed
side by side for 1 and N clients: time to first token (median, worst), time per output token after the first
(median), tokens/s per client and in all (the figures lmms-eval's throughput logging reports).
"""

from __future__ import annotations

import argparse
import base64
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import openai


def one(client: openai.OpenAI, image: str, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first content, seconds in all, completion tokens) of one streamed answer (greedy)."""
    start, first, tokens = time.perf_counter(), None, 0
    stream = client.chat.completions.create(
        model="xllm", max_tokens=max_tokens, stream=True, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Describe the image briefly."}]}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return first or float("nan"), time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--image", required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=32)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.url, api_key="unused", max_retries=0, timeout=600)
    with open(args.image, "rb") as handle:
        image = "data:image/png;base64," + base64.b64encode(handle.read()).decode()
    one(client, image, args.max_tokens)  # warm-up
    rows = []
    for clients in (1, args.clients):
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda _: one(client, image, args.max_tokens), range(clients)))
        wall = time.perf_counter() - start
        tokens = sum(r[2] for r in results)
        per_token = statistics.median((r[1] - r[0]) / max(1, r[2] - 1) for r in results)
        rows.append((clients, statistics.median(r[0] for r in results), max(r[0] for r in results), per_token,
                     statistics.median(r[2] / r[1] for r in results), tokens / wall))
    print("| clients | TTFT median (s) | TTFT worst (s) | time per output token (s) | tokens/s per client "
          "| tokens/s in all |")
    print("|---:|---:|---:|---:|---:|---:|")
    for clients, ttft, worst, per_token, per_client, total in rows:
        print(f"| {clients} | {ttft:.2f} | {worst:.2f} | {per_token:.3f} | {per_client:.1f} | {total:.1f} |")
    print(f"\n{args.clients} clients / 1 client, tokens/s in all: {rows[1][5] / rows[0][5]:.2f}x")


if __name__ == "__main__":
    main()
