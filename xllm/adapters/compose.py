"""Composing adapters trained on their own into one model (X-LLM's joint model): an image adapter's, a video
adapter's and a speech adapter's interfaces around the one frozen LLM they were all trained against.

`XLLM.from_adapters({"image": DIR, "video": DIR, "audio": DIR})` and training's `init_adapters:` are built on
this. The adapters must agree on what the frozen LLM reads: its path, hidden size and dtype, the chat template
and the system prompt; anything else is an error naming both adapters and what differs. LoRA matrices trained
separately change the same LLM weights and cannot be added together, so an adapter with LoRA is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xllm.adapters.load import adapter_config

# What every composed adapter must share (dotted into its config).
SHARED = ("llm.path", "llm.hidden_size", "llm.dtype", "template", "system_prompt")


def _value(config: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, Mapping) else None
    return config


def compose_configs(adapters: Mapping[str, str | Path], **overrides: Any) -> dict[str, Any]:
    """One config with `adapters[modality]`'s interface for each modality; `overrides` as `adapter_config`'s
    (`llm`, `encoders`, `dtype`, `trust_remote_code`, `interface_overrides`)."""
    if not adapters:
        raise ValueError("from_adapters needs at least one {modality: adapter directory}")
    unknown = sorted(set(overrides) - {"llm", "encoders", "dtype", "trust_remote_code", "interface_overrides"})
    if unknown:
        raise TypeError(f"unknown overrides {unknown}: llm, encoders, dtype, trust_remote_code, interface_overrides")
    configs = {}
    for modality, directory in adapters.items():
        encoders = {m: p for m, p in (overrides.get("encoders") or {}).items() if m == modality} or None
        interface_overrides = {m: a for m, a in (overrides.get("interface_overrides") or {}).items()
                               if m == modality} or None
        config = adapter_config(directory, llm=overrides.get("llm"), encoders=encoders, dtype=overrides.get("dtype"),
                                trust_remote_code=overrides.get("trust_remote_code", False),
                                interface_overrides=interface_overrides)
        if modality not in config["interfaces"]:
            raise ValueError(f"adapter {directory} has no {modality!r} interface (it has {sorted(config['interfaces'])})")
        if config.get("lora"):
            raise ValueError(f"adapter {directory} holds LoRA matrices: separately trained LoRA changes the same LLM "
                             "weights and cannot be composed; compose LoRA-free adapters, then train LoRA jointly")
        configs[modality] = config
    (first, first_config), *others = configs.items()
    for modality, config in others:
        for field in SHARED:
            if _value(config, field) != _value(first_config, field):
                raise ValueError(
                    f"adapters {adapters[first]} ({first}) and {adapters[modality]} ({modality}) differ in {field}: "
                    f"{_value(first_config, field)!r} vs {_value(config, field)!r}; composed interfaces must share "
                    "the frozen LLM and its chat template"
                )
    composed = {k: v for k, v in first_config.items() if k != "interfaces"}
    composed["interfaces"] = {m: config["interfaces"][m] for m, config in configs.items()}
    return composed
