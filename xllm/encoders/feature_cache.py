"""A cache of a frozen encoder's outputs: one safetensors file per media file, any interface can use it.

A frozen encoder gives the same features for the same file every epoch, so an interface with a cache encodes
each file once (`fill`, run by `prepare_media` before training) and its data workers read features instead
of decoding pixels. Cached items are `{"features": tensor}`, raw ones carry their own key (`pixel_values`):
the interface tells them apart by key, never by shape.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

FEATURES = "features"


def encoder_identity(encoder: str) -> str:
    """An encoder as a cache tag names it: a local folder by its real path (the demo's config and an adapter's
    relative path name one folder two ways and must share entries), a hub id as it is."""
    return os.path.realpath(encoder) if os.path.exists(encoder) else encoder


class FeatureCache:
    """Files are keyed by the media file's real path (symlinks resolved: one file reached two ways is encoded once),
    size and mtime and by `tag` (the encoder and its preprocessing), so a changed file or encoder is never served
    stale features."""

    def __init__(self, folder: str | Path, tag: str) -> None:
        self.folder, self.tag = Path(folder), tag

    def file_for(self, path: str) -> Path:
        stat = os.stat(path)
        key = hashlib.sha1(f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{self.tag}".encode()).hexdigest()
        return self.folder / f"{key}.safetensors"

    @torch.no_grad()
    def fill(
        self,
        paths: list[str],
        load: Callable[[str], Any],
        encode: Callable[[list[Any]], torch.Tensor | list[torch.Tensor]],
        batch_size: int = 32,
        what: str = "media",
        order: Callable[[str], Any] | None = None,
    ) -> int:
        """Encode every path not cached yet (`load` one raw item, `encode` a list of them into a batch tensor or
        one tensor per item, for items of different lengths); returns how many. Paths are encoded in sorted
        order, or sorted by `order` (e.g. file size, so clips of similar length share a batch).

        Files that cannot be decoded are left uncached: loading them later raises (or skips) naming their record."""
        self.folder.mkdir(parents=True, exist_ok=True)
        missing = sorted({p for p in paths if not self.file_for(p).exists()}, key=order)
        encoded = 0
        for start in tqdm(range(0, len(missing), batch_size), desc=f"caching {what} features", disable=len(missing) < 64):
            chunk, items = [], []
            for path in missing[start:start + batch_size]:
                try:
                    items.append(load(path))
                    chunk.append(path)
                except (OSError, ValueError):
                    continue
            if not chunk:
                continue
            # Stored in the encoder's own dtype: exactly what an uncached forward would give.
            features = encode(items)
            encoded += len(chunk)
            for path, tensor in zip(chunk, features):
                write_atomically({FEATURES: tensor.to("cpu").contiguous()}, self.file_for(path))
        if encoded:
            print(f"feature cache {self.folder}: encoded {encoded} {what} file(s)")
        return encoded

    def loader(self, decode: Callable[[str], Any] | None = None, memory_bytes: int = 2 << 30) -> CachedFeatureLoader:
        return CachedFeatureLoader(self, decode, memory_bytes)


def write_atomically(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Write beside `file`, then rename: a run killed mid-write, or another rank filling the same cache, never
    leaves or reads a half-written entry (a rename within a folder is atomic)."""
    partial = file.with_name(f"{file.name}.{os.getpid()}.partial")
    try:
        save_file(tensors, str(partial))
        os.replace(partial, file)
    finally:
        partial.unlink(missing_ok=True)


class CachedFeatureLoader:
    """`path -> {"features": tensor}` from the cache (picklable, for data workers).

    Features read once stay in memory up to `memory_bytes` (a small dataset's features are then read from
    disk once per run, not once per epoch); beyond that they are read from disk each time. `decode`, when
    given, is tried on a file with no cached features so that a corrupt file raises its own, precise error."""

    def __init__(self, cache: FeatureCache, decode: Callable[[str], Any] | None = None, memory_bytes: int = 2 << 30) -> None:
        self.cache, self.decode, self.memory_bytes = cache, decode, memory_bytes
        self.held: dict[str, torch.Tensor] = {}
        self.held_bytes = 0

    def __call__(self, path: str) -> dict[str, torch.Tensor]:
        if path in self.held:
            return {FEATURES: self.held[path]}
        file = self.cache.file_for(path)
        if not file.exists():
            if self.decode is not None:
                self.decode(path)
            raise ValueError(f"no cached features for {path} (prepare_media was not run on it)")
        features = load_file(str(file))[FEATURES].float()
        size = features.numel() * features.element_size()
        if self.held_bytes + size <= self.memory_bytes:
            self.held[path], self.held_bytes = features, self.held_bytes + size
        return {FEATURES: features}
