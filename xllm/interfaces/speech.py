"""Speech interface: audio file -> mono 16 kHz -> frozen Whisper encoder -> C-Former (or window Q-Former) -> `<audio>`.

Audio is decoded with PyAV (its bundled FFmpeg reads wav, flac, mp3, ogg/opus, m4a/aac and the audio track of a
video), every channel averaged to mono and resampled to the encoder's rate by FFmpeg's resampler, so a stereo
48 kHz file and a mono 8 kHz file both reach the encoder as what it was trained on (SALMONN reads channel 0
and never resamples). Log-mel features come from transformers' `WhisperFeatureExtractor`; the frozen encoder
runs on each clip's own length (see `FrozenSpeechEncoder`), and its outputs can be cached per file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from xllm.blocks.cformer import CFormer
from xllm.blocks.projection import ProjectionKind
from xllm.blocks.window_qformer import WindowQFormer
from xllm.encoders.audio import MEL, AudioLoader
from xllm.encoders.feature_cache import FEATURES, FeatureCache, encoder_identity
from xllm.encoders.whisper import FrozenSpeechEncoder
from xllm.interfaces.base import FrozenEncoderInterface, MediaBatch, ModalityTokens

SpeechBridgeKind = Literal["cformer", "window"]


class SpeechInterface(FrozenEncoderInterface):
    """One audio clip becomes a variable number of LLM tokens at `<audio>` (about one per output token with CIF).

    Args:
        encoder: path of a Whisper checkpoint (transformers layout with a feature-extractor config); only its
            encoder is loaded, frozen.
        bridge: `cformer` (CIF + transformer, X-LLM; trains LLM-free in stage 0) or `window` (SALMONN's window
            Q-Former: a fixed number of tokens per second; trains through the LLM only).
        hidden_size: bridge width.
        num_layers: bridge transformer / Q-Former layers.
        num_heads: attention heads.
        intermediate_size: FFN width.
        max_tokens: most LLM tokens one clip may become (an error beyond it, never a silent cut).
        tail_threshold: C-Former: at inference a remainder of at least this fires one more token.
        window_frames: window Q-Former: encoder frames per window (17 ≈ 0.34 s, SALMONN).
        queries_per_window: window Q-Former: tokens per window.
        bert_init: C-Former: BERT checkpoint that starts its transformer (X-LLM's adaptor was BERT).
        projection: `linear` or `mlp` into the LLM width.
        dropout: bridge dropout.
        pad_to_window: run the encoder on 30-s windows as Whisper was trained (≈15x the compute for short clips)
            instead of on each clip's own length.
        encoder_dtype: dtype of the frozen encoder (float32 on CPU).
        feature_cache: folder for cached encoder outputs, one safetensors file per audio file.
        min_peak: a clip whose absolute peak is below this is rejected as silent.
    """

    modality = "audio"
    spoken = True
    path_args = ("encoder", "bert_init", "feature_cache")
    content_parts = ("input_audio",)

    def __init__(
        self,
        encoder: str,
        bridge: SpeechBridgeKind = "cformer",
        hidden_size: int = 256,
        num_layers: int = 2,
        num_heads: int = 4,
        intermediate_size: int = 1024,
        max_tokens: int = 256,
        tail_threshold: float = 0.5,
        window_frames: int = 17,
        queries_per_window: int = 1,
        bert_init: str | None = None,
        projection: ProjectionKind = "linear",
        dropout: float = 0.1,
        pad_to_window: bool = False,
        encoder_dtype: str = "float32",
        feature_cache: str | None = None,
        min_peak: float = 1e-4,
    ) -> None:
        super().__init__()
        self.encoder = FrozenSpeechEncoder(encoder, dtype=encoder_dtype, pad_to_window=pad_to_window)
        self._max_tokens, self.min_peak = max_tokens, min_peak
        width = self.encoder.hidden_size
        if bridge == "cformer":
            self.bridge: CFormer | WindowQFormer = CFormer(
                width, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                intermediate_size=intermediate_size, max_tokens=max_tokens, tail_threshold=tail_threshold,
                dropout=dropout, bert_init=bert_init, projection=projection)
        elif bridge == "window":
            self.bridge = WindowQFormer(
                width, window_frames=window_frames, queries_per_window=queries_per_window, hidden_size=hidden_size,
                num_layers=num_layers, num_heads=num_heads, intermediate_size=intermediate_size, dropout=dropout,
                projection=projection)
        else:
            raise ValueError(f"bridge must be 'cformer' or 'window', got {bridge!r}")
        tag = json.dumps(["v1", encoder_identity(encoder), pad_to_window, self.encoder.feature_extractor.to_dict()], sort_keys=True,
                         default=str)
        self.cache = FeatureCache(feature_cache, tag) if feature_cache else None

    @property
    def max_tokens(self) -> int:
        return self._max_tokens

    def attach(self, llm_hidden_size: int) -> None:
        self.bridge.attach(llm_hidden_size)

    def frozen_modules(self) -> list[nn.Module]:
        return [self.encoder]

    def reload_config(self, directory: Path) -> dict[str, Any]:
        config = super().reload_config(directory)
        config["init_args"]["bert_init"] = None  # the trained weights replace BERT's initialisation
        return config

    # --- media ---------------------------------------------------------------------------------------
    def decoder(self) -> AudioLoader:
        return AudioLoader(self.encoder.feature_extractor, self.min_peak)

    def encode_decoded(self, items: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        batch = self.collate(items)
        features, lengths = self.encoder(batch.values[MEL], batch.lengths)
        return [f[:n] for f, n in zip(features, lengths.tolist())]

    def cache_order(self, path: str) -> tuple[int, str]:
        return os.path.getsize(path), path  # clips of similar length share a batch (less padding)

    # --- compute -------------------------------------------------------------------------------------
    def bridge_inputs(self, media: MediaBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen encoder frames `[n, frames, hidden]` (cached, or the encoder run on the mel) and their mask."""
        if FEATURES in media.values:
            features, lengths = media.values[FEATURES], media.lengths
        else:
            features, lengths = self.encoder(media.values[MEL], media.lengths)
        if lengths is None:
            lengths = torch.full((features.shape[0],), features.shape[1], dtype=torch.long)
        mask = torch.arange(features.shape[1], device=features.device)[None] < lengths.to(features.device)[:, None]
        return features, mask

    def forward(self, media: MediaBatch) -> ModalityTokens:
        features, mask = self.bridge_inputs(media)
        if isinstance(self.bridge, CFormer):
            fired = self.bridge(features, mask)
            return ModalityTokens(fired.tokens, fired.lengths)
        tokens, lengths = self.bridge(features, mask)
        if int(lengths.max()) > self.max_tokens:
            raise ValueError(f"a clip became {int(lengths.max())} tokens, more than max_tokens={self.max_tokens}")
        return ModalityTokens(tokens, lengths)
