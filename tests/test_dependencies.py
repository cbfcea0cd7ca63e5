"""Every third-party module the library imports is a declared dependency, or an optional one imported through
`xllm.extras.import_optional` from an extra that `pyproject.toml` declares (so a missing one is named in one line)."""

from __future__ import annotations

import ast
import functools
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from xllm.extras import EXTRAS, MissingExtraError, import_optional, require

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(requirements: list[str]) -> set[str]:
    return {normal(Requirement(r).name) for r in requirements}


@functools.cache
def installed() -> dict[str, list[str]]:
    return packages_distributions()  # module -> the distributions that provide it (reads every installed one)


def distributions(module: str) -> set[str]:
    """The distributions that provide `module` here; for one not installed (an extra's), its own name."""
    return {normal(d) for d in installed().get(module, [])} or {normal(module)}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every import statement of a file, function-local ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def optional_imports(path: Path) -> dict[str, int]:
    """module -> first line of an `import_optional("module", ...)` call in the file."""
    calls = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "import_optional" and node.args \
                and isinstance(node.args[0], ast.Constant):
            calls.setdefault(node.args[0].value.split(".")[0], node.lineno)
    return calls


def undeclared_imports(package: Path) -> list[str]:
    core = declared(PROJECT["dependencies"])
    extras = {name: declared(reqs) for name, reqs in PROJECT["optional-dependencies"].items()}
    offences = []
    for path in sorted(package.rglob("*.py")):
        if "demo" in path.relative_to(package).parts:
            continue  # the demos are not the library: they run in the Makefile's pinned environment
        guarded = optional_imports(path)
        for line, module in imports(path):
            if module in sys.stdlib_module_names or module in ("xllm", "__future__"):
                continue
            if distributions(module) & core:
                continue
            extra = next((e for e, modules in EXTRAS.items() if module in modules), None)
            if extra is not None and distributions(module) & extras.get(extra, set()) \
                    and guarded.get(module, line + 1) <= line:
                continue
            offences.append(f"{path.relative_to(package.parent)}:{line} imports {module} "
                            f"(distribution {sorted(distributions(module)) or '?'})")
    return offences


def test_every_library_import_is_declared_or_an_extras_guarded_import():
    assert not undeclared_imports(ROOT / "xllm")


def test_an_undeclared_import_is_caught(tmp_path):
    package = tmp_path / "xllm"
    package.mkdir()
    (package / "fine.py").write_text("import torch\nfrom xllm.extras import import_optional\n"
                                     "import_optional('torchvision', 'vision', 'x')\nimport torchvision\n")
    (package / "unguarded.py").write_text("import torchvision\n")
    (package / "undeclared.py").write_text("def f():\n    import playwright\n")
    assert [o.split(" ")[0] for o in undeclared_imports(package)] == ["xllm/undeclared.py:2", "xllm/unguarded.py:1"]


def test_the_extras_in_code_are_the_extras_declared():
    for extra, modules in EXTRAS.items():
        wanted = declared(PROJECT["optional-dependencies"][extra])
        assert all(distributions(m) & wanted for m in modules), (extra, modules, wanted)
    assert "audio" not in PROJECT["optional-dependencies"]  # nothing in the library imports torchaudio


def test_a_missing_extra_is_one_line_naming_it_and_its_install_command(monkeypatch):
    monkeypatch.setitem(EXTRAS, "vision", ("torchvision", "a_module_that_is_not_installed"))
    with pytest.raises(MissingExtraError) as error:
        require("vision", "the image encoder at /models/cnn (a torchvision model)")
    message = str(error.value)
    assert "\n" not in message and "'vision' extra" in message and "pip install 'xllm-toolkit[vision]'" in message
    assert "a_module_that_is_not_installed" in message and "/models/cnn" in message
    with pytest.raises(ValueError, match="not one of the 'serve' extra"):
        import_optional("torchvision", "serve", "x")
