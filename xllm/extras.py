"""Optional dependencies: each belongs to one extra of the distribution, and a missing one is named in one line.

`import_optional(module, extra, what)` is the only way the library imports a package that is not a core
dependency (`tests/test_dependencies.py` checks that every other third-party import is declared in
`pyproject.toml`). An adapter records the extras it needs (`needed_extras` of its interfaces) in its config and
model card, and `XLLM.from_pretrained` checks them before it loads anything.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

DISTRIBUTION = "xllm-toolkit"
# extra -> the modules it provides (kept equal to pyproject.toml's optional-dependencies by a test)
EXTRAS: dict[str, tuple[str, ...]] = {
    "vision": ("torchvision",),
    "serve": ("fastapi", "uvicorn"),
    "lmms-eval": ("lmms_eval",),
    # a quantised frozen LLM (`llm_quantization`): int8 on CPUs through torchao, LLM.int8 / NF4 through bitsandbytes
    "torchao": ("torchao",),
    "bitsandbytes": ("bitsandbytes",),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says what needs it and the command that installs it."""


def install_hint(extra: str) -> str:
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def missing_modules(extra: str) -> list[str]:
    """The modules of `extra` that are not installed here."""
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def require(extra: str, what: str) -> None:
    """Raise `MissingExtraError` (one line) unless every module of `extra` is installed."""
    missing = missing_modules(extra)
    if missing:
        raise MissingExtraError(f"{what} needs {', '.join(missing)} (the '{extra}' extra): {install_hint(extra)}")


def import_optional(module: str, extra: str, what: str) -> ModuleType:
    """`import module`, which `extra` provides; `what` says what needs it, for the error."""
    if module.split(".")[0] not in EXTRAS[extra]:
        raise ValueError(f"{module} is not one of the '{extra}' extra's modules {EXTRAS[extra]}")
    require(extra, what)
    return importlib.import_module(module)
