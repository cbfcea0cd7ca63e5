"""Ways of holding the frozen LLM side by side, in one run: per-rank memory (logical and from the OS), samples/s,
tokens/s and MFU.

Every run is the ordinary `train.py fit` (stage 2 with LoRA, one data source), so what is measured is what users run:

- `DDP`: every rank loads the whole LLM;
- `sharded`: FSDP2, the LLM loaded whole by every rank and then sharded (`meta_llm: false`, xllm's path before
  meta loading);
- `sharded + meta`: FSDP2, the LLM built on the meta device, sharded, then each rank reads only its rows (the
  default under `ShardedStrategy`);
- `8-bit`: DDP over an int8 frozen LLM (`llm_quantization: {bits: 8}`: torchao on a CPU, bitsandbytes on a GPU);
- `sharded + meta + checkpointing`: as `sharded + meta`, each decoder layer recomputed in the backward
  (`activation_checkpointing: true`).

Each writes its per-rank figures (`xllm.training.memory.RankMemory`: parameter bytes as stored, gradient elements,
and the OS's peak resident memory — at the first optimizer step and over the whole run) and its throughput
(`ThroughputLogger`, in a CSV). On the CPU (default) it uses the tiny random models, or with `--llm_layers 8
--llm_hidden 1024` a ~100M-parameter (412 MB float32) Llama with random weights; on GPUs, `--llm_layers 32
--llm_hidden 4096` builds a 7B-shaped one (no hub), as `benchmarks/gpu_check.py` does. `--turns N` repeats each
training conversation's turns N times (long sequences, where activations dominate and checkpointing shows).

    python benchmarks/scale.py                                    # 2 CPU processes, tiny models
    python benchmarks/scale.py --llm_layers 8 --llm_hidden 1024 --turns 8 --max_length 640 --steps 4
    python benchmarks/scale.py --accelerator gpu --devices 8 --llm_layers 32 --llm_hidden 4096 --peak_tflops 989
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def random_llm(root: Path, layers: int, hidden: int, tokenizer: Path) -> Path:
    """A Llama of the given shape with random weights, saved with the tiny tokenizer (bf16 on disk)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokens = PreTrainedTokenizerFast.from_pretrained(str(tokenizer))
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128,
                         num_key_value_heads=hidden // 128, pad_token_id=tokens.pad_token_id or 0)
    with torch.device("meta"):
        LlamaForCausalLM(config)  # checks the shape before the slow init
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "llm")
    tokens.save_pretrained(root / "llm")
    return root / "llm"


# name -> (strategy, XLLMModule settings); the table's rows, in this order.
RUNS: dict[str, tuple[str, dict]] = {
    "DDP": ("ddp", {}),
    "sharded": ("sharded", {"meta_llm": False}),
    "sharded + meta": ("sharded", {}),
    "8-bit (DDP)": ("ddp", {"llm_quantization": {"bits": 8}}),
    "sharded + meta + checkpointing": ("sharded", {"activation_checkpointing": True}),
}


def long_conversations(source: Path, out: Path, turns: int) -> Path:
    """`source`'s conversations with their turns repeated `turns` times (the media placeholder only in the first)."""
    lines = []
    for line in source.read_text().splitlines():
        record = json.loads(line)
        again = [{**turn, "value": turn["value"].replace("<image>\n", "")} for turn in record["conversations"]]
        record["conversations"] = record["conversations"] + again * (turns - 1)
        lines.append(json.dumps(record))
    out.write_text("\n".join(lines) + "\n")
    return out


def config(tiny: Path, llm: Path, out: Path, args, strategy: str, settings: dict, data: Path) -> Path:
    gpu = args.accelerator == "gpu"
    trainer = {"accelerator": args.accelerator, "devices": args.devices, "num_nodes": args.num_nodes,
               "max_steps": args.steps, "log_every_n_steps": 1, "num_sanity_val_steps": 0,
               "enable_checkpointing": False, "precision": "bf16-mixed" if gpu else "32-true",
               "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                          "init_args": {"save_dir": str(out), "name": "csv"}},
               "callbacks": [{"class_path": "xllm.training.memory.RankMemory",
                              "init_args": {"folder": str(out / "memory")}}]}
    if strategy == "ddp":
        trainer["strategy"] = "ddp"
    qformer = {"num_query_tokens": 4, "hidden_size": 32, "layers": 2, "heads": 2, "intermediate_size": 64,
               "bert_init": str(tiny / "bert"), "text": True, "instruction_aware": True}
    path = out / "config.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "seed_everything": 0, "trainer": trainer, "throughput": {"peak_tflops": args.peak_tflops},
        "model": {"class_path": "xllm.training.XLLMModule", "init_args": {
            "llm": str(llm), "llm_dtype": "bfloat16" if gpu else "float32", "template": "vicuna_v1", "stage": 2,
            "lr": 1.0e-4, "max_length": args.max_length, "adapter_dir": str(out / "adapter"), **settings,
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "interfaces": {"image": {"class_path": "xllm.interfaces.ImageInterface",
                                     "init_args": {"encoder": str(tiny / "vit"), "qformer": qformer}}}}},
        "data": {"train_sources": [{"file": str(data), "media_root": str(tiny / "data")}],
                 "batch_size": args.batch_size}}))
    return path


def run(path: Path, strategy: str, frozen_dtype: str | None) -> None:
    command = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(path)]
    if strategy == "sharded":
        command += ["--config", str(ROOT / "configs" / "sharding" / "fsdp2.yaml")]
        if frozen_dtype:
            command += ["--trainer.strategy.init_args.frozen_dtype", frozen_dtype]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{path.parent.name} run failed:\n{result.stderr[-4000:]}")


def figures(out: Path) -> dict[str, float]:
    """Medians over the steps after the first (warm-up) and the largest per-rank memory (parameter bytes as stored;
    the OS's peak resident memory, max over the ranks)."""
    rows = [r for path in (out / "csv").glob("version_*/metrics.csv") for r in csv.DictReader(path.open())]
    steps = [r for r in rows if r.get("perf/sequences_per_s")][1:]

    def median(key: str) -> float:
        values = [float(r[key]) for r in steps if r.get(key)]
        return statistics.median(values) if values else float("nan")

    ranks = [json.loads(p.read_text()) for p in sorted((out / "memory").glob("rank*.json"))]
    world = len(ranks)
    return {"sequences_per_s (per rank)": median("perf/sequences_per_s"),
            "sequences_per_s (all ranks)": median("perf/sequences_per_s") * world,
            "tokens_per_s (all ranks)": median("perf/tokens_per_s") * world,
            "MFU": median("perf/mfu"), "frozen param MB per rank": max(r["frozen_param_bytes"] for r in ranks) / 2**20,
            "trained param MB per rank": max(r["trained_param_bytes"] for r in ranks) / 2**20,
            "gradient elements per rank": max(r["grad_elements"] for r in ranks),
            "OS peak MB, loaded (max rank)": max(r.get("peak_rss_bytes_loaded", float("nan")) for r in ranks) / 2**20,
            "OS peak MB at step 1 (max rank)": max(r["peak_rss_bytes"] for r in ranks) / 2**20,
            "OS peak MB, whole run (max rank)": max(r.get("peak_rss_bytes_end", r["peak_rss_bytes"])
                                                    for r in ranks) / 2**20,
            **({"CUDA peak MB (max rank)": max(r["peak_cuda_bytes"] for r in ranks) / 2**20}
               if all("peak_cuda_bytes" in r for r in ranks) else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num_nodes", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=4, help="per rank")
    parser.add_argument("--llm_layers", type=int, default=None, help="a random Llama of this depth (GPUs)")
    parser.add_argument("--llm_hidden", type=int, default=4096)
    parser.add_argument("--max_length", type=int, default=160)
    parser.add_argument("--turns", type=int, default=1, help="repeat each conversation's turns (longer sequences)")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), metavar="RUN",
                        help=f"which of {list(RUNS)}")
    parser.add_argument("--peak_tflops", type=float, default=None, help="per device, for MFU (989: H100 bf16)")
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the table's numbers here")
    args = parser.parse_args()

    from xllm.demo.tiny import build_all

    root = Path(args.out or tempfile.mkdtemp())
    tiny = build_all(root / "tiny")
    llm = random_llm(root, args.llm_layers, args.llm_hidden, tiny / "tokenizer") if args.llm_layers else tiny / "llama"
    data = tiny / "data" / "train_chat.jsonl"
    if args.turns > 1:
        data = long_conversations(data, tiny / "data" / f"train_chat_x{args.turns}.jsonl", args.turns)
    results = {}
    for name in args.runs:
        strategy, settings = RUNS[name]
        out = root / name.replace(" ", "_").replace("+", "").replace("(", "").replace(")", "")
        run(config(tiny, llm, out, args, strategy, settings, data), strategy,
            "bfloat16" if args.accelerator == "gpu" else None)
        results[name] = figures(out)
    world = args.devices * args.num_nodes
    size = sum(p.stat().st_size for p in llm.glob("*.safetensors")) / 2**20
    print(f"{args.steps} steps of stage 2 + LoRA, {world} ranks × batch {args.batch_size}, max_length "
          f"{args.max_length}, conversations × {args.turns}; LLM {llm} ({size:,.0f} MB of safetensors) "
          f"({args.accelerator})\n")
    keys = list(next(iter(results.values())))
    print("| run | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row.get(k, float('nan')):,.4g}" for k in keys) + " |")
    if "DDP" in results:
        base = results["DDP"]
        print("\nbeside DDP (MB; ratio):")
        for name, row in results.items():
            print(f"- {name}: OS peak, whole run {row['OS peak MB, whole run (max rank)'] - base['OS peak MB, whole run (max rank)']:+,.0f}; "
                  f"frozen bytes {row['frozen param MB per rank'] / base['frozen param MB per rank']:.2f}x; "
                  f"tokens/s {row['tokens_per_s (all ranks)'] / base['tokens_per_s (all ranks)']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
