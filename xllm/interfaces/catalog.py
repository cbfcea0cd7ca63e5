"""Which interface classes an adapter's config may name: xllm's own, listed here once, and those that installed
packages declare in the `xllm.interfaces` entry-point group (the ecosystem's plugin convention, as pytest plugins
and lmms-eval models are found).

A config never makes xllm import a module: `find_interface_class` compares the config's `class_path` with this
list and with each entry point's declared `module:Class` string, and only a match is imported (an entry point's
package was installed by the user, so loading it is the user's choice, not the file's).

A package adds a modality with one line in its `pyproject.toml`:

    [project.entry-points."xllm.interfaces"]
    depth = "my_package.depth:DepthInterface"
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import entry_points

from xllm.interfaces.base import ModalityInterface
from xllm.interfaces.image import ImageInterface
from xllm.interfaces.speech import SpeechInterface
from xllm.interfaces.video import VideoInterface

XLLM_INTERFACES: tuple[type[ModalityInterface], ...] = (ImageInterface, VideoInterface, SpeechInterface)
ENTRY_POINT_GROUP = "xllm.interfaces"


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def installed_interfaces() -> dict[str, str]:
    """class path -> entry-point name of every interface installed packages declare (nothing is imported)."""
    return {ep.value.replace(":", "."): ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_class_paths(passed: Iterable[type] = ()) -> list[str]:
    """What a config may name: xllm's interfaces, the caller's classes and the installed entry points."""
    return [class_path(c) for c in (*XLLM_INTERFACES, *passed)] + sorted(installed_interfaces())


def find_interface_class(path: str, passed: Iterable[type] = ()) -> type[ModalityInterface] | None:
    """The interface class a config's `class_path` names, if it is one of `known_class_paths`; else None."""
    for cls in (*XLLM_INTERFACES, *passed):
        if class_path(cls) == path:
            return cls
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.value.replace(":", ".") == path:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, ModalityInterface)):
                raise TypeError(f"entry point {ep.name} = {ep.value} ({ENTRY_POINT_GROUP}) is not a ModalityInterface")
            return cls
    return None
