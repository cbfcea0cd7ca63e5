"""The frozen chat LLM: any `AutoModelForCausalLM` by path, frozen, with optional LoRA (peft).

Tested families: Llama (Vicuna, SmolLM2) and GLM (`GlmForCausalLM` / `Glm4ForCausalLM`, GLM-4 style).
ChatGLM-6B/2/3 exist only as hub remote code: they load only when `trust_remote_code=True` is set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from xllm.frozen import check_model_path, freeze, resolve_dtype, safetensors_files


@dataclass
class LoraSettings:
    """LoRA on the LLM (stage 2 only). Target names follow the model's Linear layers."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    check_model_path(path, "LLM tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id works; eos is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_frozen_llm(path: str, dtype: str = "float32", trust_remote_code: bool = False) -> PreTrainedModel:
    """Load a causal LM and freeze it: `requires_grad=False`, eval mode."""
    check_model_path(path, "LLM")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code
    )
    return freeze(model)


def embedding_tables(path: str, trust_remote_code: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The input embeddings' and the LM head's `[vocab, hidden]` weights, read from the checkpoint's safetensors
    without building the model (for a 7B LLM that is two tables, not 14 GB). A tied head is the same tensor as
    the input table, read once."""
    from safetensors import safe_open
    from transformers import AutoConfig

    check_model_path(path, "LLM")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):  # names and shapes only, no memory
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    wanted = {"input": model.get_input_embeddings().weight, "output": model.get_output_embeddings().weight}
    names = {which: [n for n, p in model.named_parameters(remove_duplicate=False) if p is table]
             for which, table in wanted.items()}
    files = safetensors_files(path)
    found: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for which in wanted:
                name = next((n for n in names[which] if n in handle.keys()), None)
                if which not in found and name is not None:
                    found[which] = handle.get_tensor(name)
    if wanted["input"] is wanted["output"] and "input" in found:
        found["output"] = found["input"]  # tied: one tensor
    missing = [f"{which} ({names[which]})" for which in wanted if which not in found]
    if missing:
        raise FileNotFoundError(f"{path}: no {', '.join(missing)} in its safetensors files {files}")
    return found["input"], found["output"]


def apply_lora(model: PreTrainedModel, settings: LoraSettings) -> nn.Module:
    """Wrap `model` with peft LoRA; only the LoRA matrices train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )
    wrapped = get_peft_model(model, config)
    return wrapped


def lora_to_dict(settings: LoraSettings | None) -> dict | None:
    return None if settings is None else asdict(settings)


def input_embeddings(model: nn.Module) -> nn.Embedding:
    embeddings = model.get_input_embeddings()
    if not isinstance(embeddings, nn.Embedding):
        raise TypeError(f"{type(model).__name__} has no nn.Embedding input embeddings")
    return embeddings


def llm_hidden_size(model: nn.Module) -> int:
    return int(input_embeddings(model).weight.shape[1])


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts, shared tensors counted once."""
    seen: set[int] = set()
    trainable = frozen = 0
    for parameter in module.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        if parameter.requires_grad:
            trainable += parameter.numel()
        else:
            frozen += parameter.numel()
    return trainable, frozen


__all__ = [
    "LoraSettings",
    "apply_lora",
    "count_parameters",
    "input_embeddings",
    "llm_hidden_size",
    "load_frozen_llm",
    "load_tokenizer",
    "embedding_tables",
]
