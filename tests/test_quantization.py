"""A quantised frozen LLM (`llm_quantization`): int8 weights through torchao on the CPU (4-bit NF4 through
bitsandbytes where it is installed), LoRA and the interfaces trained in float32 on top; frozen means frozen still;
the adapter holds trained tensors only, records the quantisation, and loads onto a quantised or a full base."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_image_interface
from tests.test_training import fit, fixed_batch
from xllm.llm import LoraSettings
from xllm.model import XLLM
from xllm.training import XLLMModule
from xllm.training.memory import stored_bytes
from xllm.training.sharding import decoder_layers

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


def layer_bytes(llm: torch.nn.Module) -> float:
    """Bytes the decoder layers' weights store (what quantisation shrinks; the tiny Llama's embeddings and head are
    as big as its layers, and stay float32)."""
    return sum(stored_bytes(p) for layer in decoder_layers(llm) for p in layer.parameters() if p.ndim == 2)


def test_an_int8_frozen_llm_trains_lora_on_top_and_its_adapter_loads_onto_either_base(tiny, tmp_path):
    torch.manual_seed(0)
    module = XLLMModule(llm=str(tiny / "llama"), interfaces={"image": make_image_interface(tiny)}, stage=2,
                        template="vicuna_v1", lora=LORA, llm_quantization={"bits": 8},
                        adapter_dir=str(tmp_path / "int8"), lr=1e-3, max_length=256)
    llm = module.model.llm
    full = XLLM.from_paths(str(tiny / "llama"), {"image": make_image_interface(tiny)}, template="vicuna_v1")
    assert layer_bytes(llm) <= 0.3 * layer_bytes(full.llm)  # measured: 0.27 (int8 + a float32 scale per row)
    quantised = [p for layer in decoder_layers(llm) for n, p in layer.named_parameters() if "base_layer" in n]
    assert quantised and all(type(p).__module__.startswith("torchao") and not p.requires_grad for p in quantised)

    trainer = fit(module, tiny, tmp_path, steps=3, file="train_chat.jsonl")
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not any(id(p) in optimised for p in quantised)
    adapter = load_file(str(tmp_path / "int8" / "adapter.safetensors"))
    assert any("lora_" in k for k in adapter) and not any("base_layer" in k or "embed_tokens" in k for k in adapter)
    config = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert config["llm"]["quantization"]["bits"] == 8

    # As trained (int8, read from the adapter's config), and onto the full-precision base.
    on_int8 = XLLM.from_pretrained(tmp_path / "int8")
    on_full = XLLM.from_pretrained(tmp_path / "int8", llm_quantization=False)
    assert type(on_full.llm.get_base_model().model.layers[0].mlp.up_proj.weight) is torch.nn.Parameter
    assert type(on_int8.llm.get_base_model().model.layers[0].mlp.up_proj.weight).__module__.startswith("torchao")
    batch = fixed_batch(on_int8, tiny, n=4)
    with torch.no_grad():
        a = on_int8(batch["input_ids"], batch["attention_mask"], batch["media"], batch["labels"])
        b = on_full(batch["input_ids"], batch["attention_mask"], batch["media"], batch["labels"])
    # The same adapter over int8 and float32 weights: nearly the same loss (measured 0.004 apart).
    assert abs(a.loss.item() - b.loss.item()) < 0.05 * b.loss.item()

    # An adapter trained on the full base loads onto an int8 one.
    full.enable_lora(LORA)
    on_int8_too = XLLM.from_pretrained(full.save_pretrained(tmp_path / "full", stage=2), llm_quantization={"bits": 8})
    layer = on_int8_too.llm.get_base_model().model.layers[0].mlp.up_proj.weight
    assert type(layer).__module__.startswith("torchao")


def test_a_4bit_nf4_frozen_llm_gives_lora_gradients(tiny):
    pytest.importorskip("bitsandbytes")  # the GPUs' backend (an extra: `xllm-toolkit[bitsandbytes]`); NF4 runs on CPUs
    torch.manual_seed(0)
    model = XLLM.from_paths(str(tiny / "llama"), {"image": make_image_interface(tiny)}, template="vicuna_v1",
                            llm_quantization={"bits": 4})
    full = XLLM.from_paths(str(tiny / "llama"), {"image": make_image_interface(tiny)}, template="vicuna_v1")
    assert layer_bytes(model.llm) <= 0.2 * layer_bytes(full.llm)
    model.enable_lora(LORA)
    model.train()
    batch = fixed_batch(model, tiny, n=4)
    model(batch["input_ids"], batch["attention_mask"], batch["media"], batch["labels"]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any("lora_B" in n and g.abs().sum() > 0 for n, g in grads.items())
