"""A training step through a frozen LLM held in float32 and quantised, side by side in one process: seconds per step
(forward, and backward to the input embeddings, as an interface's gradient flows) and bytes stored.

Rounds alternate the variants, so a machine shared with other jobs slows them alike; the ratio is the figure to
read. The default is the image demo's LLM and step shape (SmolLM2-135M, batch 8, 96 tokens).

    python benchmarks/frozen_llm_step.py                       # float32 against int8 (torchao on a CPU)
    python benchmarks/frozen_llm_step.py --bits 8 4            # and NF4 (bitsandbytes, when installed)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def step(llm: torch.nn.Module, embeds: torch.Tensor, labels: torch.Tensor) -> float:
    start = time.perf_counter()
    inputs = embeds.detach().requires_grad_()
    llm(inputs_embeds=inputs, labels=labels, use_cache=False).loss.backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", default=".cache/models/smollm2-135m-instruct")
    parser.add_argument("--bits", type=int, nargs="+", default=[8], choices=[4, 8])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()

    from xllm.llm import load_frozen_llm
    from xllm.training.memory import stored_bytes

    variants = {"float32": load_frozen_llm(args.llm)}
    for bits in args.bits:
        variants[f"{bits}-bit"] = load_frozen_llm(args.llm, quantization={"bits": bits})
    torch.manual_seed(0)
    table = variants["float32"].get_input_embeddings().weight
    ids = torch.randint(0, table.shape[0], (args.batch, args.tokens))
    embeds = table[ids].detach()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds + 1):
        for name, llm in variants.items():
            seconds = step(llm, embeds, ids)
            if round_:  # the first round warms up
                times[name].append(seconds)
    base = statistics.median(times["float32"])
    print(f"{args.llm}: batch {args.batch} × {args.tokens} tokens, forward + backward to the inputs, "
          f"median of {args.rounds} alternating rounds ({torch.get_num_threads()} threads)\n")
    print("| LLM | s/step | step vs float32 | MB stored | bytes vs float32 |\n|---|---:|---:|---:|---:|")
    full = sum(stored_bytes(p) for p in variants["float32"].parameters())
    for name, llm in variants.items():
        median = statistics.median(times[name])
        size = sum(stored_bytes(p) for p in llm.parameters())
        print(f"| {name} | {median:.3f} | {median / base:.2f} | {size / 2**20:,.0f} | {size / full:.2f} |")


if __name__ == "__main__":
    main()
