"""Image interface: frozen vision encoder -> LayerNorm -> Q-Former -> adapter into the LLM's space."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from PIL import Image, UnidentifiedImageError
from torch import nn
from transformers import AutoImageProcessor, AutoTokenizer

from xllm.adapters.projection import build_projection
from xllm.interfaces.base import ModalityInterface
from xllm.interfaces.encoders import FrozenVisionEncoder
from xllm.interfaces.qformer import QFormer


class ImageLoader:
    """Decodes one image file and applies the encoder's image processor (small, so workers get a cheap copy)."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, path: str) -> torch.Tensor:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except FileNotFoundError:
            raise
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise ValueError(f"cannot decode image {path}: {err}") from err
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


class RowColumnPositions(nn.Module):
    """Learned 2-D positions for a square map: one vector per row plus one per column.

    Cells of a row share their row vector, so a word like "top" has one thing to match instead of one
    random code per cell; measured on the demo's task it learns position questions in fewer steps than
    one learned vector per cell (GPU sweep, 5 seeds) and needs 2·side vectors instead of side².
    """

    def __init__(self, tokens: int, dim: int, std: float) -> None:
        super().__init__()
        side = int(round(tokens ** 0.5))
        if side * side != tokens:
            raise ValueError(f"factorised positions need a square map, got {tokens} tokens")
        self.rows = nn.Parameter(torch.randn(side, 1, dim) * std)
        self.columns = nn.Parameter(torch.randn(1, side, dim) * std)

    def forward(self) -> torch.Tensor:
        return (self.rows + self.columns).reshape(1, -1, self.rows.shape[-1])


# Encoder tokens are LayerNorm-ed to unit scale before the positions are added; positions at BERT's usual
# 0.02 would start ~50x below the content and take thousands of steps to matter.
POSITION_INIT_STD = 0.5


def sincos_2d(tokens: int, dim: int) -> torch.Tensor:
    """`[1, tokens, dim]` fixed 2-D sine-cosine positions for a square `sqrt(tokens)²` map (MAE's recipe)."""
    side = int(round(tokens ** 0.5))
    if side * side != tokens or dim % 4:
        raise ValueError(f"sincos2d positions need a square map and dim % 4 == 0, got {tokens} tokens, dim {dim}")
    quarter = dim // 4
    frequencies = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    rows, columns = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                                   indexing="ij")
    parts = []
    for grid in (rows.flatten(), columns.flatten()):
        angles = grid[:, None] * frequencies[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)[None]


class CachedFeatureLoader:
    """Reads one image's cached encoder features; `ImageInterface.prepare_media` writes them.

    Features read once stay in memory up to `memory_bytes` (a small dataset's features are then read from
    disk once per run, not once per epoch); beyond that they are read from disk each time."""

    def __init__(self, folder: Path, tag: str, images: ImageLoader | None = None, memory_bytes: int = 2 << 30) -> None:
        self.folder, self.tag, self.images = Path(folder), tag, images
        self.memory_bytes, self.held_bytes = memory_bytes, 0
        self.held: dict[str, torch.Tensor] = {}

    def file_for(self, path: str) -> Path:
        stat = os.stat(path)
        key = hashlib.sha1(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{self.tag}".encode()).hexdigest()
        return self.folder / f"{key}.safetensors"

    def __call__(self, path: str) -> torch.Tensor:
        if path in self.held:
            return self.held[path]
        file = self.file_for(path)
        if not file.exists():
            if self.images is not None:
                self.images(path)  # a file that cannot be decoded raises its own, precise error here
            raise ValueError(f"no cached features for {path} (prepare_media was not run on it)")
        features = load_file(str(file))["features"].float()
        size = features.numel() * features.element_size()
        if self.held_bytes + size <= self.memory_bytes:
            self.held[path], self.held_bytes = features, self.held_bytes + size
        return features


class ImageInterface(ModalityInterface):
    """One image becomes `num_query_tokens` LLM tokens.

    Args:
        encoder: path (or hub id) of a transformers vision model with an image processor config.
        num_query_tokens: learned queries, i.e. LLM tokens per image (BLIP-2: 32).
        qformer_hidden_size: Q-Former width (BLIP-2: 768, bert-base).
        qformer_layers: Q-Former depth (BLIP-2: 12).
        qformer_heads: attention heads.
        qformer_intermediate_size: FFN width.
        cross_attention_frequency: a cross-attention layer every N layers (BLIP-2: 2).
        bert_init: optional local BERT checkpoint whose self-attention and FFN weights start the Q-Former.
        qformer_text: give the Q-Former BLIP-2's text side (needed for LLM-free pretraining and
            instruction-aware queries); its tokenizer is `text_tokenizer` (default: `bert_init`).
        instruction_aware: the text of the user turn holding each image joins the queries (InstructBLIP).
        text_tokenizer: tokenizer directory for the Q-Former's text side.
        max_text_tokens: longest Q-Former text (instruction or caption), in its own tokens.
        feature_cache: folder for the frozen encoder's outputs, one safetensors file per image (keyed by
            path, size, mtime and encoder). With it, `prepare_media` encodes each image once and training
            reads features instead of pixels — the frozen encoder then costs nothing per epoch.
        feature_positions: add a learned position embedding to the encoder tokens (needed for CNN feature
            maps, whose tokens carry no position of their own; ViTs already have one). Needs a fixed
            number of encoder tokens, given here (e.g. 49 for a 7×7 map).
        feature_position_kind: `learned` (one vector per token, BLIP-2/ViT style), `factorised` (learned row
            + column vectors for a square map; fastest to learn in the demo) or `sincos2d` (fixed row/column sine-cosine codes,
            as in MAE, for a square map: location is readable from the first step, nothing to learn).
        adapter: `linear` (BLIP-2) or `mlp` (LLaVA-1.5) projection to the LLM width.
        feature_layer: which encoder hidden state feeds the Q-Former (-1: the last).
        encoder_dtype: dtype of the frozen encoder (float32 on CPU; bfloat16 is for GPUs).
        dropout: Q-Former dropout.
    """

    modality = "image"

    def __init__(
        self,
        encoder: str,
        num_query_tokens: int = 32,
        qformer_hidden_size: int = 768,
        qformer_layers: int = 12,
        qformer_heads: int = 12,
        qformer_intermediate_size: int = 3072,
        cross_attention_frequency: int = 2,
        bert_init: str | None = None,
        adapter: Literal["linear", "mlp"] = "linear",
        feature_layer: int = -1,
        encoder_dtype: str = "float32",
        dropout: float = 0.1,
        qformer_text: bool = False,
        instruction_aware: bool = False,
        text_tokenizer: str | None = None,
        max_text_tokens: int = 64,
        feature_positions: int | None = None,
        feature_cache: str | None = None,
        feature_position_kind: Literal["learned", "factorised", "sincos2d"] = "learned",
    ) -> None:
        super().__init__()
        if instruction_aware and not qformer_text:
            raise ValueError("instruction_aware needs the Q-Former text side: set qformer_text: true")
        self.text_tokenizer = None
        if qformer_text:
            source = text_tokenizer or bert_init
            if source is None:
                raise ValueError("qformer_text needs a tokenizer: set text_tokenizer (or bert_init)")
            self.text_tokenizer = AutoTokenizer.from_pretrained(source)
        self.instruction_aware = instruction_aware
        self.max_text_tokens = max_text_tokens
        self.encoder = FrozenVisionEncoder(encoder, feature_layer=feature_layer, dtype=encoder_dtype)
        self.processor = AutoImageProcessor.from_pretrained(encoder)
        # BLIP-2's `ln_vision`: a trainable LayerNorm on the frozen encoder's tokens.
        self.ln_features = nn.LayerNorm(self.encoder.hidden_size)
        if feature_positions and feature_position_kind == "learned":
            self.feature_positions = nn.Parameter(
                torch.randn(1, feature_positions, self.encoder.hidden_size) * POSITION_INIT_STD
            )
        elif feature_positions and feature_position_kind == "factorised":
            self.feature_positions = RowColumnPositions(feature_positions, self.encoder.hidden_size, POSITION_INIT_STD)
        elif feature_positions:
            self.register_buffer(
                "feature_positions", sincos_2d(feature_positions, self.encoder.hidden_size), persistent=False
            )
        else:
            self.feature_positions = None
        self.qformer = QFormer(
            encoder_hidden_size=self.encoder.hidden_size,
            num_query_tokens=num_query_tokens,
            hidden_size=qformer_hidden_size,
            num_layers=qformer_layers,
            num_heads=qformer_heads,
            intermediate_size=qformer_intermediate_size,
            cross_attention_frequency=cross_attention_frequency,
            dropout=dropout,
            bert_init=bert_init,
            text_vocab_size=len(self.text_tokenizer) if self.text_tokenizer is not None else None,
            max_text_positions=max_text_tokens,
        )
        self.adapter_kind = adapter
        self.adapter: nn.Module | None = None
        self.feature_cache = Path(feature_cache) if feature_cache else None
        self._cache_tag = json.dumps(["v2", encoder, feature_layer, self.processor.to_dict()], sort_keys=True, default=str)

    @property
    def num_tokens(self) -> int:
        return self.qformer.num_query_tokens

    def attach(self, llm_hidden_size: int) -> None:
        self.adapter = build_projection(self.adapter_kind, self.qformer.hidden_size, llm_hidden_size)

    @property
    def uses_instructions(self) -> bool:
        return self.instruction_aware

    def frozen_modules(self) -> list[nn.Module]:
        frozen: list[nn.Module] = [self.encoder]
        embeddings = self.qformer.embeddings
        if embeddings is not None and not any(p.requires_grad for p in embeddings.parameters()):
            frozen.append(embeddings)  # BERT's word/position tables, read from bert_init at load time
        return frozen

    def tokenize_text(self, texts: list[str], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Q-Former token ids and mask for `texts` (its own BERT tokenizer, padded, truncated)."""
        if self.text_tokenizer is None:
            raise RuntimeError("this interface has no Q-Former text side (qformer_text: false)")
        encoded = self.text_tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        )
        return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)

    def media_loader(self) -> ImageLoader | CachedFeatureLoader:
        if self.feature_cache is not None:
            return CachedFeatureLoader(self.feature_cache, self._cache_tag, ImageLoader(self.processor))
        return ImageLoader(self.processor)

    def load_media(self, path: str) -> torch.Tensor:
        if self.feature_cache is not None:
            self.prepare_media([path])
        return self.media_loader()(path)

    @torch.no_grad()
    def prepare_media(self, paths: list[str], batch_size: int = 32) -> int:
        """Fill the feature cache for `paths` (no-op without `feature_cache`); returns how many were encoded."""
        if self.feature_cache is None:
            return 0
        self.feature_cache.mkdir(parents=True, exist_ok=True)
        loader = CachedFeatureLoader(self.feature_cache, self._cache_tag)
        missing = sorted({p for p in paths if not loader.file_for(p).exists()})
        images = ImageLoader(self.processor)
        device = next(self.encoder.parameters()).device
        encoded = 0
        for start in tqdm(range(0, len(missing), batch_size), desc="caching image features", disable=len(missing) < 64):
            chunk, pixels = [], []
            for path in missing[start:start + batch_size]:
                try:
                    pixels.append(images(path))
                    chunk.append(path)
                except (OSError, ValueError):
                    continue  # left uncached: loading it later raises (or skips) naming its record
            if not chunk:
                continue
            # Stored in the encoder's own dtype: exactly what an uncached forward would give.
            features = self.encoder(torch.stack(pixels).to(device)).to("cpu")
            encoded += len(chunk)
            for path, tensor in zip(chunk, features):
                save_file({"features": tensor.contiguous()}, str(loader.file_for(path)))
        return encoded

    def encode_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen encoder tokens, `[n_images, tokens, encoder_hidden]` (no gradient).

        Items that are already cached features (`[n, tokens, hidden]`) pass through."""
        if pixel_values.ndim == 3:
            return pixel_values
        return self.encoder(pixel_values)

    def qformer_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the Q-Former cross-attends to: normalised frozen-encoder tokens (+ learned positions)."""
        features = self.ln_features(self.encode_features(pixel_values).float())
        if self.feature_positions is not None:
            positions = self.feature_positions
            positions = positions() if isinstance(positions, nn.Module) else positions
            if features.shape[1] != positions.shape[1]:
                raise ValueError(f"feature_positions={positions.shape[1]} but the encoder gives {features.shape[1]} tokens")
            features = features + positions
        return features

    def forward(self, pixel_values: torch.Tensor, instructions: list[str] | None = None) -> torch.Tensor:
        if self.adapter is None:
            raise RuntimeError("ImageInterface.attach(llm_hidden_size) must be called before forward")
        features = self.qformer_features(pixel_values)
        if self.instruction_aware:
            if instructions is None or len(instructions) != features.shape[0]:
                raise ValueError("an instruction-aware interface needs one instruction text per image")
            ids, mask = self.tokenize_text(instructions, features.device)
            queries = self.qformer(features, instruction_ids=ids, instruction_mask=mask)
        else:
            queries = self.qformer(features)
        return self.adapter(queries)
