"""Image interface: frozen vision encoder -> LayerNorm -> Q-Former -> adapter into the LLM's space."""

from __future__ import annotations

from typing import Literal

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from transformers import AutoImageProcessor

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
    ) -> None:
        super().__init__()
        self.encoder = FrozenVisionEncoder(encoder, feature_layer=feature_layer, dtype=encoder_dtype)
        self.processor = AutoImageProcessor.from_pretrained(encoder)
        # BLIP-2's `ln_vision`: a trainable LayerNorm on the frozen encoder's tokens.
        self.ln_features = nn.LayerNorm(self.encoder.hidden_size)
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
        )
        self.adapter_kind = adapter
        self.adapter: nn.Module | None = None

    @property
    def num_tokens(self) -> int:
        return self.qformer.num_query_tokens

    def attach(self, llm_hidden_size: int) -> None:
        self.adapter = build_projection(self.adapter_kind, self.qformer.hidden_size, llm_hidden_size)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.encoder]

    def media_loader(self) -> ImageLoader:
        return ImageLoader(self.processor)

    def load_media(self, path: str) -> torch.Tensor:
        return self.media_loader()(path)

    def encode_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen encoder tokens, `[n_images, tokens, encoder_hidden]` (no gradient)."""
        return self.encoder(pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.adapter is None:
            raise RuntimeError("ImageInterface.attach(llm_hidden_size) must be called before forward")
        features = self.ln_features(self.encode_features(pixel_values).float())
        queries = self.qformer(features)
        return self.adapter(queries)
