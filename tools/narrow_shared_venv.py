"""Narrow the lmms-eval test venv's view of the pinned venv to what the `lmms-eval` extra needs.

`make test` builds .cache/lmms-eval-venv as a new user's `pip install '.[lmms-eval]'` does, except that what the
pinned .venv already has at a version the extra accepts is shared from it read-only, through a .pth line naming its
site-packages (so pip installs only the rest). Left so, that line would also show every other package of .venv
(torchaudio, torchao, ...), which a fresh venv lacks and which libraries import when present. This points the .pth
at a folder of links to just the distributions the extra needs that .venv provides: xllm-toolkit[lmms-eval]'s
requirements followed through, each as this venv resolves it (its own copy, when pip installed one, comes first).

Run with the lmms venv's own python, after `pip install '.[lmms-eval]'`: `python tools/narrow_shared_venv.py`.
"""

from __future__ import annotations

import importlib.metadata as md
import shutil
import sys
import sysconfig
from collections import defaultdict
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PTH = "xllm-pinned-venv.pth"


def needed_distributions(root: str = "xllm-toolkit", extras: frozenset[str] = frozenset({"lmms-eval"})) -> list:
    """`root[extras]` and every distribution its requirements reach (markers evaluated here), as imported here."""
    seen: set[tuple[str, frozenset[str]]] = set()
    found: dict[str, md.Distribution] = {}
    todo = [(root, extras)]
    while todo:
        name, extras = todo.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        dist = found.setdefault(canonicalize_name(name), md.distribution(name))  # the first on the path, as import
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
                todo.append((req.name, frozenset(req.extras)))
    return list(found.values())


def top_entries(dist: md.Distribution, depth: int) -> set[tuple[str, ...]]:
    """The first `depth` path parts of each file the distribution installed into its site-packages."""
    return {tuple(f.parts[:depth]) for f in dist.files or [] if f.parts[0] != ".." and f.parts[0] != "__pycache__"}


def main() -> None:
    own = Path(sysconfig.get_paths()["purelib"])
    shared = Path((own / PTH).read_text().strip())
    if shared.parent.resolve() == Path(sys.prefix).resolve():
        raise SystemExit(f"{own / PTH} already names this venv's own links ({shared}): rebuild the venv to narrow it")
    needed = [d for d in needed_distributions() if Path(d.locate_file("")).resolve() == shared.resolve()]
    everyone = list(md.distributions(path=[str(shared)]))
    names = {canonicalize_name(d.metadata["Name"]) for d in needed}

    links = Path(sys.prefix) / "pinned-site-packages"
    shutil.rmtree(links, ignore_errors=True)
    links.mkdir()
    for depth in (1, 2):  # a top folder other distributions also fill (nvidia/, google/) is linked one level down
        owners: dict[tuple[str, ...], set[str]] = defaultdict(set)
        for dist in everyone:
            for entry in top_entries(dist, depth):
                owners[entry].add(canonicalize_name(dist.metadata["Name"]))
        for dist in needed:
            for entry in top_entries(dist, depth):
                target, link = shared.joinpath(*entry), links.joinpath(*entry)
                if link.exists() or link.is_symlink():
                    continue
                if owners[entry] <= names or not target.is_dir():
                    if depth == 1 or not link.parent.is_symlink():
                        link.parent.mkdir(parents=True, exist_ok=True)
                        link.symlink_to(target)
                elif depth == 2:
                    raise SystemExit(f"{target} mixes needed and other distributions two levels down")
                else:
                    link.mkdir()
    (own / PTH).write_text(f"{links}\n")
    print(f"{links}: {len(needed)} distributions of {shared} the lmms-eval extra needs (of {len(everyone)})")


if __name__ == "__main__":
    main()
