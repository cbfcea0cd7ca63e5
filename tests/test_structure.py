"""Layers: each part of the package imports only the parts below it, so the arrows never run back up.

frozen <- llm; frozen <- interfaces (the contract) <- checkpoint (the adapter directory format), data <- model <-
training; interfaces, llm <- pretraining <- training; model/checkpoint <- evaluation; demo sits on top and nothing
in the core imports it.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "xllm"

ALLOWED = {
    "frozen": set(),
    "llm": {"frozen"},
    "interfaces": {"frozen", "interfaces"},
    "data": {"data", "interfaces"},
    "checkpoint": {"interfaces"},
    "model": {"checkpoint", "data", "frozen", "interfaces", "llm"},
    "pretraining": {"interfaces", "llm", "pretraining"},
    "training": {"checkpoint", "data", "frozen", "interfaces", "llm", "model", "pretraining", "training"},
    "evaluation": {"checkpoint", "data", "evaluation", "model"},
    "chat": {"model"},
    "cli": {"chat", "serve"},
    "serve": {"model"},
    "demo": {"checkpoint", "data", "demo", "evaluation", "frozen", "interfaces", "llm", "model", "pretraining",
             "training"},
}


def xllm_imports(path: Path) -> set[str]:
    """The top-level xllm parts a file imports, function-local imports included."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        parts |= {name.split(".")[1] for name in names if name.startswith("xllm.")}
    return parts


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        part = relative.parts[0].removesuffix(".py")
        if part == "__init__":
            continue
        assert part in ALLOWED, f"{relative}: a new part of the package needs a place in ALLOWED"
        offences += [f"{relative} imports xllm.{p}" for p in sorted(xllm_imports(path) - ALLOWED[part])]
    assert not offences, offences
