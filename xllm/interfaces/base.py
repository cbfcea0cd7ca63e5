"""The contract every modality interface keeps, so a new modality is a new file plus a line of config.

An interface owns everything between a media file and the LLM's embedding space:

- `load_media(path)` turns one file into an *item* (a tensor, or a dict of tensors such as
  `{"pixel_values": ...}` or `{"features": ...}`), in data workers;
- `collate(items)` batches items into a `MediaBatch`: values padded along their first axis where the items
  differ in length, plus each item's true `lengths` (None when all items have one size);
- `forward(media)` maps a `MediaBatch` to `ModalityTokens`: `[n_items, max_tokens, llm_hidden]` embeddings
  and each item's token count, which may differ per item (speech); `XLLM` splices exactly that many tokens
  of each item at its placeholder;
- `max_tokens` bounds one item's token count (the processor budgets truncation with it);
- an instruction-aware interface returns a tokenizer from `instruction_tokenizer()`: the processor then emits,
  per media item, the ids of the user turn that holds it (`MediaBatch.instruction_ids`), as transformers'
  InstructBLIP processor emits `qformer_input_ids`. No raw text reaches `forward`.

`PretrainableInterface` names what LLM-free pretraining (stage 0) needs of an interface.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from xllm.encoders.feature_cache import FeatureCache
from xllm.tensors import pad_stack

Item = torch.Tensor | dict[str, torch.Tensor]


def placeholder(modality: str) -> str:
    """The text that marks one item of `modality` in a conversation, e.g. `<image>`."""
    return f"<{modality}>"


ADAPTER_WEIGHTS = "adapter.safetensors"  # an adapter directory's trained tensors (the format: xllm.adapters)


def adapter_tensors(directory: str | Path, modality: str, part: str = "") -> dict[str, torch.Tensor]:
    """One interface's trained tensors in an adapter directory, named relative to `part` of it (e.g. `bridge.`).

    An adapter names tensors as inside an `XLLM`, whose interfaces sit at `interfaces.<modality>.`; this is how an
    interface starts from another adapter's (a video Q-Former from an image adapter's) without the format's code."""
    from safetensors.torch import load_file

    prefix = f"interfaces.{modality}.{part}"
    tensors = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
    taken = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not taken:
        raise ValueError(f"{directory}: no {prefix}* tensors in its {ADAPTER_WEIGHTS}")
    return taken


@dataclass
class MediaBatch:
    """One modality's items of a batch, in reading order.

    values: name -> `[n_items, ...]`, padded with zeros along axis 1 (the first axis of an item) when items differ.
    lengths: `[n_items]` true length of each item along that axis, or None when every item has the same size.
    instruction_ids / instruction_mask: `[n_items, L]` the interface tokenizer's ids of the user turn holding
        each item (instruction-aware interfaces), or None.
    """

    values: dict[str, torch.Tensor]
    lengths: torch.Tensor | None = None
    instruction_ids: torch.Tensor | None = None
    instruction_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return next(iter(self.values.values())).shape[0]

    def to(self, device: torch.device | str) -> MediaBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return MediaBatch({k: v.to(device) for k, v in self.values.items()}, move(self.lengths),
                          move(self.instruction_ids), move(self.instruction_mask))

    def select(self, rows: torch.Tensor) -> MediaBatch:
        """The items at `rows` (stage 0 pairs an image with other texts this way)."""
        pick = lambda t: None if t is None else t[rows.to(t.device)]  # noqa: E731
        return MediaBatch({k: v[rows.to(v.device)] for k, v in self.values.items()}, pick(self.lengths),
                          pick(self.instruction_ids), pick(self.instruction_mask))

    def with_instructions(self, ids: torch.Tensor | None, mask: torch.Tensor | None) -> MediaBatch:
        return replace(self, instruction_ids=ids, instruction_mask=mask)


@dataclass
class ModalityTokens:
    """An interface's output: `embeds [n_items, max_tokens, hidden]`, of which item i uses the first `lengths[i]`."""

    embeds: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def fixed(cls, embeds: torch.Tensor) -> ModalityTokens:
        """Every item uses all its tokens (a Q-Former's queries)."""
        lengths = torch.full((embeds.shape[0],), embeds.shape[1], dtype=torch.long, device=embeds.device)
        return cls(embeds, lengths)




def collate_items(items: Sequence[Item]) -> MediaBatch:
    """Default `collate`: tensors (or dicts of tensors with the same keys) stacked, padded where lengths differ."""
    if not items:
        raise ValueError("collate needs at least one item")
    as_dicts = [item if isinstance(item, dict) else {"values": item} for item in items]
    keys = list(as_dicts[0])
    if any(list(d) != keys for d in as_dicts):
        raise ValueError(f"items carry different keys: {sorted({tuple(d) for d in as_dicts})}")
    values, lengths = {}, None
    for key in keys:
        values[key], key_lengths = pad_stack([d[key] for d in as_dicts])
        if key_lengths is not None:
            if lengths is not None and not torch.equal(lengths, key_lengths):
                raise ValueError(f"value {key!r} has other lengths than the item's other values")
            lengths = key_lengths
    return MediaBatch(values, lengths)


class ModalityInterface(nn.Module):
    """Base class. Subclasses set `modality` ("image", "video", "audio", ...) and implement the methods below.

    The constructor arguments of every subclass are recorded in `init_args`, so a checkpoint directory can
    rebuild the interface from its config JSON without pickling anything.
    """

    modality: str = ""
    # init args that name local files or folders: a checkpoint stores them relative to itself
    path_args: tuple[str, ...] = ()
    # OpenAI chat content-part types this interface reads (`xllm serve`): a part is `{"type": T, T: {"url": ...}}`
    # (a data: URL or an allowed path) or `{"type": T, T: {"data": base64, "format": "wav"}}`
    content_parts: tuple[str, ...] = ()
    # whether items are spoken language, whose words the model can write out (`XLLM.transcribe`): a turn that holds
    # such an item and no text gives its instruction-aware interfaces those words (a spoken question)
    spoken: bool = False

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
        return placeholder(self.modality)

    @property
    def max_tokens(self) -> int:
        """Most LLM tokens one item becomes (exact for fixed-size interfaces)."""
        raise NotImplementedError

    def instruction_tokenizer(self) -> Callable[[str], list[int]] | None:
        """For an instruction-aware interface, `text -> ids` of its own tokenizer (else None)."""
        return None

    def attach(self, llm_hidden_size: int) -> None:
        """Build the projection into the LLM's embedding space; called once by `XLLM`."""
        raise NotImplementedError

    def load_media(self, path: str) -> Item:
        """Load and preprocess one item from disk; raise `ValueError` on a corrupt file."""
        raise NotImplementedError

    def media_loader(self) -> Callable[[str], Item]:
        """A picklable `path -> item` callable for data workers (override to avoid copying the module)."""
        return self.load_media

    def prepare_media(self, paths: list[str]) -> int:
        """Called once with every path of a data set before training (e.g. to cache frozen features)."""
        return 0

    def collate(self, items: Sequence[Item]) -> MediaBatch:
        """Batch loaded items (default: stack, zero-pad items of different lengths and record the lengths)."""
        return collate_items(items)

    def forward(self, media: MediaBatch) -> ModalityTokens:
        raise NotImplementedError

    def needed_extras(self) -> set[str]:
        """Extras of the distribution this interface needs beyond the core (`xllm.extras.EXTRAS`), e.g. `vision`
        for a torchvision encoder; an adapter records them and `from_pretrained` checks them first."""
        return set()

    def frozen_modules(self) -> list[nn.Module]:
        """Sub-modules that never train (kept in eval mode, outside the optimizer and checkpoints)."""
        return []

    def idle_modules(self) -> list[nn.Module]:
        """Trainable sub-modules that `forward` (what the LLM reads) never runs, e.g. a Q-Former's text side that
        only stage-0 losses use. Stages 1-2 take them out of training: a parameter without a gradient is dead
        weight in the optimizer and stops DDP, which requires every trained parameter to get one."""
        return []

    def class_path(self) -> str:
        return f"{type(self).__module__}.{type(self).__qualname__}"

    def to_config(self) -> dict[str, Any]:
        """JSON-ready `{"class_path", "init_args"}`, the same shape LightningCLI configs use."""
        return {"class_path": self.class_path(), "init_args": dict(self.init_args)}

    def reload_config(self, directory: Path) -> dict[str, Any]:
        """The config that rebuilds this interface before its trained weights are loaded into it.

        Called when a checkpoint is written to `directory`. Override to drop arguments that only initialise
        weights the checkpoint replaces anyway, or to write files into `directory` that the interface needs
        and that would otherwise live only at a path of the training machine."""
        return self.to_config()


class FrozenEncoderInterface(ModalityInterface):
    """An interface over a frozen encoder whose outputs may be cached (`feature_cache`): image, video, speech.

    A subclass sets `self.cache` (a `FeatureCache`, or None) and writes `decoder()` (a picklable `path -> decoded
    item`) and `encode_decoded(items)` (decoded items -> one feature tensor each, or a batch tensor); loading,
    caching and the data workers' loader follow from those two, written once here."""

    cache: FeatureCache | None = None
    cache_batch_size: int = 32  # decoded items the encoder sees at once while the cache fills

    def decoder(self) -> Callable[[str], Item]:
        """`path -> decoded item` before the frozen encoder (pixels, frames, a mel spectrogram)."""
        raise NotImplementedError

    def encode_decoded(self, items: list[Item]) -> torch.Tensor | list[torch.Tensor]:
        """The frozen encoder's features of decoded items, one per item (what the cache stores)."""
        raise NotImplementedError

    def cache_order(self, path: str) -> Any:
        """Sort key of the paths the cache encodes (items of similar size can share a batch)."""
        return path

    def media_loader(self) -> Callable[[str], Item]:
        decode = self.decoder()
        return self.cache.loader(decode=decode) if self.cache is not None else decode

    def load_media(self, path: str) -> Item:
        self.prepare_media([path])
        return self.media_loader()(path)

    def prepare_media(self, paths: list[str], batch_size: int | None = None) -> int:
        """Fill the feature cache for `paths` (no-op without `feature_cache`); returns how many were encoded."""
        if self.cache is None:
            return 0
        return self.cache.fill(paths, self.decoder(), self.encode_decoded, batch_size or self.cache_batch_size,
                               what=self.modality, order=self.cache_order)

    def reload_config(self, directory: Path) -> dict[str, Any]:
        config = super().reload_config(directory)
        config["init_args"]["feature_cache"] = None  # a training-time cache, not part of the adapter
        return config


@runtime_checkable
class PretrainableInterface(Protocol):
    """What an LLM-free pretraining objective (stage 0) needs of an interface.

    `bridge` is the trainable block between the frozen encoder and the LLM (a `QFormerBridge`, a C-Former...);
    `bridge_inputs(media)` returns what that block reads: the frozen encoder's features and their mask
    (None when every position is valid). An objective checks that the bridge is a kind it can train.
    """

    bridge: nn.Module

    def bridge_inputs(self, media: MediaBatch) -> tuple[torch.Tensor, torch.Tensor | None]: ...
