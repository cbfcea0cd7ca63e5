"""Video interface: sampled frames (PyAV) -> frozen image encoder per frame -> a Q-Former that knows time -> `<video>`.

Composed of the contract's blocks. Each frame's feature map (optionally pooled to `frame_tokens` tokens) gets the
image interface's spatial positions plus a learned *frame-index* position — the time X-LLM's video path lacks —
and then one of two temporal designs (`temporal`):

- `qformer` (Video-LLaMA's bound on the token count, in one step): a single Q-Former reads every frame's tokens
  as one key/value set, so `num_query_tokens` LLM tokens per video whatever the frame count. Measured for the
  video demo, this learned order and direction where a per-frame Q-Former followed by a transformer over frames
  learned ~4x slower per step (`../shared/DESIGN.md`). LLM-free stage 0 pretrains it like the image Q-Former.
- `concat` (X-LLM's): the Q-Former reads each frame alone, the frame-index position is added to its query
  outputs, and the frames' tokens are concatenated: `num_frames x num_query_tokens` LLM tokens, fewer for a clip
  with fewer frames (its token count follows its frames).

A clip with fewer frames than `num_frames` is padded in the batch and the padding is masked: the Q-Former never
attends to padded frames (`qformer`), and their tokens never reach the LLM (`concat`). `init_from_image` starts
the Q-Former (and the projection, LayerNorm and spatial positions) from a trained image adapter — X-LLM reuses its
image Q-Former this way; `freeze_qformer` keeps it as it was.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoImageProcessor

from xllm.blocks.bridge import QFormerBridge, QFormerSettings, build_qformer, write_text_side
from xllm.blocks.positions import POSITION_INIT_STD, PositionKind, square_side
from xllm.blocks.projection import ProjectionKind
from xllm.blocks.qformer import QFormer
from xllm.encoders.feature_cache import FEATURES, FeatureCache, encoder_identity
from xllm.encoders.video_frames import SamplingMode, VideoLoader
from xllm.encoders.vision import FEATURES_VERSION, FrozenVisionEncoder
from xllm.frozen import freeze
from xllm.interfaces.base import FrozenEncoderInterface, MediaBatch, ModalityTokens, adapter_tensors

TemporalKind = Literal["qformer", "concat"]


class FramesBridge(QFormerBridge):
    """The Q-Former bridge over a clip's frames: `features([n, frames, tokens, dim])` normalises each frame's
    tokens, adds spatial and frame-index positions, and lays all frames' tokens out as one sequence
    `[n, frames * tokens, dim]`, which the Q-Former reads at once (the image bridge's `forward` then applies)."""

    def __init__(self, qformer: QFormer, num_frames: int, frame_positions: bool = True, **bridge_args: Any) -> None:
        super().__init__(qformer, **bridge_args)
        dim = qformer.config.encoder_hidden_size
        self.frame_positions = nn.Parameter(torch.randn(num_frames, 1, dim) * POSITION_INIT_STD) if frame_positions \
            else None
        # The ablation's switch (time removed at evaluation): the trained frame positions are kept but not added.
        self.use_frame_positions = frame_positions

    def features(self, encoder_features: torch.Tensor) -> torch.Tensor:
        n, frames, tokens, dim = encoder_features.shape
        if self.frame_positions is not None and frames > len(self.frame_positions):
            raise ValueError(f"a clip of {frames} frames, but frame positions exist for {len(self.frame_positions)}")
        features = super().features(encoder_features.reshape(n * frames, tokens, dim)).reshape(n, frames, tokens, dim)
        if self.frame_positions is not None and self.use_frame_positions:
            features = features + self.frame_positions[:frames]
        return features.reshape(n, frames * tokens, dim)


class VideoInterface(FrozenEncoderInterface):
    """One video becomes `num_query_tokens` LLM tokens (`temporal: qformer`) or up to `num_frames` times that
    (`temporal: concat`).

    Args:
        encoder: the frozen image encoder run on every frame (as `ImageInterface.encoder`).
        num_frames: frames sampled per clip (N); shorter clips give fewer, masked in the batch.
        sampling: `uniform` (segment centres), `fps` (every 1/fps s, at most N) or `headtail` (random, training;
            not with a feature cache, which needs the same frames every epoch).
        fps: frames per second for `sampling: fps`.
        short_side: frames are scaled to this shorter side as they are decoded (the processor then resizes/crops).
        frame_size: the square size the encoder sees each frame at (None: its processor's own, 224 for most). A
            CNN takes any size and costs in proportion to its area: the video demo's 160 px frames encode in about
            half the time of 224 px ones, the cost that dominates a CPU run. Not for a ViT (its positions are fixed).
        frame_tokens: pool each frame's feature map to this many tokens (a square number; None: keep all). The
            video demo's probe learned ~3x faster with 9 tokens per frame than with 49.
        temporal: `qformer` or `concat` (module docstring).
        frame_positions: learned frame-index positions (False: the no-time ablation, X-LLM's way).
        init_from_image: an image adapter directory whose bridge starts this one (one config line).
        freeze_qformer: keep the Q-Former from `init_from_image` frozen (X-LLM's reuse of the image Q-Former); the
            video adapter then names that image adapter, which it loads the Q-Former from.
        qformer, projection, feature_layer, encoder_dtype, feature_positions, feature_position_kind: as for
            `ImageInterface` (per frame).
        feature_cache: folder for the frozen encoder's (pooled) frame features, one file per video.
    """

    modality = "video"
    cache_batch_size = 8
    path_args = ("encoder", "qformer.bert_init", "qformer.text_tokenizer", "qformer.text_embeddings", "feature_cache",
                 "init_from_image")
    content_parts = ("video_url",)

    def __init__(
        self,
        encoder: str,
        num_frames: int = 8,
        sampling: SamplingMode = "uniform",
        fps: float | None = None,
        short_side: int | None = 256,
        frame_size: int | None = None,
        frame_tokens: int | None = None,
        temporal: TemporalKind = "qformer",
        frame_positions: bool = True,
        init_from_image: str | None = None,
        freeze_qformer: bool = False,
        qformer: QFormerSettings | None = None,
        projection: ProjectionKind = "linear",
        feature_layer: int = -1,
        encoder_dtype: str = "float32",
        feature_positions: int | None = None,
        feature_position_kind: PositionKind = "learned",
        feature_cache: str | None = None,
    ) -> None:
        super().__init__()
        if temporal not in ("qformer", "concat"):
            raise ValueError(f"temporal must be 'qformer' or 'concat', got {temporal!r}")
        if freeze_qformer and not init_from_image:
            raise ValueError("freeze_qformer keeps a trained Q-Former as it is: give it one with init_from_image")
        if feature_cache and sampling == "headtail":
            raise ValueError("a feature cache needs the same frames every epoch: use sampling uniform or fps with it")
        if frame_tokens is not None:
            square_side(frame_tokens, "frame_tokens")
        self.num_frames, self.temporal, self.frame_tokens = num_frames, temporal, frame_tokens
        self.settings = QFormerSettings.of(qformer)
        self.instruction_aware = self.settings.instruction_aware
        self.encoder = FrozenVisionEncoder(encoder, feature_layer=feature_layer, dtype=encoder_dtype)
        self.processor = AutoImageProcessor.from_pretrained(encoder)
        if frame_size is not None:
            if getattr(self.processor.size, "height", None) is None or getattr(self.processor, "do_center_crop", False):
                raise ValueError(f"frame_size needs a processor that resizes to height x width without a crop; "
                                 f"{encoder}'s has size {self.processor.size}")
            self.processor = AutoImageProcessor.from_pretrained(encoder, size={"height": frame_size,
                                                                               "width": frame_size})
        self.sampling, self.fps, self.short_side = sampling, fps, short_side
        block, tokenizer = build_qformer(self.encoder.hidden_size, self.settings)
        bridge_args = dict(tokenizer=tokenizer, max_text_tokens=self.settings.max_text_tokens,
                           feature_positions=feature_positions,
                           position_kind=feature_position_kind, projection=projection)
        if (self.settings.stop_head or self.settings.tokens_per_query > 1) and temporal != "qformer":
            raise ValueError("qformer: {stop_head, tokens_per_query} need temporal: qformer (concat gives every "
                             "frame's queries, one token each)")
        bridge_args |= {"stop_head": self.settings.stop_head, "tokens_per_query": self.settings.tokens_per_query}
        if temporal == "qformer":
            self.bridge: QFormerBridge = FramesBridge(block, num_frames, frame_positions, **bridge_args)
            self.query_frame_positions = None
        else:
            self.bridge = QFormerBridge(block, **bridge_args)
            self.query_frame_positions = (
                nn.Parameter(torch.randn(num_frames, 1, self.settings.hidden_size) * POSITION_INIT_STD)
                if frame_positions else None)
        self.image_weights = adapter_tensors(init_from_image, "image", "bridge.") if init_from_image else None
        self.freeze_qformer = freeze_qformer
        if freeze_qformer:
            freeze(self.bridge.qformer)
        tag = json.dumps(["video-v1", FEATURES_VERSION, encoder_identity(encoder), feature_layer, self.processor.to_dict(), num_frames,
                          sampling, fps, short_side, frame_tokens], sort_keys=True, default=str)
        self.cache = FeatureCache(feature_cache, tag) if feature_cache else None

    @property
    def max_tokens(self) -> int:
        per_frame = self.bridge.max_tokens
        return per_frame if self.temporal == "qformer" else per_frame * self.num_frames

    def instruction_tokenizer(self):
        return self.bridge.tokenize_one if self.instruction_aware else None

    def attach(self, llm_hidden_size: int) -> None:
        self.bridge.attach(llm_hidden_size)
        if self.image_weights is not None:
            self._start_from_image(self.image_weights)
            self.image_weights = None

    def _start_from_image(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy an image adapter's bridge tensors into this bridge: every tensor the two share, shapes checked."""
        own, taken = self.bridge.state_dict(), tensors
        wrong = [f"{k}: image {tuple(v.shape)} vs video {tuple(own[k].shape)}" for k, v in taken.items()
                 if k in own and own[k].shape != v.shape]
        if wrong:
            raise ValueError("init_from_image: the image bridge has other shapes: " + "; ".join(wrong))
        unknown = sorted(set(taken) - set(own))
        if unknown:
            raise ValueError(f"init_from_image: tensors this video bridge lacks: {unknown}")
        self.bridge.load_state_dict(taken, strict=False)

    def needed_extras(self) -> set[str]:
        return {"vision"} if self.encoder.is_cnn else set()

    def frozen_modules(self) -> list[nn.Module]:
        frozen = [self.encoder, *self.bridge.frozen_modules()]
        return frozen + [self.bridge.qformer] if self.freeze_qformer else frozen

    def idle_modules(self) -> list[nn.Module]:
        return self.bridge.qformer.text_only_modules(self.instruction_aware)

    def reload_config(self, directory: Path) -> dict[str, Any]:
        config = super().reload_config(directory)
        args = config["init_args"]
        if not self.freeze_qformer:
            # The adapter's own weights replace the start. A frozen Q-Former is not in the adapter (frozen parts
            # never are), so it keeps coming from the image adapter, as the frozen LLM comes from its path.
            args["init_from_image"] = None
        args["qformer"] = asdict(self.settings)
        write_text_side(self.bridge, directory / f"{self.modality}_qformer_text", args["qformer"])
        return config

    # --- media ---------------------------------------------------------------------------------------
    def decoder(self) -> VideoLoader:
        return VideoLoader(self.processor, self.num_frames, self.sampling, self.fps, self.short_side)

    @torch.no_grad()
    def encode_decoded(self, items: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        device = next(self.encoder.parameters()).device
        # One clip per encoder call: a CNN on 2 CPU cores ran 2x slower per frame at 64 frames a batch than at 8.
        return [self.frame_features(item["pixel_values"].to(device)) for item in items]

    def frame_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """`[frames, 3, H, W]` -> `[frames, tokens, dim]`: the frozen encoder per frame, pooled to `frame_tokens`."""
        features = self.encoder(pixels)
        if self.frame_tokens is None:
            return features
        tokens = features.shape[1]
        if int(round(tokens ** 0.5)) ** 2 != tokens:
            features, tokens = features[:, 1:], tokens - 1  # a ViT's CLS token: pool the patch grid only
        side, out = square_side(tokens, "the encoder's feature map"), square_side(self.frame_tokens, "frame_tokens")
        grid = features.transpose(1, 2).reshape(len(features), -1, side, side)
        return F.adaptive_avg_pool2d(grid.float(), out).flatten(2).transpose(1, 2).to(features.dtype)

    # --- compute -------------------------------------------------------------------------------------
    def clip_features(self, media: MediaBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """`[n, frames, tokens, dim]` frozen features (cached, or the encoder on the frames) and the frame mask
        `[n, frames]` (True for real frames; padded ones are False)."""
        if FEATURES in media.values:
            features = media.values[FEATURES]
        else:
            pixels = media.values["pixel_values"]
            n, frames = pixels.shape[:2]
            features = self.frame_features(pixels.flatten(0, 1)).unflatten(0, (n, frames))
        n, frames = features.shape[:2]
        lengths = media.lengths if media.lengths is not None else torch.full((n,), frames)
        mask = torch.arange(frames, device=features.device)[None] < lengths.to(features.device)[:, None]
        return features, mask

    def bridge_inputs(self, media: MediaBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For the `qformer` design (and stage 0): clip features and the mask over all frames' tokens."""
        if self.temporal != "qformer":
            raise ValueError("stage 0 pretrains the all-frames Q-Former (temporal: qformer); for concat, start "
                             "the frame Q-Former from an image interface (init_from_image)")
        features, frame_mask = self.clip_features(media)
        return features, frame_mask.repeat_interleave(features.shape[2], dim=1).long()

    def forward(self, media: MediaBatch) -> ModalityTokens:
        if self.instruction_aware and media.instruction_ids is None:
            raise ValueError("this video interface is instruction-aware: its batch needs instruction_ids (build "
                             "batches with the model's processor and collator, or call model.chat)")
        ids = media.instruction_ids if self.instruction_aware else None
        ids_mask = media.instruction_mask if self.instruction_aware else None
        if self.temporal == "qformer":
            features, token_mask = self.bridge_inputs(media)
            return ModalityTokens(*self.bridge.tokens(features, token_mask, ids, ids_mask))
        return self._concat(media, ids, ids_mask)

    def _concat(self, media: MediaBatch, ids: torch.Tensor | None, ids_mask: torch.Tensor | None) -> ModalityTokens:
        """X-LLM's design: each real frame through the Q-Former alone, + its frame position, tokens concatenated."""
        if self.bridge.projection is None:
            raise RuntimeError("attach(llm_hidden_size) must be called before forward (XLLM does it)")
        features, frame_mask = self.clip_features(media)
        n, frames, tokens, dim = features.shape
        real = frame_mask.flatten()  # padded frames are never computed
        rows = torch.arange(n, device=features.device).repeat_interleave(frames)[real]
        per_frame = self.bridge.features(features.reshape(n * frames, tokens, dim)[real])
        queries = self.bridge.qformer(per_frame, None, None if ids is None else ids[rows],
                                      None if ids_mask is None else ids_mask[rows])
        if self.query_frame_positions is not None:
            frame_index = torch.arange(frames, device=features.device).repeat(n)[real]
            queries = queries + self.query_frame_positions[frame_index]
        projected = self.bridge.projection(queries)  # [real frames, queries, llm]
        per_query = projected.shape[1]
        out = projected.new_zeros((n, frames * per_query, projected.shape[-1]))
        counts = frame_mask.sum(1)
        start = 0
        for row, count in enumerate(counts.tolist()):
            out[row, : count * per_query] = projected[start:start + count].flatten(0, 1)
            start += count
        return ModalityTokens(out, counts * per_query)
