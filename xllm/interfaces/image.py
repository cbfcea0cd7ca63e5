"""Image interface: frozen vision encoder (features cached or not) -> Q-Former bridge -> tokens at `<image>`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoImageProcessor

from xllm.blocks.bridge import QFormerBridge, build_qformer, write_text_side
from xllm.blocks.positions import PositionKind
from xllm.blocks.projection import ProjectionKind
from xllm.encoders.feature_cache import FEATURES, CachedFeatureLoader, FeatureCache
from xllm.encoders.vision import FEATURES_VERSION, FrozenVisionEncoder, ImageLoader
from xllm.interfaces.base import MediaBatch, ModalityInterface, ModalityTokens


class ImageInterface(ModalityInterface):
    """One image becomes `num_query_tokens` LLM tokens.

    Args:
        encoder: path (or hub id) of a transformers vision model with an image processor config, or a
            torchvision CNN directory (see `xllm.encoders.vision`).
        num_query_tokens: learned queries, i.e. LLM tokens per image (BLIP-2: 32).
        qformer_hidden_size: Q-Former width (BLIP-2: 768, bert-base).
        qformer_layers: Q-Former depth (BLIP-2: 12).
        qformer_heads: attention heads.
        qformer_intermediate_size: FFN width.
        cross_attention_frequency: a cross-attention layer every N layers (BLIP-2: 2).
        cross_attention_init_std: the spread of the new cross-attention weights at the start (None: transformers'
            0.02). Both demos use 0.08: with 0.02 their LLM-free stage 0 sat near chance for its first ~400 steps.
        bert_init: optional local BERT checkpoint whose self-attention and FFN weights start the Q-Former.
        projection: `linear` (BLIP-2) or `mlp` (LLaVA-1.5) projection to the LLM width.
        feature_layer: which encoder hidden state feeds the Q-Former (-1: the last).
        encoder_dtype: dtype of the frozen encoder (float32 on CPU; bfloat16 is for GPUs).
        dropout: Q-Former dropout.
        qformer_text: give the Q-Former BLIP-2's text side (needed for LLM-free pretraining and
            instruction-aware queries); its tokenizer is `text_tokenizer` (default: `bert_init`).
        instruction_aware: the text of the user turn holding each image joins the queries (InstructBLIP).
        text_tokenizer: tokenizer directory for the Q-Former's text side.
        max_text_tokens: longest Q-Former text (instruction or caption), in its own tokens.
        feature_positions: add a position embedding to this many encoder tokens (needed for CNN feature
            maps, whose tokens carry no position of their own; ViTs already have one), e.g. 49 for 7×7.
        feature_cache: folder for the frozen encoder's outputs, one safetensors file per image. With it,
            `prepare_media` encodes each image once and training reads features instead of pixels.
        feature_position_kind: `learned`, `factorised` (row + column; fastest to learn in the demo) or
            `sincos2d` (fixed); see `xllm.blocks.positions`.
        text_embeddings: safetensors file with the Q-Former text side's frozen word and position tables (an
            adapter writes its own, so it loads without the `bert_init` checkpoint).
    """

    modality = "image"
    path_args = ("encoder", "bert_init", "text_tokenizer", "text_embeddings", "feature_cache")
    content_parts = ("image_url",)

    def __init__(
        self,
        encoder: str,
        num_query_tokens: int = 32,
        qformer_hidden_size: int = 768,
        qformer_layers: int = 12,
        qformer_heads: int = 12,
        qformer_intermediate_size: int = 3072,
        cross_attention_frequency: int = 2,
        cross_attention_init_std: float | None = None,
        bert_init: str | None = None,
        projection: ProjectionKind = "linear",
        feature_layer: int = -1,
        encoder_dtype: str = "float32",
        dropout: float = 0.1,
        qformer_text: bool = False,
        instruction_aware: bool = False,
        text_tokenizer: str | None = None,
        max_text_tokens: int = 64,
        feature_positions: int | None = None,
        feature_cache: str | None = None,
        feature_position_kind: PositionKind = "learned",
        text_embeddings: str | None = None,
    ) -> None:
        super().__init__()
        self.instruction_aware = instruction_aware
        self.encoder = FrozenVisionEncoder(encoder, feature_layer=feature_layer, dtype=encoder_dtype)
        self.processor = AutoImageProcessor.from_pretrained(encoder)
        qformer, tokenizer = build_qformer(
            self.encoder.hidden_size, num_query_tokens=num_query_tokens, qformer_hidden_size=qformer_hidden_size,
            qformer_layers=qformer_layers, qformer_heads=qformer_heads,
            qformer_intermediate_size=qformer_intermediate_size, cross_attention_frequency=cross_attention_frequency,
            dropout=dropout, bert_init=bert_init, qformer_text=qformer_text, instruction_aware=instruction_aware,
            text_tokenizer=text_tokenizer, max_text_tokens=max_text_tokens, text_embeddings=text_embeddings,
            cross_attention_init_std=cross_attention_init_std,
        )
        self.bridge = QFormerBridge(qformer, tokenizer, max_text_tokens, feature_positions, feature_position_kind,
                                    projection)
        tag = json.dumps(["v2", FEATURES_VERSION, encoder, feature_layer, self.processor.to_dict()], sort_keys=True,
                         default=str)
        self.cache = FeatureCache(feature_cache, tag) if feature_cache else None

    @property
    def max_tokens(self) -> int:
        return self.bridge.num_query_tokens

    def instruction_tokenizer(self):
        return self.bridge.tokenize_one if self.instruction_aware else None

    def attach(self, llm_hidden_size: int) -> None:
        self.bridge.attach(llm_hidden_size)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.encoder, *self.bridge.frozen_modules()]

    def idle_modules(self) -> list[nn.Module]:
        return self.bridge.qformer.text_only_modules(self.instruction_aware)

    def reload_config(self, directory: Path) -> dict[str, Any]:
        config = self.to_config()
        args = config["init_args"]
        args["feature_cache"] = None  # a training-time cache, not part of the adapter (pass one to reuse it)
        write_text_side(self.bridge, directory / f"{self.modality}_qformer_text", args)
        return config

    # --- media ---------------------------------------------------------------------------------------
    def media_loader(self) -> ImageLoader | CachedFeatureLoader:
        images = ImageLoader(self.processor)
        return self.cache.loader(decode=images) if self.cache is not None else images

    def load_media(self, path: str) -> dict[str, torch.Tensor]:
        self.prepare_media([path])
        return self.media_loader()(path)

    def prepare_media(self, paths: list[str], batch_size: int = 32) -> int:
        """Fill the feature cache for `paths` (no-op without `feature_cache`); returns how many were encoded."""
        if self.cache is None:
            return 0
        device = next(self.encoder.parameters()).device
        return self.cache.fill(
            paths, ImageLoader(self.processor),
            lambda items: self.encoder(torch.stack([i["pixel_values"] for i in items]).to(device)),
            batch_size, what="image",
        )

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
        return ModalityTokens.fixed(self.bridge(features, mask, ids, mask_ids))
