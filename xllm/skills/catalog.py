"""Which skills a name may load: those installed packages declare in the `xllm.skills` entry-point group (the
ecosystem's plugin convention, as `xllm.interfaces` are found), and — only when the user names it on the command
line — a `module:function` of their own.

A name from a file or a request (an adapter's config, a served request) never makes xllm import a module:
`find_skill` compares it with each entry point's name and declared `module:function` string, and only a match is
loaded (an entry point's package was installed by the user, so loading it is the user's choice, not the file's).

A package adds skills with lines in its `pyproject.toml`:

    [project.entry-points."xllm.skills"]
    locate = "my_package.skills:locate"
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "xllm.skills"


class SkillNotFound(LookupError):
    """A skill name that is neither installed nor allowed to be imported; nothing was imported."""


def installed_skills() -> dict[str, str]:
    """entry-point name -> `module:function` of every skill installed packages declare (nothing is imported)."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def find_skill(name: str, import_modules: bool = False) -> Callable[..., Any]:
    """The function `name` stands for: an installed entry point's name (`locate`) or its declared value
    (`my_package.skills:locate`); with `import_modules` (a user's own `--skills module:function`), any importable
    `module:function`. Anything else raises `SkillNotFound` before a module is imported."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if name in (ep.name, ep.value):
            function = ep.load()
            if not callable(function):
                raise TypeError(f"entry point {ep.name} = {ep.value} ({ENTRY_POINT_GROUP}) is not a function")
            return function
    if not import_modules:
        known = ", ".join(f"{n} ({v})" for n, v in sorted(installed_skills().items())) or "none"
        raise SkillNotFound(f"{name!r} is not an installed skill (entry-point group {ENTRY_POINT_GROUP}; installed: "
                            f"{known}); nothing was imported. Install the package that provides it")
    module, _, attribute = name.partition(":")
    if not module or not attribute:
        raise SkillNotFound(f"{name!r}: name a skill as module:function (or an installed skill's name)")
    function = getattr(importlib.import_module(module), attribute, None)
    if not callable(function):
        raise SkillNotFound(f"{name!r}: module {module} has no function {attribute}")
    return function
