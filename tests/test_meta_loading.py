"""Loading without materialising: an LLM built on the meta device (`build_frozen_llm`) and LoRA-wrapped, then filled
from its safetensors (`fill_from_checkpoint`), equals the LLM loaded whole — every weight, LoRA's initial matrices,
the logits. The model here ties its LM head to its input embeddings (SmolLM2 does): the tie survives and the table is
read once. Sharded over 2 processes, each rank reads half: tests/test_sharding.py's stage-2 run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from xllm.llm import LoraSettings, apply_lora, build_frozen_llm, fill_from_checkpoint, load_frozen_llm

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)


def tied_llama(tiny: Path, out: Path) -> Path:
    """The tiny Llama with its LM head tied to its input embeddings (one tensor in the checkpoint)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny / "llama", tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny / "llama").save_pretrained(out)
    return out


def test_a_meta_llm_filled_from_its_checkpoint_equals_the_llm_loaded_whole(tiny, tmp_path):
    path = str(tied_llama(tiny, tmp_path / "tied"))
    torch.manual_seed(1)
    whole = apply_lora(load_frozen_llm(path), LORA)
    torch.manual_seed(1)
    meta = apply_lora(build_frozen_llm(path), LORA)
    assert all(p.is_meta for n, p in meta.named_parameters() if "lora_" not in n)
    assert not any(p.is_meta for n, p in meta.named_parameters() if "lora_" in n)  # LoRA's matrices are drawn now
    assert not any(b.is_meta for b in meta.buffers())  # rotary tables are computed, not read

    read = fill_from_checkpoint(meta, path)
    weights = sum(p.numel() * p.element_size() for n, p in whole.named_parameters() if "lora_" not in n)
    assert read == weights  # the tied table once
    base = meta.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    expected = dict(whole.named_parameters())
    got = dict(meta.named_parameters())
    assert set(got) == set(expected)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert all(not p.requires_grad for n, p in got.items() if "lora_" not in n)
    ids = torch.arange(1, 25).reshape(2, 12)
    with torch.no_grad():
        assert torch.equal(meta(input_ids=ids).logits, whole(input_ids=ids).logits)
    assert fill_from_checkpoint(meta, path) == 0  # nothing left to fill


def test_a_checkpoint_missing_a_tensor_is_named(tiny, tmp_path):
    folder = tied_llama(tiny, tmp_path / "cut")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(KeyError, match=r"no tensor 'model.layers.1.mlp.up_proj.weight'.*model.safetensors"):
        fill_from_checkpoint(build_frozen_llm(str(folder)), str(folder))
