"""Adapter directories: `config.json` (how to rebuild the model) + `adapter.safetensors` (trainable weights only).

The frozen LLM and encoders are referenced by path, never copied, so an adapter is a few MB. Loading
rebuilds each interface from its `class_path` — restricted to classes inside `xllm` unless
`trust_remote_code=True` — and reads tensors with safetensors (no pickle).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from xllm.interfaces.base import ModalityInterface
from xllm.llm import LoraSettings, lora_to_dict

ADAPTER_FORMAT = "xllm-adapter"
ADAPTER_VERSION = 1
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


def adapter_config(model: Any, stage: int | None = None) -> dict[str, Any]:
    return {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "stage": stage,
        "llm": {
            "path": getattr(model, "llm_path", None),
            "dtype": getattr(model, "llm_dtype", "float32"),
            "trust_remote_code": getattr(model, "trust_remote_code", False),
        },
        "template": model.template,
        "system_prompt": model.system_prompt,
        "lora": lora_to_dict(model.lora),
        "interfaces": {name: _json_ready(i.to_config()) for name, i in model.interfaces.items()},
    }


def save_adapter(model: Any, directory: str | Path, stage: int | None = None) -> Path:
    """Write `config.json` and the trainable tensors of `model` (an `XLLM`) as safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.trainable_state_dict().items()}
    if not tensors:
        raise ValueError("the model has no trainable parameters to save")
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": ADAPTER_FORMAT})
    (directory / CONFIG_NAME).write_text(json.dumps(adapter_config(model, stage), indent=2, ensure_ascii=False))
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"not an xllm adapter directory (no {CONFIG_NAME}): {directory}")
    config = json.loads(path.read_text())
    if config.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path}: format is {config.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    if config.get("version", 0) > ADAPTER_VERSION:
        raise ValueError(f"{path}: adapter version {config['version']} is newer than this xllm supports")
    return config


def build_interface(name: str, spec: dict[str, Any], trust_remote_code: bool = False) -> ModalityInterface:
    """Instantiate `{"class_path", "init_args"}`; only `xllm.*` classes unless `trust_remote_code`."""
    class_path = spec["class_path"]
    if not class_path.startswith("xllm.") and not trust_remote_code:
        raise ValueError(
            f"interface {name!r}: class_path {class_path!r} is outside xllm; pass trust_remote_code=True to import it"
        )
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, ModalityInterface)):
        raise TypeError(f"interface {name!r}: {class_path} is not a ModalityInterface")
    return cls(**spec.get("init_args", {}))


def load_adapter_weights(model: Any, directory: str | Path) -> list[str]:
    """Load `adapter.safetensors` into the trainable parameters of `model`; every file key must match one."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in adapter directory {directory}")
    tensors = load_file(str(path))
    own = dict(model.named_parameters())
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
    trust_remote_code: bool | None = None,
    interface_overrides: dict[str, dict[str, Any]] | None = None,
) -> Any:
    """Rebuild an `XLLM` from an adapter directory: frozen LLM by path (or `llm`), interfaces, LoRA, weights.

    `interface_overrides` replaces init args, e.g. `{"image": {"encoder": "/my/vit"}}` for moved models.
    """
    from xllm.model import XLLM

    config = read_adapter_config(directory)
    if config.get("llm") is None:
        raise ValueError(
            f"{directory} is a stage-0 interface checkpoint (no LLM yet); train stage 1 from it with init_adapter"
        )
    trust = config["llm"].get("trust_remote_code", False) if trust_remote_code is None else trust_remote_code
    interfaces = {}
    for name, spec in config["interfaces"].items():
        spec = {**spec, "init_args": {**spec.get("init_args", {}), **(interface_overrides or {}).get(name, {})}}
        # The trained weights replace BERT's initialisation, so the checkpoint is not needed again, unless
        # the Q-Former's text side reads its frozen word embeddings from it.
        if not spec["init_args"].get("qformer_text"):
            spec["init_args"].pop("bert_init", None)
        interfaces[name] = build_interface(name, spec, trust_remote_code=bool(trust))
    llm_path = llm or config["llm"]["path"]
    if not llm_path:
        raise ValueError(f"{directory}: config has no LLM path; pass llm=...")
    model = XLLM.from_paths(
        llm_path, interfaces, llm_dtype=config["llm"].get("dtype", "float32"), trust_remote_code=bool(trust),
        template=config["template"], system_prompt=config.get("system_prompt"),
    )
    if config.get("lora"):
        model.enable_lora(LoraSettings(**config["lora"]))
    load_adapter_weights(model, directory)
    model.eval()
    return model


def save_interface_checkpoint(interfaces: Any, directory: str | Path, stage: int = 0) -> Path:
    """Stage 0's output: the interfaces' trainable tensors (named as inside an `XLLM`) and their config.

    Stage 1 starts from it with `init_adapter:`; there is no LLM in it yet.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"interfaces.{name}.{key}": p.detach().to("cpu").contiguous()
        for name, interface in interfaces.items()
        for key, p in interface.named_parameters()
        if p.requires_grad
    }
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": ADAPTER_FORMAT})
    config = {
        "format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "stage": stage, "llm": None, "template": None,
        "system_prompt": None, "lora": None,
        "interfaces": {name: _json_ready(i.to_config()) for name, i in interfaces.items()},
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return directory
