"""Tokens/s, time to first token and inter-token latency of `xllm serve` under traffic as it comes: mixed questions
and reply lengths, N clients at once and requests arriving at random, against one client, for each scheduler side by
side in one run.

    python benchmarks/serve_latency.py --adapter runs/demo/stage2/adapter --images .cache/demo/data/images

For each server setting (`--settings`: continuous batching, the same without prefix reuse, and dynamic batching as
the baseline) it starts `xllm serve` on a free port, warms it up, and runs, through the official `openai` client
(streamed answers, greedy):

- `1 client`: requests one after another: the mix (each question with each of its lengths) once;
- `N clients`: N clients, each sending its next request when its answer ends, until the mix is asked `--mixes`
  times (the same reply lengths as one client's, in proportion);
- `Poisson x R`: the mix arriving at random (exponential gaps) at R times the rate one client
  sustains on that server (1 / its mean request time), `--rates`;
- `N at once + system`: N requests sent together that share a long system prompt (what prefix reuse is for).

Every request asks about its own picture (`--images`: a folder of pictures, used in turn; the demo's 1,301) so no
prompt repeats an earlier one while there are pictures left. Printed per setting and scenario: completion tokens, tokens/s in all, the ratio to one client's,
time to first token (TTFT) p50/p95, inter-token latency (ITL: time between streamed pieces) p50/p95 and mean
reply length; then the issue's targets, read from the first setting. `--url` measures one running server instead.
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import openai

# Each question asked with each length of LENGTHS: short and long replies mixed. With the image demo's adapter
# (trained on yes/no answers; most open questions get "No"), measured: the yes/no question 1 token, the next three
# ~23, ~13 and ~12, the last one runs to its length; 16.8 tokens a reply on average.
QUESTIONS = ["Is there a blue circle in the image?", "Describe the image briefly.", "Explain what is in the picture.",
             "What do you see? Answer in full sentences.", "What could this picture be used for?"]
LENGTHS = [16, 32, 64]
SYSTEM = ("You are a careful assistant that answers questions about pictures of simple coloured shapes. Look at the "
          "whole picture before answering. Name shapes by their kind (circle, square, triangle) and colour (red, "
          "green, blue, yellow, orange, purple). Say where a shape is with top, bottom, left, right and centre, and "
          "how shapes lie relative to each other. Count shapes exactly. When asked a yes/no question, answer Yes or "
          "No first. Keep answers short and never describe things that are not in the picture.")
SETTINGS = {  # name -> xllm serve arguments
    "continuous": ["--batching", "continuous"],
    "continuous-no-prefix-reuse": ["--batching", "continuous", "--prefix_cache_mb", "0"],
    "dynamic": ["--batching", "dynamic"],  # before continuous batching
}


@dataclass
class Answer:
    start: float
    pieces: list[float] = field(default_factory=list)  # when each content piece arrived
    end: float = 0.0
    tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.pieces[0] - self.start if self.pieces else float("nan")


class Workload:
    """Request k of the run: image k of the folder (in turn), question and length from the mix."""

    def __init__(self, images: list[str]) -> None:
        self.urls = [f"data:image/png;base64,{base64.b64encode(Path(p).read_bytes()).decode()}" for p in images]
        self.mix = [(q, n) for n in LENGTHS for q in QUESTIONS]
        self.next, self.lock = 0, threading.Lock()

    def take(self, position: int) -> tuple[str, str, int]:
        with self.lock:
            k, self.next = self.next, self.next + 1
        question, length = self.mix[position % len(self.mix)]
        return self.urls[k % len(self.urls)], question, length


def ask(client: openai.OpenAI, image: str, question: str, max_tokens: int, system: str | None = None) -> Answer:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                 {"type": "text", "text": question}]})
    answer = Answer(time.perf_counter())
    for chunk in client.chat.completions.create(model="xllm", max_tokens=max_tokens, stream=True, messages=messages):
        if chunk.choices and chunk.choices[0].delta.content:
            answer.pieces.append(time.perf_counter())
        if chunk.usage is not None:
            answer.tokens = chunk.usage.completion_tokens
    answer.end = time.perf_counter()
    return answer


def closed_loop(client, work: Workload, clients: int, requests: int) -> tuple[list[Answer], float]:
    """`clients` clients sending requests back to back until `requests` in all: (answers, wall seconds)."""
    positions = iter(range(requests))
    lock = threading.Lock()

    def one_client(_: int) -> list[Answer]:
        answers = []
        while True:
            with lock:
                position = next(positions, None)
            if position is None:
                return answers
            answers.append(ask(client, *work.take(position)))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = [a for part in pool.map(one_client, range(clients)) for a in part]
    return answers, time.perf_counter() - start


def poisson(client, work: Workload, rate: float, requests: int, seed: int) -> tuple[list[Answer], float]:
    """`requests` requests arriving with exponential gaps at `rate` per second, each on its own connection."""
    rng = random.Random(seed)
    arrivals = []
    for _ in range(requests):
        arrivals.append((arrivals[-1] if arrivals else 0.0) + rng.expovariate(rate))
    start = time.perf_counter()

    def arrive(position: int) -> Answer:
        time.sleep(max(0.0, start + arrivals[position] - time.perf_counter()))
        return ask(client, *work.take(position))

    with ThreadPoolExecutor(requests) as pool:
        answers = list(pool.map(arrive, range(requests)))
    return answers, time.perf_counter() - start


def at_once_with_system(client, work: Workload, clients: int) -> tuple[list[Answer], float]:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda p: ask(client, *work.take(p), system=SYSTEM), range(clients)))
    return answers, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    values = sorted(v for v in values if v == v)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]  # nearest rank


def summary(answers: list[Answer], wall: float) -> dict[str, float]:
    gaps = [b - a for answer in answers for a, b in zip(answer.pieces, answer.pieces[1:])]
    tokens = sum(a.tokens for a in answers)
    return {"requests": len(answers), "tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft50": percentile([a.ttft for a in answers], 50), "ttft95": percentile([a.ttft for a in answers], 95),
            "itl50": percentile(gaps, 50), "itl95": percentile(gaps, 95), "mean_reply": tokens / len(answers),
            "request_s": statistics.mean(a.end - a.start for a in answers)}


def start_server(args, extra: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "xllm.apps.serve", "--adapter", args.adapter, "--port", str(port),
               "--max_batch", str(args.clients), *extra]
    if args.llm:
        command += ["--llm", args.llm]
    for encoder in args.encoder:
        command += ["--encoder", encoder]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"xllm serve exited ({process.returncode}); its log: {log}")
        try:
            openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=2).models.list()
            return process, url
        except openai.APIConnectionError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"xllm serve did not start in 600 s; its log: {log}")


def measure(url: str, args, images: list[str]) -> list[tuple[str, dict[str, float]]]:
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    work = Workload(images)
    ask(client, *work.take(1))  # warm-up
    mix = len(QUESTIONS) * len(LENGTHS)
    rows = []
    one = summary(*closed_loop(client, work, 1, mix))
    rows.append(("1 client", one))
    rows.append((f"{args.clients} clients", summary(*closed_loop(client, work, args.clients, mix * args.mixes))))
    for rate in args.rates:
        answers, wall = poisson(client, work, rate / one["request_s"], mix, seed=len(rows))
        rows.append((f"Poisson x{rate:g} ({rate / one['request_s']:.2f}/s)", summary(answers, wall)))
    rows.append((f"{args.clients} at once + system", summary(*at_once_with_system(client, work, args.clients))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", help="adapter directory: this script starts `xllm serve` for each setting")
    parser.add_argument("--llm", default=None, help="passed to xllm serve")
    parser.add_argument("--encoder", action="append", default=[], metavar="MODALITY=PATH", help="passed to xllm serve")
    parser.add_argument("--url", default=None, help="measure this running server instead (one setting)")
    parser.add_argument("--images", required=True, help="a folder of pictures (or one picture)")
    parser.add_argument("--pattern", default="*.png", help="which pictures of the folder")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of: {', '.join(SETTINGS)}")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--mixes", type=int, default=3, help="how many times the N clients ask the whole mix")
    parser.add_argument("--rates", default="0.5,1,2", help="Poisson rates, as multiples of one client's")
    parser.add_argument("--logs", default="serve_latency_logs", help="folder for the servers' logs")
    args = parser.parse_args()
    args.rates = [float(r) for r in args.rates.split(",") if r]
    folder = Path(args.images)
    images = [str(folder)] if folder.is_file() else sorted(str(p) for p in folder.glob(args.pattern))
    if not images:
        raise SystemExit(f"no pictures matching {args.pattern} in {folder}")
    results = []
    if args.url:
        results.append(("(running server)", measure(args.url, args, images)))
    else:
        if not args.adapter:
            raise SystemExit("give --adapter (or --url)")
        Path(args.logs).mkdir(exist_ok=True)
        for name in args.settings.split(","):
            process, url = start_server(args, SETTINGS[name], Path(args.logs) / f"{name}.log")
            try:
                results.append((name, measure(url, args, images)))
            finally:
                process.terminate()
                process.wait(timeout=60)
            print(f"measured: {name}", file=sys.stderr, flush=True)

    print(f"| setting | scenario | requests | tokens (mean reply) | tokens/s in all | x 1 client | TTFT p50 (s) "
          f"| TTFT p95 (s) | ITL p50 (s) | ITL p95 (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, rows in results:
        one = rows[0][1]["tokens_per_s"]
        for scenario, r in rows:
            print(f"| {name} | {scenario} | {r['requests']} | {r['tokens']} ({r['mean_reply']:.1f}) "
                  f"| {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / one:.2f}x | {r['ttft50']:.2f} | {r['ttft95']:.2f} "
                  f"| {r['itl50']:.3f} | {r['itl95']:.3f} |")
    name, rows = results[0]
    one, many = rows[0][1], rows[1][1]
    ratio = many["tokens_per_s"] / one["tokens_per_s"]
    print(f"\n{name}: {args.clients} clients / 1 client, tokens/s in all: {ratio:.2f}x (target >= 5x) with TTFT p50 "
          f"{many['ttft50']:.2f} s (target <= 0.5 s)")
    for scenario, r in rows:
        if scenario.startswith("Poisson x1 "):
            print(f"{name}: {scenario}: TTFT p95 {r['ttft95']:.2f} s = {r['ttft95'] / one['ttft50']:.2f}x one client's "
                  f"TTFT p50 {one['ttft50']:.2f} s (target <= 2x)")


if __name__ == "__main__":
    main()
