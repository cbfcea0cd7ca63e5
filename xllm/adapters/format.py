"""The adapter directory: one format for stage-0 interface checkpoints and stage-1/2 adapters.

A directory holds
- `config.json`: format version, xllm version, stage; the frozen LLM it was trained against (path or hub id,
  dtype, hidden size), chat template, system prompt, LoRA settings; each interface's `class_path` + `init_args`
  and its frozen encoder's hidden size; `local_paths`, the settings that name local files or folders;
- `adapter.safetensors`: the trainable tensors only, named as inside an `XLLM`
  (`interfaces.image.bridge.qformer.query_tokens`, `llm.*lora_*`);
- files an interface needs to be rebuilt and cannot find elsewhere (the Q-Former's own tokenizer and its
  frozen BERT word tables, in `image_qformer_text/`);
- `README.md`: a model card (Hugging Face Hub layout, so `huggingface_hub.upload_folder` publishes it as is).

Stage 0 writes `"llm": null` (no LLM yet); stage 1 starts from it with `init_adapter:`. `XLLM.from_pretrained`
rebuilds a ready model from a stage-1/2 directory.

Local paths are stored relative to the adapter directory, so a project tree that moves (or is cloned
elsewhere) still loads; an adapter copied on its own says which override to pass for each model it cannot find.
Frozen models are referenced, never copied, so an adapter stays a few MB. Tensors are read with safetensors (no
pickle), and nothing a file says runs code: interface classes come from xllm's own list, from installed packages'
entry points or from classes the caller passes (`xllm.interfaces.catalog`), and remote code for the LLM is only
ever the caller's choice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

import xllm
from xllm.blocks.bridge import FLAT_QFORMER_ARGS
from xllm.interfaces.base import ADAPTER_WEIGHTS, ModalityInterface

FORMAT = "xllm-adapter"
# 2: local paths relative to the adapter, hidden sizes, xllm version, self-contained Q-Former text.
# 3: the image and video interfaces' Q-Former settings nested under `qformer` (read back from 2 by `_from_v2`).
VERSION = 3
CONFIG_NAME = "config.json"
WEIGHTS_NAME = ADAPTER_WEIGHTS
CARD_NAME = "README.md"
# Interfaces whose Q-Former settings version 2 (and 1) wrote flat among their arguments.
FLAT_QFORMER_INTERFACES = ("xllm.interfaces.image.ImageInterface", "xllm.interfaces.video.VideoInterface")


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if is_dataclass(value) and not isinstance(value, type):
        return _json_ready(asdict(value))
    return value


def _relative_if_local(value: Any, directory: Path) -> tuple[Any, bool]:
    """A path that exists here, relative to `directory`; anything else (a hub id, None) unchanged."""
    if isinstance(value, str) and value and Path(value).exists():
        return os.path.relpath(Path(value).resolve(), directory.resolve()), True
    return value, False


def encoder_hidden_size(interface: ModalityInterface) -> int | None:
    """Width of the interface's frozen encoder output, when it has one (recorded to catch a swapped encoder)."""
    return getattr(getattr(interface, "encoder", None), "hidden_size", None)


def config_for(
    directory: Path,
    interfaces: Mapping[str, ModalityInterface],
    stage: int | None = None,
    llm: Mapping[str, Any] | None = None,
    trained_on: str | None = None,
) -> dict[str, Any]:
    """The `config.json` of an adapter about to be written to `directory` (interfaces may write files there).

    Args:
        directory: the adapter directory (local paths are stored relative to it).
        interfaces: modality -> interface, to rebuild them.
        stage: the training stage that produced the adapter.
        llm: for adapters, `{"llm": {"path", "dtype", "hidden_size"}, "template", "system_prompt", "lora"}`.
        trained_on: what it was trained on, for the model card.
    """
    local_paths: list[str] = []
    config: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "xllm_version": xllm.__version__, "stage": stage,
        "trained_on": trained_on, "llm": None, "template": None, "system_prompt": None, "lora": None,
    }
    if llm is not None:
        config.update({k: _json_ready(v) for k, v in llm.items()})
        config["llm"] = dict(config["llm"])
        config["llm"]["path"], local = _relative_if_local(config["llm"]["path"], directory)
        if local:
            local_paths.append("llm.path")
    config["interfaces"] = {}
    for name, interface in interfaces.items():
        spec = _json_ready(interface.reload_config(directory))
        for key in interface.path_args:  # dotted for nested settings: `qformer.text_tokenizer`
            node, last = _get(spec["init_args"], key, missing_ok=True)
            if node is not None and last in node:
                node[last], local = _relative_if_local(node[last], directory)
                if local:
                    local_paths.append(f"interfaces.{name}.init_args.{key}")
        spec["encoder_hidden_size"] = encoder_hidden_size(interface)
        config["interfaces"][name] = spec
    config["local_paths"] = local_paths
    config["extras"] = sorted({e for interface in interfaces.values() for e in interface.needed_extras()})
    return config


def _get(config: dict, dotted: str, missing_ok: bool = False) -> tuple[dict | None, str]:
    """The dict that holds the dotted key's last part, and that part (None for a missing parent if `missing_ok`)."""
    *parents, last = dotted.split(".")
    node = config
    for part in parents:
        if missing_ok and not isinstance(node.get(part), dict):
            return None, last
        node = node[part]
    return node, last


def _from_v2(config: dict[str, Any]) -> None:
    """Version 2 -> 3 in place: the image and video interfaces' flat Q-Former arguments move under `qformer`."""
    renamed = {}
    for name, spec in config.get("interfaces", {}).items():
        if spec.get("class_path") not in FLAT_QFORMER_INTERFACES:
            continue
        args = spec["init_args"]
        args["qformer"] = {new: args.pop(old) for old, new in FLAT_QFORMER_ARGS.items() if old in args}
        renamed.update({f"interfaces.{name}.init_args.{old}": f"interfaces.{name}.init_args.qformer.{new}"
                        for old, new in FLAT_QFORMER_ARGS.items()})
    config["local_paths"] = [renamed.get(p, p) for p in config.get("local_paths", [])]


def read_config(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's config with its local paths made absolute (resolved against the directory)."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"not an xllm checkpoint directory (no {CONFIG_NAME}): {directory}")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {config.get('format')!r}, expected {FORMAT!r}")
    if config.get("version", 0) > VERSION:
        raise ValueError(
            f"{path}: format version {config['version']} (written by xllm {config.get('xllm_version', '?')}) is "
            f"newer than this xllm ({xllm.__version__}) reads (≤ {VERSION}); upgrade xllm"
        )
    if config.get("version", 0) < 3:
        _from_v2(config)
    stored = config["stored_paths"] = {}  # as written, for error messages
    for dotted in config.get("local_paths", []):
        node, key = _get(config, dotted)
        stored[dotted] = node[key]
        node[key] = str((directory / node[key]).resolve())
    return config


def missing_path_error(directory: str | Path, what: str, stored: str, override: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"adapter {directory}: {what} was trained against {stored}, which does not exist here; pass {override}"
    )


def apply_overrides(
    config: dict[str, Any],
    llm: str | None = None,
    encoders: Mapping[str, str] | None = None,
    interface_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    """The config with the caller's replacements (an overridden path is the caller's, no longer checked)."""
    replaced: list[str] = []
    if llm is not None:
        config["llm"]["path"] = llm
        replaced.append("llm.path")
    if dtype is not None and config.get("llm"):
        config["llm"]["dtype"] = dtype
    unknown = sorted((set(encoders or {}) | set(interface_overrides or {})) - set(config["interfaces"]))
    if unknown:
        raise ValueError(f"overrides for {unknown}, but the adapter has interfaces {sorted(config['interfaces'])}")
    for name, spec in config["interfaces"].items():
        args = dict(spec["init_args"])
        if dtype is not None and "encoder_dtype" in args:
            args["encoder_dtype"] = dtype
        if name in (encoders or {}):
            args["encoder"] = encoders[name]
        args.update((interface_overrides or {}).get(name, {}))
        replaced += [f"interfaces.{name}.init_args.{k}" for k in args if args[k] != spec["init_args"].get(k)]
        spec["init_args"] = args
    config["local_paths"] = [p for p in config.get("local_paths", []) if p not in replaced]
    return config


def check_paths(directory: str | Path, config: Mapping[str, Any]) -> None:
    """Every local path the config names must exist; the error says which override replaces it."""
    # Version-1 configs stored paths as written (relative to the training run's working directory), unmarked.
    dotted = config.get("local_paths", [])
    for entry in dotted:
        node, key = _get(config, entry)
        if key == "feature_cache" or Path(node[key]).exists():
            continue
        where = f"{config.get('stored_paths', {}).get(entry, node[key])} (relative to the adapter: {node[key]})"
        if entry == "llm.path":
            raise missing_path_error(directory, "the LLM", where, "llm=PATH (evaluate.py: --llm PATH)")
        name = entry.split(".")[1]
        if key == "encoder":
            raise missing_path_error(directory, f"its {name} encoder", where,
                                     f"encoders={{{name!r}: PATH}} (evaluate.py: --encoders '{{\"{name}\": PATH}}')")
        arg = entry.split(".init_args.", 1)[1]  # `qformer.text_tokenizer` for a nested setting
        override = "PATH"
        for part in reversed(arg.split(".")):
            override = f"{{{part!r}: {override}}}"
        raise missing_path_error(directory, f"its {name} interface's {arg}", where,
                                 f"interface_overrides={{{name!r}: {override}}}")


def _listed(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_weights(module: nn.Module, directory: str | Path, strict: bool = True, prefix: str = "") -> list[str]:
    """Load `adapter.safetensors` into the parameters of `module`; returns the keys loaded.

    Every file tensor must match a parameter, shape and all. With `strict`, every trainable parameter of
    `module` must also be in the file (an adapter is complete); without it (stage 1 starting from a stage-0
    checkpoint), trainable parameters the file lacks keep their initialisation. With `prefix` (`interfaces.image.`,
    when adapters are composed) only the file's and the module's tensors under it take part."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in checkpoint directory {directory}")
    tensors = {k: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    if prefix and not tensors:
        raise KeyError(f"{path}: no {prefix}* tensors")
    own = {k: p for k, p in module.named_parameters() if k.startswith(prefix)}
    unexpected = sorted(set(tensors) - set(own))
    missing = sorted(k for k, p in own.items() if p.requires_grad and k not in tensors) if strict else []
    if unexpected or missing:
        problems = []
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected tensors that match no parameter: {_listed(unexpected)}")
        if missing:
            problems.append(f"{len(missing)} trained parameters missing: {_listed(missing)}")
        raise KeyError(f"{path}: " + "; ".join(problems) + " (was it written for another interface configuration?)")
    with torch.no_grad():
        for key, tensor in tensors.items():
            if own[key].shape != tensor.shape:
                raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, model has {tuple(own[key].shape)}")
            own[key].copy_(tensor.to(own[key].dtype))
    return sorted(tensors)
