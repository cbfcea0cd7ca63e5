"""Frozen vision encoders, loaded by local path (or hub id when the hub is reachable) through transformers.

Any transformers vision model works: a vision tower checkpoint (ViT, CLIPVisionModel, SiglipVisionModel,
Blip2VisionModel, DINOv2...) or a dual/multimodal checkpoint whose model has a `vision_model` (CLIP,
SigLIP), from which only the vision tower is kept. A torchvision CNN works too, from a directory holding
`xllm_encoder.json` (`{"library": "torchvision", "architecture": "mobilenet_v2", "module": "features",
"hidden_size": 1280}`), its weights as `model.safetensors` and an image-processor config (see
`xllm.demo.materialize`); its `C×H×W` feature map becomes `H·W` tokens of width `C`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from transformers import AutoConfig, AutoModel

from xllm.extras import import_optional
from xllm.frozen import check_model_path, freeze, resolve_dtype

TORCHVISION_CONFIG = "xllm_encoder.json"
# Part of every feature-cache tag: bump it when a change alters what FrozenVisionEncoder outputs for the same
# files. 2: a torchvision CNN cut at feature_layer keeps its pretrained BatchNorm statistics (1 had them moved).
FEATURES_VERSION = 2


class FrozenVisionEncoder(nn.Module):
    """A frozen transformers vision model; `forward(pixel_values) -> [batch, tokens, hidden]` features."""

    def __init__(self, path: str, feature_layer: int = -1, dtype: str = "float32") -> None:
        super().__init__()
        check_model_path(path, "vision encoder")
        self.feature_layer = feature_layer
        self.is_cnn = (Path(path) / TORCHVISION_CONFIG).is_file()
        if self.is_cnn:
            self.model, self.hidden_size = _load_torchvision(Path(path), resolve_dtype(dtype), feature_layer)
            # NHWC convolutions: MobileNetV2 at 160 px, 64 frames a batch, 2 CPU threads: 14.5 ms a frame instead of
            # 20.6 (the video demo's feature caching is its largest fixed cost); the features are the same.
            freeze(self.model).to(memory_format=torch.channels_last)
            return
        config = AutoConfig.from_pretrained(path)
        model = load_vision_model(path, config, resolve_dtype(dtype))
        if hasattr(config, "vision_config") and hasattr(model, "vision_model"):
            model = model.vision_model  # keep only the vision tower of a dual model
        self.model = freeze(model)
        vision_config = getattr(config, "vision_config", config)
        self.hidden_size: int = vision_config.hidden_size

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(next(self.model.parameters()).dtype)
        if self.is_cnn:
            features = self.model(pixel_values.contiguous(memory_format=torch.channels_last))
            return features.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C]
        if self.feature_layer == -1:
            return self.model(pixel_values=pixel_values).last_hidden_state
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[self.feature_layer]


def load_vision_model(path: str, config: Any, dtype: torch.dtype) -> nn.Module:
    """`AutoModel`'s model for `path`; for a vision tower saved alone whose config `AutoModel` maps to no class
    (BLIP-2's EVA-ViT-g as `Blip2VisionModel`), the transformers class its config names in `architectures`."""
    import transformers

    try:
        return AutoModel.from_pretrained(path, dtype=dtype)
    except ValueError:
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else None
        if model_class is None or not names[0].endswith("VisionModel"):
            raise
        return model_class.from_pretrained(path, dtype=dtype)


def _load_torchvision(path: Path, dtype: torch.dtype, feature_layer: int = -1) -> tuple[nn.Module, int]:
    """Build a torchvision architecture by name and load its safetensors weights (no pickle, no download).

    `feature_layer=k > 0` keeps the first k blocks of the feature module (an earlier, finer feature map)."""
    from safetensors.torch import load_file

    torchvision = import_optional("torchvision", "vision", f"the image encoder at {path} (a torchvision model)")
    spec = json.loads((path / TORCHVISION_CONFIG).read_text())
    if spec.get("library") != "torchvision":
        raise ValueError(f"{path / TORCHVISION_CONFIG}: only library 'torchvision' is supported")
    builder = getattr(torchvision.models, spec["architecture"], None)
    if builder is None:
        raise ValueError(f"{path / TORCHVISION_CONFIG}: torchvision has no model {spec['architecture']!r}")
    model = builder(weights=None)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    module = getattr(model, spec.get("module", "features"))
    if feature_layer == -1:
        return module.to(dtype), int(spec["hidden_size"])
    if not isinstance(module, nn.Sequential) or not 0 < feature_layer <= len(module):
        raise ValueError(f"feature_layer={feature_layer}: keep 1..{len(module)} blocks of {spec['architecture']}")
    # Probed in eval mode: a forward pass in train mode would move every BatchNorm's running statistics toward
    # those of a blank image (10% per layer), and the frozen encoder would no longer be the pretrained one.
    module = module[:feature_layer].eval()
    with torch.no_grad():
        channels = module(torch.zeros(1, 3, 64, 64)).shape[1]
    return module.to(dtype), int(channels)


class ImageLoader:
    """Decodes one image file and applies the encoder's image processor (small, so workers get a cheap copy)."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, path: str) -> dict[str, torch.Tensor]:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except FileNotFoundError:
            raise
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise ValueError(f"cannot decode image {path}: {err}") from err
        return {"pixel_values": self.processor(images=image, return_tensors="pt")["pixel_values"][0]}
