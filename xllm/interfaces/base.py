"""The contract every modality interface keeps, so a new modality is a new file plus a line of config.

An interface owns everything between a media file and the LLM's embedding space: how to load one item
from disk (`load_media`, run in data workers), how many LLM tokens one item becomes (`num_tokens`, used
to truncate text without cutting a modality span), and `forward`, which maps a batch of loaded items to
`[n_items, num_tokens, llm_hidden_size]` embeddings. `XLLM` splices those at the placeholders.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class ModalityInterface(nn.Module):
    """Base class. Subclasses set `modality` ("image", "video", "audio") and implement the methods below.

    The constructor arguments of every subclass are recorded in `init_args`, so an adapter directory can
    rebuild the interface from its config JSON without pickling anything.
    """

    modality: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        original_init = cls.__init__
        signature = inspect.signature(original_init)

        @functools.wraps(original_init)
        def recording_init(self: ModalityInterface, *args: Any, **init_kwargs: Any) -> None:
            # Only the outermost (most derived) constructor call records its arguments.
            if not hasattr(self, "_recording_init_args"):
                object.__setattr__(self, "_recording_init_args", True)
                bound = signature.bind(self, *args, **init_kwargs)
                bound.apply_defaults()
                recorded = {k: v for k, v in bound.arguments.items() if k != "self"}
                original_init(self, *args, **init_kwargs)
                object.__setattr__(self, "init_args", recorded)
            else:
                original_init(self, *args, **init_kwargs)

        cls.__init__ = recording_init  # type: ignore[method-assign]

    @property
    def placeholder(self) -> str:
        """The text placeholder that marks where one item of this modality goes, e.g. `<image>`."""
        return f"<{self.modality}>"

    @property
    def num_tokens(self) -> int:
        """LLM tokens one item becomes (an upper bound for variable-length modalities)."""
        raise NotImplementedError

    @property
    def uses_instructions(self) -> bool:
        """True when `forward(items, instructions)` wants the text of the user turn holding each item."""
        return False

    def attach(self, llm_hidden_size: int) -> None:
        """Build the adapter into the LLM's embedding space; called once by `XLLM`."""
        raise NotImplementedError

    def load_media(self, path: str) -> torch.Tensor:
        """Load and preprocess one item from disk; raise `ValueError` on a corrupt file."""
        raise NotImplementedError

    def media_loader(self) -> Callable[[str], torch.Tensor]:
        """A picklable `path -> tensor` callable for data workers (override to avoid copying the module)."""
        return self.load_media

    def prepare_media(self, paths: list[str]) -> int:
        """Called once with every path of a data set before training (e.g. to cache frozen features)."""
        return 0

    def collate_media(self, items: list[torch.Tensor]) -> torch.Tensor:
        """Batch loaded items; fixed-size items stack."""
        return torch.stack(items)

    def frozen_modules(self) -> list[nn.Module]:
        """Sub-modules that never train (kept in eval mode, outside the optimizer and checkpoints)."""
        return []

    def class_path(self) -> str:
        return f"{type(self).__module__}.{type(self).__qualname__}"

    def to_config(self) -> dict[str, Any]:
        """JSON-ready `{"class_path", "init_args"}`, the same shape LightningCLI configs use."""
        return {"class_path": self.class_path(), "init_args": dict(self.init_args)}
