"""GPU check and throughput: the same code paths as CPU training, on CUDA with bf16 mixed precision.

1. Tiny stage 1 -> stage 2 (LoRA) through Lightning on the GPU (bf16-mixed, bf16 frozen LLM/encoder):
   frozen weights unchanged, adapter reloads, greedy generation runs on the GPU.
2. Throughput at BLIP-2 scale with random weights (no hub here): a ViT-L/14-shaped encoder at 224 px,
   a 12-layer 768-wide Q-Former with 32 queries, and a Llama-shaped LLM; sequences/s, tokens/s and MFU
   (trainable params x6, frozen LLM x4 since gradients flow through it to the inputs, frozen encoder x2).

    python benchmarks/gpu_check.py --out results.json [--llm_layers 16 --llm_hidden 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytorch_lightning as pl
import torch

from xllm.demo.tiny import build_all
from xllm.interfaces import ImageInterface, MediaBatch
from xllm.llm import LoraSettings, count_parameters
from xllm.model import XLLM
from xllm.training import XLLMDataModule, XLLMModule

TINY = dict(num_query_tokens=4, hidden_size=32, layers=2, heads=2, intermediate_size=64)  # QFormerSettings
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 spec; both are GH100 chips


def tiny_pipeline(root: Path, device: str) -> dict:
    gpu = device == "cuda"
    dtype = "bfloat16" if gpu else "float32"  # never bf16 on a CPU
    tiny = build_all(root / "tiny")
    results = {}
    adapter1 = root / "adapter1"
    for stage, lora, file, init in ((1, None, "train_captions.jsonl", None),
                                    (2, LoraSettings(r=4, alpha=8), "train_chat.jsonl", str(adapter1))):
        torch.manual_seed(0)
        module = XLLMModule(
            llm=str(tiny / "llama"), llm_dtype=dtype, template="vicuna_v1", stage=stage, lora=lora,
            init_adapter=init, adapter_dir=str(root / f"adapter{stage}"), lr=1e-3, max_length=256,
            interfaces={"image": ImageInterface(str(tiny / "vit"), encoder_dtype=dtype, qformer=TINY)},
        )
        frozen = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.requires_grad}
        trainer = pl.Trainer(accelerator="gpu" if gpu else "cpu", devices=1, precision="bf16-mixed" if gpu else "32-true", max_epochs=2, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, default_root_dir=str(root))
        trainer.fit(module, datamodule=XLLMDataModule(train_file=str(tiny / "data" / file), batch_size=8))
        params = dict(module.model.named_parameters())
        unchanged = all(torch.equal(frozen[n].cpu(), params[n].detach().cpu()) for n in frozen)
        results[f"stage{stage}"] = {"frozen_unchanged": unchanged, "final_loss": float(trainer.callback_metrics["train/loss"]),
                                    "device": str(trainer.strategy.root_device)}
    model = XLLM.from_pretrained(root / "adapter2", device=device)
    results["generate"] = model.chat([{"from": "user", "value": "<image>\nWhat colour is the shape?"}],
                                     {"image": str(tiny / "data" / "images" / "test_00000.png")}, max_new_tokens=8)
    return results


def throughput(args) -> dict:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from xllm.model import XLLM

    root = Path(tempfile.mkdtemp())
    ViTModel(ViTConfig(image_size=224, patch_size=14, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096)).save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(root / "vit")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(build_all(root / "tiny") / "tokenizer"))
    llm_config = LlamaConfig(vocab_size=32000, hidden_size=args.llm_hidden, intermediate_size=args.llm_hidden * 11 // 4,
                             num_hidden_layers=args.llm_layers, num_attention_heads=args.llm_hidden // 128,
                             num_key_value_heads=args.llm_hidden // 128, pad_token_id=0)
    with torch.device("cuda"):
        llm = LlamaForCausalLM(llm_config).to(torch.bfloat16).requires_grad_(False).eval()
    interface = ImageInterface(str(root / "vit"), encoder_dtype="bfloat16", qformer=dict(num_query_tokens=32))
    model = XLLM(llm, tokenizer, {"image": interface}).cuda()
    model.train()
    trainable, frozen_total = count_parameters(model)
    vit_params = sum(p.numel() for p in interface.encoder.parameters())
    llm_params = frozen_total - vit_params
    batch, text = args.batch, args.text_tokens
    ids = torch.randint(1, 1000, (batch, text), device="cuda")
    ids[:, 4] = model.sentinels["image"]
    labels = ids.clone().masked_fill(ids < 0, -100)
    mask = torch.ones_like(ids)
    media = {"image": MediaBatch({"pixel_values": torch.randn(batch, 3, 224, 224, device="cuda")})}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, mask, media, labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    seq_len = text - 1 + 32
    image_tokens = (224 // 14) ** 2 + 1
    flops = batch * (6 * trainable * 32 + 4 * llm_params * seq_len + 2 * vit_params * image_tokens)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return {
        "device": name, "batch": batch, "seq_len": seq_len, "llm_params": llm_params, "vit_params": vit_params,
        "trainable_params": trainable, "step_s": seconds, "sequences_per_s": batch / seconds,
        "llm_tokens_per_s": batch * seq_len / seconds, "tflops": flops / seconds / 1e12,
        "mfu": (flops / seconds / peak) if peak else None, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--llm_layers", type=int, default=16)
    parser.add_argument("--llm_hidden", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--text_tokens", type=int, default=96)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda", help="cpu: a quick dry run of the tiny part only")
    args = parser.parse_args()
    results = {"torch": torch.__version__}
    with tempfile.TemporaryDirectory() as root:
        results["tiny"] = tiny_pipeline(Path(root), args.device)
    print(json.dumps(results, indent=2), flush=True)
    if args.device == "cuda":
        results["throughput"] = throughput(args)
    print(json.dumps(results, indent=2), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
