"""The frozen chat LLM: any `AutoModelForCausalLM` by path, frozen, with optional LoRA (peft).

Tested families: Llama (Vicuna, SmolLM2) and GLM (`GlmForCausalLM` / `Glm4ForCausalLM`, GLM-4 style).
ChatGLM-6B/2/3 exist only as hub remote code: they load only when `trust_remote_code=True` is set.

Three ways to hold it: loaded whole (`load_frozen_llm`); quantised as it loads (`LlmQuantization`: int8 weight-only
through torchao on CPUs, bitsandbytes' LLM.int8 or NF4 on GPUs); or built on the meta device (`build_frozen_llm`, no
memory) and filled later (`fill_from_checkpoint`), after sharding each rank reading only the rows it keeps.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

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


@dataclass
class LlmQuantization:
    """A quantised frozen LLM (QLoRA-style: LoRA and the interfaces train in float32 on top of it).

    Args:
        bits: 8 or 4. 8: int8 weights with one float scale per output row; 4: NF4 with double quantisation (QLoRA).
        backend: `auto` picks bitsandbytes on a GPU and torchao on a CPU for 8 bits (bitsandbytes' LLM.int8 casts
            a CPU's activations to float16, which is slow there), bitsandbytes for 4 bits (peft trains LoRA over
            torchao's int8 weights but not over its int4 ones).
        skip_modules: module names left unquantised (transformers keeps the LM head unquantised by default).
    """

    bits: Literal[4, 8] = 8
    backend: Literal["auto", "torchao", "bitsandbytes"] = "auto"
    skip_modules: list[str] | None = None

    def resolved_backend(self) -> str:
        if self.bits not in (4, 8):
            raise ValueError(f"llm_quantization.bits must be 4 or 8, got {self.bits}")
        if self.backend != "auto":
            if self.backend == "torchao" and self.bits == 4:
                raise ValueError("llm_quantization: 4 bits go through bitsandbytes (NF4); peft trains LoRA over "
                                 "torchao's int8 weights only")
            return self.backend
        return "bitsandbytes" if self.bits == 4 or torch.cuda.is_available() else "torchao"

    def transformers_config(self, compute_dtype: torch.dtype) -> Any:
        """The `quantization_config` that `from_pretrained` quantises with, weight by weight, as it loads."""
        from xllm.extras import import_optional, require

        if self.resolved_backend() == "torchao":
            quantization = import_optional("torchao.quantization", "torchao", "llm_quantization on a CPU")
            from transformers import TorchAoConfig

            return TorchAoConfig(quantization.Int8WeightOnlyConfig(), modules_to_not_convert=self.skip_modules)
        require("bitsandbytes", f"llm_quantization with {self.bits} bits")
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=self.skip_modules)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=self.skip_modules)


def quantization_settings(value: LlmQuantization | Mapping[str, Any] | None) -> LlmQuantization | None:
    """`LlmQuantization` from a YAML/adapter-config mapping (or itself, or None)."""
    if value is None or isinstance(value, LlmQuantization):
        return value
    unknown = sorted(set(value) - {"bits", "backend", "skip_modules"})
    if unknown:
        raise ValueError(f"llm_quantization: unknown setting(s) {unknown}; it takes bits, backend, skip_modules")
    return LlmQuantization(**value)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    check_model_path(path, "LLM tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id works; eos is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_frozen_llm(path: str, dtype: str = "float32", trust_remote_code: bool = False,
                    quantization: LlmQuantization | Mapping[str, Any] | None = None) -> PreTrainedModel:
    """Load a causal LM and freeze it: `requires_grad=False`, eval mode; quantised as it loads when asked."""
    check_model_path(path, "LLM")
    extra: dict[str, Any] = {}
    quantization = quantization_settings(quantization)
    if quantization is not None:
        extra["quantization_config"] = quantization.transformers_config(resolve_dtype(dtype))
        if quantization.resolved_backend() == "bitsandbytes" and torch.cuda.is_available():
            # bitsandbytes quantises on the GPU it loads onto: this process's own (LOCAL_RANK, as torchrun, SLURM
            # through Lightning and Lightning's launcher set it), not GPU 0 for every rank.
            extra["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code, **extra
    )
    if quantization is not None:
        model.xllm_quantization = asdict(quantization)  # what an adapter records (`llm_record`)
    return freeze(model)


def llm_record(llm: nn.Module, path: str | None, dtype: str) -> dict[str, Any]:
    """The frozen LLM as an adapter's config records it: path, dtype, width, and its quantisation if it has one."""
    record = {"path": path, "dtype": dtype, "hidden_size": llm_hidden_size(llm)}
    quantization = getattr(llm, "xllm_quantization", None)  # a peft wrapper forwards to the model it wraps
    return {**record, "quantization": quantization} if quantization else record


def build_frozen_llm(path: str, dtype: str = "float32", trust_remote_code: bool = False) -> PreTrainedModel:
    """The LLM's structure, frozen, with its parameters on the meta device (no memory) and its buffers (rotary
    tables) real: `fill_from_checkpoint` reads the weights later — after sharding, each rank only what it keeps."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig

    check_model_path(path, "LLM")
    safetensors_files(path)  # fail now, not after sharding, when there is nothing to fill it from
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype),
                                                 trust_remote_code=trust_remote_code)
    model.tie_weights()  # as `from_pretrained` does: a tied LM head is the input table itself, read once
    try:  # what `from_pretrained` would read beside the weights
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass
    return freeze(model)


def checkpoint_name(name: str) -> str:
    """A parameter's name in its transformers checkpoint: peft's `base_layer` level removed."""
    return re.sub(r"\.base_layer(?=\.)", "", name)


def fill_from_checkpoint(llm: nn.Module, path: str) -> int:
    """Give every meta parameter of `llm` (built by `build_frozen_llm`; LoRA-wrapped or sharded by FSDP2, or both)
    its values from the checkpoint's safetensors files, cast to the parameter's dtype: a sharded parameter
    (a DTensor) gets only this rank's rows, read with `get_slice` so no other rows are touched; a parameter shared by
    several names (tied embeddings) is read once. Returns the bytes read. A collective-free, per-rank read: every
    rank reads its own part, none holds the whole LLM."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, parameter in base.named_parameters(remove_duplicate=False):
        if parameter.is_meta:
            names.setdefault(id(parameter), []).append(name)
            params[id(parameter)] = parameter
    if not params:
        return 0
    files = safetensors_files(path)
    where: dict[str, str] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            where.update((key, str(file)) for key in handle.keys())
    loaded: dict[str, nn.Parameter] = {}
    read = 0
    handles: dict[str, Any] = {}
    try:
        for key_id, parameter in params.items():
            key = next((checkpoint_name(n) for n in names[key_id] if checkpoint_name(n) in where), None)
            if key is None:
                raise KeyError(f"{path}: no tensor {checkpoint_name(names[key_id][0])!r} in its safetensors files "
                               f"{[str(f) for f in files]}: this checkpoint names its weights otherwise than "
                               "transformers' model does; load it whole (meta_llm: false)")
            if where[key] not in handles:
                handles[where[key]] = safe_open(where[key], framework="pt")
            handle = handles[where[key]]
            view = handle.get_slice(key)
            if tuple(view.get_shape()) != tuple(parameter.shape):
                raise ValueError(f"{where[key]}: {key} has shape {tuple(view.get_shape())}, the model expects "
                                 f"{tuple(parameter.shape)}")
            if isinstance(parameter, DTensor):
                mesh, placements = parameter.device_mesh, parameter.placements
                shape, offset = compute_local_shape_and_global_offset(parameter.shape, mesh, placements)
                local = view[tuple(slice(o, o + s) for o, s in zip(offset, shape))] if shape else view[:]
                local = local.to(dtype=parameter.dtype, device=mesh.device_type)
                value = DTensor.from_local(local, mesh, placements, run_check=False, shape=parameter.shape,
                                           stride=parameter.stride())
            else:
                local = value = view[:].to(parameter.dtype)
            read += local.numel() * local.element_size()
            filled = nn.Parameter(value, requires_grad=False)  # one object for all its names: ties stay tied
            loaded.update((name, filled) for name in names[key_id])
    finally:
        handles.clear()  # closes the files: their pages leave this process
    # `assign`: the new tensors replace the meta ones (FSDP2 re-registers its shards after a load: reset_sharded_param).
    base.load_state_dict(loaded, strict=False, assign=True)
    left = [name for name, parameter in base.named_parameters() if parameter.is_meta]
    if left:
        raise RuntimeError(f"{path}: {len(left)} parameter(s) still unfilled after loading, e.g. {left[:3]}")
    return read


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
    """Wrap `model` with peft LoRA; only the LoRA matrices train. On a meta-device base (`build_frozen_llm`) the
    LoRA matrices are real and equal to those a loaded base gets from the same random state."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )
    state = torch.get_rng_state()
    wrapped = get_peft_model(model, config)
    # peft draws each layer's A and B on the CPU, then moves them to its base layer's device: on a meta base that
    # drops the values. So they are drawn again here, from the random state peft started from, in peft's order
    # (nn.Linear's init of A, then B, then LoRA's own init) — on a loaded base as well, where it reproduces peft's
    # values exactly, so that both bases train from the same matrices (tests/test_sharding.py compares the runs).
    torch.set_rng_state(state)
    for layer in (m for m in wrapped.modules() if isinstance(m, LoraLayer)):
        for adapter in layer.lora_A:
            for part in (layer.lora_A[adapter], layer.lora_B[adapter]):
                if any(p.is_meta for p in part.parameters()):
                    part.to_empty(device="cpu")
                part.reset_parameters()
            layer.reset_lora_parameters(adapter, config.init_lora_weights)
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
    "LlmQuantization",
    "LoraSettings",
    "apply_lora",
    "count_parameters",
    "input_embeddings",
    "llm_hidden_size",
    "build_frozen_llm",
    "fill_from_checkpoint",
    "load_frozen_llm",
    "load_tokenizer",
    "embedding_tables",
]
