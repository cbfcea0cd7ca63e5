"""Image interface: frozen vision encoder (features cached or not) -> Q-Former bridge -> tokens at `<image>`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoImageProcessor

from xllm.blocks.bridge import QFormerBridge, QFormerSettings, build_qformer, write_text_side
from xllm.blocks.positions import PositionKind
from xllm.blocks.projection import ProjectionKind
from xllm.encoders.feature_cache import FEATURES, FeatureCache, encoder_identity
from xllm.encoders.vision import FEATURES_VERSION, FrozenVisionEncoder, ImageLoader
from xllm.interfaces.base import FrozenEncoderInterface, MediaBatch, ModalityTokens


class ImageInterface(FrozenEncoderInterface):
    """One image becomes `qformer.num_query_tokens` LLM tokens.

    Args:
        encoder: path (or hub id) of a transformers vision model with an image processor config, or a
            torchvision CNN directory (see `xllm.encoders.vision`).
        qformer: the Q-Former's settings (`QFormerSettings`: queries, width, depth, BERT start, text side).
        projection: `linear` (BLIP-2) or `mlp` (LLaVA-1.5) projection to the LLM width.
        feature_layer: which encoder hidden state feeds the Q-Former (-1: the last).
        encoder_dtype: dtype of the frozen encoder (float32 on CPU; bfloat16 is for GPUs).
        feature_positions: add a position embedding to this many encoder tokens (needed for CNN feature
            maps, whose tokens carry no position of their own; ViTs already have one), e.g. 49 for 7×7.
        feature_cache: folder for the frozen encoder's outputs, one safetensors file per image. With it,
            `prepare_media` encodes each image once and training reads features instead of pixels.
        feature_position_kind: `learned`, `factorised` (row + column; fastest to learn in the demo) or
            `sincos2d` (fixed); see `xllm.blocks.positions`.
    """

    modality = "image"
    path_args = ("encoder", "qformer.bert_init", "qformer.text_tokenizer", "qformer.text_embeddings", "feature_cache")
    content_parts = ("image_url",)

    def __init__(
        self,
        encoder: str,
        qformer: QFormerSettings | None = None,
        projection: ProjectionKind = "linear",
        feature_layer: int = -1,
        encoder_dtype: str = "float32",
        feature_positions: int | None = None,
        feature_cache: str | None = None,
        feature_position_kind: PositionKind = "learned",
    ) -> None:
        super().__init__()
        self.settings = QFormerSettings.of(qformer)
        self.instruction_aware = self.settings.instruction_aware
        self.encoder = FrozenVisionEncoder(encoder, feature_layer=feature_layer, dtype=encoder_dtype)
        self.processor = AutoImageProcessor.from_pretrained(encoder)
        block, tokenizer = build_qformer(self.encoder.hidden_size, self.settings)
        self.bridge = QFormerBridge(block, tokenizer, self.settings.max_text_tokens, feature_positions,
                                    feature_position_kind, projection, self.settings.stop_head,
                                    self.settings.tokens_per_query)
        tag = json.dumps(["v2", FEATURES_VERSION, encoder_identity(encoder), feature_layer, self.processor.to_dict()], sort_keys=True,
                         default=str)
        self.cache = FeatureCache(feature_cache, tag) if feature_cache else None

    @property
    def max_tokens(self) -> int:
        return self.bridge.max_tokens

    def instruction_tokenizer(self):
        return self.bridge.tokenize_one if self.instruction_aware else None

    def attach(self, llm_hidden_size: int) -> None:
        self.bridge.attach(llm_hidden_size)

    def needed_extras(self) -> set[str]:
        return {"vision"} if self.encoder.is_cnn else set()

    def frozen_modules(self) -> list[nn.Module]:
        return [self.encoder, *self.bridge.frozen_modules()]

    def idle_modules(self) -> list[nn.Module]:
        return self.bridge.qformer.text_only_modules(self.instruction_aware)

    def reload_config(self, directory: Path) -> dict[str, Any]:
        config = super().reload_config(directory)
        config["init_args"]["qformer"] = asdict(self.settings)
        write_text_side(self.bridge, directory / f"{self.modality}_qformer_text", config["init_args"]["qformer"])
        return config

    # --- media ---------------------------------------------------------------------------------------
    def decoder(self) -> ImageLoader:
        return ImageLoader(self.processor)

    def encode_decoded(self, items: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        device = next(self.encoder.parameters()).device
        return self.encoder(torch.stack([i["pixel_values"] for i in items]).to(device))

    # --- compute -------------------------------------------------------------------------------------
    def bridge_inputs(self, media: MediaBatch) -> tuple[torch.Tensor, None]:
        """Frozen encoder tokens `[n_images, tokens, hidden]`: cached features, or the encoder run on pixels."""
        if FEATURES in media.values:
            return media.values[FEATURES], None
        return self.encoder(media.values["pixel_values"]), None

    def forward(self, media: MediaBatch) -> ModalityTokens:
        if self.instruction_aware and media.instruction_ids is None:
            raise ValueError(
                "this image interface is instruction-aware: its batch needs instruction_ids (build batches with "
                "the model's processor and collator, or call model.chat)"
            )
        features, mask = self.bridge_inputs(media)
        ids = media.instruction_ids if self.instruction_aware else None
        mask_ids = media.instruction_mask if self.instruction_aware else None
        return ModalityTokens(*self.bridge.tokens(features, mask, ids, mask_ids))
