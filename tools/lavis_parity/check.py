"""Run in xllm's environment (see run.sh): import LAVIS's Q-Former checkpoint into xllm and compare outputs.

    python check.py --reference DIR [--checkpoint LAVIS.pth]

Reads what `make_reference.py` wrote in DIR (LAVIS's query outputs for fixed image features, and LAVIS's
forward+backward time at BLIP-2's shape), imports the checkpoint with `xllm.adapters.weight_import`, and
prints max |Δ| of the query outputs and of the projected tokens, then xllm's time at the same shape and the ratio.
Exits non-zero when max |Δ| > 1e-5.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn

from xllm.adapters.weight_import import import_qformer_weights, read_checkpoint
from xllm.blocks.bridge import QFormerBridge
from xllm.blocks.qformer import QFormer


def bridge_like(state: dict[str, torch.Tensor], heads: int, llm_width: int | None) -> nn.Module:
    """A module holding a `QFormerBridge` shaped like the checkpoint (no text side: the query path)."""
    queries = state["query_tokens"]
    layers = {int(m.group(1)) for k in state if (m := re.match(r"Qformer\.bert\.encoder\.layer\.(\d+)\.", k))}
    cross = sorted({int(m.group(1)) for k in state
                    if (m := re.match(r"Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.", k))})
    qformer = QFormer(
        state["ln_vision.weight"].shape[0], num_query_tokens=queries.shape[1], hidden_size=queries.shape[2],
        num_layers=len(layers), num_heads=heads,
        intermediate_size=state["Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
        # Layer i cross-attends when i % frequency == 0; one such layer means a frequency of at least the depth.
        cross_attention_frequency=cross[1] - cross[0] if len(cross) > 1 else len(layers), dropout=0.0,
    )
    holder = nn.Module()
    holder.bridge = QFormerBridge(qformer)
    if llm_width is not None:
        holder.bridge.attach(llm_width)
    return holder.eval()


def time_xllm(shape: dict, repeats: int) -> float:
    torch.manual_seed(0)
    qformer = QFormer(shape["vision_width"], num_query_tokens=shape["queries"], hidden_size=shape["hidden_size"],
                      num_layers=shape["num_hidden_layers"], num_heads=shape["num_attention_heads"],
                      intermediate_size=shape["intermediate_size"], cross_attention_frequency=2)
    bridge = QFormerBridge(qformer).train()
    features = torch.randn(shape["batch"], shape["vision_tokens"], shape["vision_width"])
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        bridge.qformer(bridge.features(features)).float().pow(2).mean().backward()
        seconds.append(time.perf_counter() - start)
    return sorted(seconds[1:])[len(seconds[1:]) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference", required=True, help="the folder make_reference.py wrote")
    parser.add_argument("--checkpoint", default=None, help="default: the random LAVIS checkpoint in --reference")
    parser.add_argument("--heads", type=int, default=None, help="ignored here: make_reference.py records the head count")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no_timing", action="store_true")
    args = parser.parse_args()
    reference_dir = Path(args.reference)
    state = read_checkpoint(args.checkpoint or reference_dir / "lavis_qformer.pth")
    reference = read_checkpoint(reference_dir / "lavis_reference.pth")
    heads = json.loads((reference_dir / "shape.json").read_text())["num_attention_heads"]
    model = bridge_like(state, heads, reference["projected"].shape[-1])
    report = import_qformer_weights(model, {k: v.float() for k, v in state.items()})
    print(report.summary())
    with torch.no_grad():
        queries = model.bridge.qformer(model.bridge.features(reference["image_features"]))
        projected = model.bridge.projection(queries)
    delta = float((queries - reference["query_output"]).abs().max())
    delta_projected = float((projected - reference["projected"]).abs().max())
    print(f"max |Δ| query outputs: {delta:.2e}; projected tokens: {delta_projected:.2e} (LAVIS vs xllm)")
    if not args.no_timing and (reference_dir / "timing.json").is_file():
        timing = json.loads((reference_dir / "timing.json").read_text())
        xllm_seconds = time_xllm(timing["shape"], args.repeats)
        print(f"forward+backward at {timing['shape']} on {torch.get_num_threads()} threads: LAVIS "
              f"{timing['lavis_seconds']:.3f} s (transformers {timing['transformers']}), xllm {xllm_seconds:.3f} s: "
              f"LAVIS / xllm = {timing['lavis_seconds'] / xllm_seconds:.2f}")
    sys.exit(0 if max(delta, delta_projected) <= 1e-5 else 1)


if __name__ == "__main__":
    main()
