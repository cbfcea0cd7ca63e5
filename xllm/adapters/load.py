"""Loading an adapter directory: the config the caller may amend, and its interfaces rebuilt from the catalog
(`XLLM.from_pretrained` is built on these)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from xllm.adapters.format import apply_overrides, check_paths, encoder_hidden_size, read_config
from xllm.extras import EXTRAS, require
from xllm.interfaces.base import ModalityInterface
from xllm.interfaces.catalog import find_interface_class, known_class_paths


def adapter_config(
    directory: str | Path,
    llm: str | None = None,
    encoders: Mapping[str, str] | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
    interface_overrides: Mapping[str, Mapping[str, Any]] | None = None,
    llm_quantization: Mapping[str, Any] | bool | None = None,
) -> dict[str, Any]:
    """A stage-1/2 adapter's config with the caller's overrides, every local path checked to exist; a quantisation
    given (a mapping, or False for full precision) replaces the one the adapter was trained with.

    Refuses a stage-0 checkpoint (no LLM yet) and a config that asks for remote code (only the caller decides
    `trust_remote_code`)."""
    config = read_config(directory)
    if config.get("llm") is None:
        raise ValueError(
            f"{directory} is a stage-0 interface checkpoint (no LLM yet); train stage 1 from it with init_adapter"
        )
    if not trust_remote_code and (config.get("trust_remote_code") or config["llm"].get("trust_remote_code")):
        raise ValueError(
            f"adapter {directory}: its config asks for trust_remote_code, and xllm never takes that from a file; "
            "nothing was loaded. If you trust the LLM's code, pass trust_remote_code=True yourself"
        )
    for extra in config.get("extras", []):
        if extra not in EXTRAS:
            raise ValueError(f"adapter {directory} needs the extra {extra!r}, which this xllm does not know; "
                             "upgrade xllm")
        require(extra, f"adapter {directory}")
    config = apply_overrides(config, llm=llm, encoders=encoders, interface_overrides=interface_overrides,
                             dtype=dtype)
    if llm_quantization is not None:
        config["llm"]["quantization"] = dict(llm_quantization) if llm_quantization else None
    check_paths(directory, config)
    return config


def build_interfaces(directory: str | Path, config: Mapping[str, Any], allowed: Iterable[type] = ()
                     ) -> dict[str, ModalityInterface]:
    """modality -> interface, rebuilt from the config (weights not loaded yet), each encoder's width checked."""
    interfaces = {}
    for name, spec in config["interfaces"].items():
        interfaces[name] = build_interface(name, spec, allowed)
        check_encoder_width(directory, name, spec, interfaces[name])
    return interfaces


def build_interface(name: str, spec: Mapping[str, Any], allowed: Iterable[type] = ()) -> ModalityInterface:
    """Instantiate `{"class_path", "init_args"}`: one of `xllm.interfaces.catalog`'s classes (xllm's own, an
    installed package's entry point) or one of the `allowed` classes the caller passes.

    Nothing is imported because a file names it: any other class must be passed by the caller."""
    cls = find_interface_class(spec["class_path"], allowed)
    if cls is None:
        raise ValueError(
            f"interface {name!r}: class_path {spec['class_path']!r} is not one of xllm's interfaces "
            f"({', '.join(known_class_paths(allowed))}); nothing was imported. If you trust it, import the class "
            "yourself and pass it (interface_classes=[MyInterface]), or install the package that declares it in "
            "the 'xllm.interfaces' entry-point group"
        )
    if not (isinstance(cls, type) and issubclass(cls, ModalityInterface)):
        raise TypeError(f"interface {name!r}: {spec['class_path']} is not a ModalityInterface")
    return cls(**spec.get("init_args", {}))


def check_encoder_width(directory: str | Path, name: str, spec: Mapping[str, Any], interface: ModalityInterface) -> None:
    trained, now = spec.get("encoder_hidden_size"), encoder_hidden_size(interface)
    if trained is not None and now is not None and trained != now:
        raise ValueError(
            f"adapter {directory}: its {name} interface was trained on encoder features of width {trained}, but the "
            f"encoder at {spec['init_args'].get('encoder')} gives {now}: pass the encoder it was trained with"
        )
