"""Checkpoint directories: what training writes and what `load_adapter` reads, one format for every stage.

A directory holds `config.json` (how to rebuild: the interfaces' `class_path` + `init_args`, and for stages 1-2
the frozen LLM by path, template, system prompt and LoRA settings) and `adapter.safetensors` (the trainable
tensors only, named as inside an `XLLM`: `interfaces.image.bridge.qformer.query_tokens`, `llm.*lora_*`).
Stage 0 writes the same format with `"llm": null` (an *interface checkpoint*: no LLM yet); stage 1 starts from
it with `init_adapter:`. A stage-1/2 directory is an *adapter*: `load_adapter` rebuilds a ready `XLLM` from it.

The frozen LLM and encoders are referenced by path, never copied, so an adapter is a few MB. Tensors are read
with safetensors (no pickle). Interface classes resolve only from xllm itself or from classes the caller
names; no file decides to run code.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from xllm.interfaces.base import ModalityInterface
from xllm.llm import LoraSettings, lora_to_dict
from xllm.model import XLLM

FORMAT = "xllm-adapter"
VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "adapter.safetensors"


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_checkpoint(
    directory: str | Path,
    tensors: Mapping[str, torch.Tensor],
    interfaces: Mapping[str, ModalityInterface],
    stage: int | None = None,
    model: XLLM | None = None,
) -> Path:
    """Write `config.json` + `adapter.safetensors`; with `model` (stages 1-2) the LLM settings too."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if not tensors:
        raise ValueError("nothing trainable to save")
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": FORMAT})
    config = {
        "format": FORMAT,
        "version": VERSION,
        "stage": stage,
        "llm": None if model is None else {"path": model.llm_path, "dtype": model.llm_dtype},
        "template": None if model is None else model.template,
        "system_prompt": None if model is None else model.system_prompt,
        "lora": None if model is None else lora_to_dict(model.lora),
        "interfaces": {name: _json_ready(i.reload_config()) for name, i in interfaces.items()},
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return directory


def save_adapter(model: XLLM, directory: str | Path, stage: int | None = None) -> Path:
    """An adapter directory of `model`: its trainable tensors (interfaces, projections, LoRA) and config."""
    return write_checkpoint(directory, model.trainable_state_dict(), dict(model.interfaces), stage, model)


def save_interface_checkpoint(interfaces: Mapping[str, ModalityInterface], directory: str | Path, stage: int = 0) -> Path:
    """Stage 0's output: the interfaces' trainable tensors, named as inside an `XLLM`, and their config."""
    tensors = {
        f"interfaces.{name}.{key}": p
        for name, interface in interfaces.items()
        for key, p in interface.named_parameters()
        if p.requires_grad
    }
    return write_checkpoint(directory, tensors, interfaces, stage)


def read_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"not an xllm checkpoint directory (no {CONFIG_NAME}): {directory}")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {config.get('format')!r}, expected {FORMAT!r}")
    if config.get("version", 0) > VERSION:
        raise ValueError(f"{path}: checkpoint version {config['version']} is newer than this xllm supports ({VERSION})")
    return config


def build_interface(name: str, spec: Mapping[str, Any], allowed: Iterable[type] = ()) -> ModalityInterface:
    """Instantiate `{"class_path", "init_args"}`: a class inside `xllm`, or one of the `allowed` classes.

    Nothing outside xllm is imported because a file names it: the caller passes such classes itself."""
    class_path = spec["class_path"]
    named = {f"{c.__module__}.{c.__qualname__}": c for c in allowed}
    if class_path in named:
        cls = named[class_path]
    elif class_path.startswith("xllm."):
        module_name, _, class_name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name, None)
    else:
        raise ValueError(
            f"interface {name!r}: class_path {class_path!r} is outside xllm; pass the class itself "
            "(interface_classes=[MyInterface]) to allow it"
        )
    if not (isinstance(cls, type) and issubclass(cls, ModalityInterface)):
        raise TypeError(f"interface {name!r}: {class_path} is not a ModalityInterface")
    return cls(**spec.get("init_args", {}))


def load_weights(module: nn.Module, directory: str | Path) -> list[str]:
    """Load `adapter.safetensors` into the parameters of `module`; every file key must match one, shape and all."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in checkpoint directory {directory}")
    tensors = load_file(str(path))
    own = dict(module.named_parameters())
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise KeyError(f"{path}: {len(unknown)} tensors match no parameter of this model, e.g. {unknown[:3]}")
    with torch.no_grad():
        for key, tensor in tensors.items():
            if own[key].shape != tensor.shape:
                raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, model has {tuple(own[key].shape)}")
            own[key].copy_(tensor.to(own[key].dtype))
    return sorted(tensors)


def load_adapter(
    directory: str | Path,
    llm: str | None = None,
    trust_remote_code: bool = False,
    interface_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    interface_classes: Iterable[type] = (),
) -> XLLM:
    """Rebuild an `XLLM` from an adapter directory: frozen LLM by path (or `llm`), interfaces, LoRA, weights.

    Args:
        directory: the adapter directory (written after a stage-1/2 fit).
        llm: load the LLM from here instead of the stored path.
        trust_remote_code: allow hub remote code for the LLM (ChatGLM-6B); only the caller decides this.
        interface_overrides: replaced init args, e.g. `{"image": {"encoder": "/my/vit"}}` for moved models.
        interface_classes: interface classes from outside xllm that the config may name.
    """
    config = read_config(directory)
    if config.get("llm") is None:
        raise ValueError(
            f"{directory} is a stage-0 interface checkpoint (no LLM yet); train stage 1 from it with init_adapter"
        )
    interfaces = {}
    for name, spec in config["interfaces"].items():
        spec = {**spec, "init_args": {**spec.get("init_args", {}), **(interface_overrides or {}).get(name, {})}}
        interfaces[name] = build_interface(name, spec, interface_classes)
    llm_path = llm or config["llm"]["path"]
    if not llm_path:
        raise ValueError(f"{directory}: config has no LLM path; pass llm=...")
    model = XLLM.from_paths(
        llm_path, interfaces, llm_dtype=config["llm"].get("dtype", "float32"), trust_remote_code=trust_remote_code,
        template=config["template"], system_prompt=config.get("system_prompt"),
    )
    if config.get("lora"):
        model.enable_lora(LoraSettings(**config["lora"]))
    load_weights(model, directory)
    model.eval()
    return model
