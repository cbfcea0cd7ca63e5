"""Layers: each part of the package imports only the parts below it, so the arrows never run back up.

    tensors, frozen, extras               conventions, freezing, optional dependencies (import nothing of xllm)
    llm | blocks | encoders               the frozen LLM; trainable blocks; frozen encoders and media decoding
    interfaces                            the contract and the modalities, composed of blocks and encoders
    data | objectives | adapters          conversations -> batches; stage-0 losses; the adapter artifact
    skills                                typed functions the model calls, and the loop that runs them
    generation, splice, model             XLLM: embed, splice, loss, generate
    training | evaluation                 Lightning stages; metrics and MME
    apps, demo                            what a person runs; nothing in the library imports them

`adapters` sits below `model`: `XLLM.from_pretrained` / `save_pretrained` are the model's own methods (as in
transformers), and the format needs only the interfaces to rebuild them, never the model.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "xllm"

BOTTOM = {"tensors", "frozen", "extras"}
COMPONENTS = BOTTOM | {"llm", "blocks", "encoders"}
INTERFACES = COMPONENTS | {"interfaces"}
DATA = INTERFACES | {"data"}
MODEL = DATA | {"adapters", "generation", "splice", "skills", "model"}
LIBRARY = MODEL | {"objectives", "training", "evaluation"}
ALLOWED = {
    "tensors": set(),
    "frozen": set(),
    "extras": set(),
    "llm": BOTTOM,
    "blocks": BOTTOM | {"blocks"},
    "encoders": BOTTOM | {"encoders"},
    "interfaces": INTERFACES,
    "data": DATA,
    "objectives": INTERFACES | {"llm", "objectives"},
    "adapters": INTERFACES | {"adapters"},
    "skills": DATA | {"skills"},
    "generation": BOTTOM,
    "splice": INTERFACES,
    "model": MODEL - {"model"},
    "training": LIBRARY - {"evaluation"},
    "evaluation": MODEL | {"evaluation"},
    "apps": MODEL | {"apps"},
    "demo": LIBRARY | {"apps", "demo"},
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


def test_no_library_file_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if "demo" not in p.parts and (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_the_readme_stays_a_newcomers_page():
    """The commands, a table per demo, the examples; measurements and histories live in docs/ (linked)."""
    readme = (PACKAGE.parent / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for link in ("docs/demo_image.md", "docs/demo_speech.md", "docs/demo_video.md", "docs/architecture.md"):
        assert link in readme and (PACKAGE.parent / link).is_file(), link
