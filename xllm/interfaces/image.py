"""Image interface: frozen vision encoder -> LayerNorm -> Q-Former -> adapter into the LLM's space."""

from __future__ import annotations

from typing import Literal

import torch
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

    def media_loader(self) -> ImageLoader:
        return ImageLoader(self.processor)

    def load_media(self, path: str) -> torch.Tensor:
        return self.media_loader()(path)

    def encode_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen encoder tokens, `[n_images, tokens, encoder_hidden]` (no gradient)."""
        return self.encoder(pixel_values)

    def qformer_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the Q-Former cross-attends to: normalised frozen-encoder tokens."""
        return self.ln_features(self.encode_features(pixel_values).float())

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
