"""The GPU recipe (`configs/gpu_7b/`, docs/gpu_recipe.md) dry-run on tiny models, so its YAML stays valid: every
class path and argument of its files runs through `train.py`, with only the machine's values swapped (model and
data paths, shapes, devices, dtypes). BLIP-2's Q-Former is imported with `xllm-import-qformer` from a tiny
transformers BLIP-2 whose vision tower is the encoder, as the recipe does with the real one; stage 1 then runs under
DDP and sharded on 2 CPU processes, and stage 2 (LoRA) sharded from stage 1's adapter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file
from transformers import AutoImageProcessor, Blip2Model

from tests.test_streaming import split_into_shards
from tests.test_weight_import import tiny_blip2

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "gpu_7b"
TINY_QFORMER = {"num_query_tokens": 4, "hidden_size": 32, "layers": 2, "heads": 2, "intermediate_size": 64,
                "cross_attention_frequency": 2}


def swapped(value: Any, paths: dict[str, str]) -> Any:
    """`value` with each recipe placeholder path (`/models/...`, `/data/...`, `runs/...`) replaced by its tiny
    stand-in; a placeholder the test does not know fails, so a new path in the recipe gets a stand-in here."""
    if isinstance(value, dict):
        return {k: swapped(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [swapped(v, paths) for v in value]
    if isinstance(value, str) and value.startswith(("/models/", "/data/", "runs/")):
        for placeholder, stand_in in paths.items():
            if value.startswith(placeholder):
                return stand_in + value[len(placeholder):]
        raise AssertionError(f"the recipe has a path this dry run has no stand-in for: {value}")
    return value


def tiny_recipe(stage: str, paths: dict[str, str], out: Path) -> list[str]:
    """The recipe's common + stage files as tiny configs on 2 CPU processes; `--config` arguments for train.py."""
    args = []
    for name in ("common", stage):
        config = swapped(yaml.safe_load((RECIPE / f"{name}.yaml").read_text()), paths)
        trainer, init = config.get("trainer", {}), config.get("model", {}).get("init_args", {})
        if name == "common":
            trainer.update(accelerator="cpu", devices=2, precision="32-true", log_every_n_steps=1)
            init.update(llm_dtype="float32")
            image = init["interfaces"]["image"]["init_args"]
            assert set(TINY_QFORMER) <= set(image["qformer"]), "the recipe's Q-Former settings lost a shape key"
            image.update(encoder_dtype="float32", feature_layer=1, qformer={**image["qformer"], **TINY_QFORMER})
            config["data"]["num_workers"] = 1
        else:
            trainer.update(max_steps=2, logger=False)
            init.update(max_length=160)
            config["data"]["batch_size"] = 2
        path = out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        args += ["--config", str(path)]
    return args


def run(*args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_the_gpu_recipe_imports_blip2_and_runs_stage1_ddp_and_stage2_sharded(tiny, tmp_path):
    # The recipe's weights: a BLIP-2 checkpoint, and its vision tower saved alone with an image processor.
    blip2 = tiny_blip2(tmp_path)
    encoder = tmp_path / "models" / "eva-vit-g-blip2"
    Blip2Model.from_pretrained(blip2).vision_model.save_pretrained(encoder)
    AutoImageProcessor.from_pretrained(tiny / "vit").save_pretrained(encoder)
    # The recipe's data, as shards.
    split_into_shards(tiny / "data" / "train_captions.jsonl", tmp_path / "pretrain")
    split_into_shards(tiny / "data" / "train_chat.jsonl", tmp_path / "instruct")
    runs = tmp_path / "runs"
    paths = {"/models/vicuna-7b-v1.5": str(tiny / "llama"), "/models/eva-vit-g-blip2": str(encoder),
             "/data/llava-pretrain/shards": str(tmp_path / "pretrain"), "/data/llava-instruct/shards":
             str(tmp_path / "instruct"), "/data/llava-pretrain/images": str(tiny / "data"),
             "/data/coco/train2017": str(tiny / "data"), "runs/": str(runs) + "/"}

    printed = run("-m", "xllm.adapters.weight_import", str(blip2), str(encoder), str(runs / "blip2_qformer"),
                  "--qformer", yaml.safe_dump(TINY_QFORMER, default_flow_style=True), "--feature_layer", "1",
                  cwd=tmp_path)
    assert "blip2: " in printed and "0 trainable tensors missing" in printed, printed
    imported = load_file(str(runs / "blip2_qformer" / "adapter.safetensors"))

    train = str(ROOT / "train.py")
    (tmp_path / "ddp").mkdir()
    printed = run(train, "fit", *tiny_recipe("stage1", paths, tmp_path / "ddp"), cwd=tmp_path)
    assert "read as a stream" in printed and "max_steps=2` reached" in printed
    stage1 = load_file(str(runs / "gpu_7b_stage1" / "adapter" / "adapter.safetensors"))
    assert any(k.startswith("interfaces.image.bridge.projection") for k in stage1)
    assert set(imported) <= set(stage1)  # every imported tensor trained on, under its name

    # Stage 2 (LoRA, from stage 1's adapter) merged with the sharding preset; stage 1 sharded is the same composition
    # without LoRA (tests/test_sharding.py shards both kinds of run), so it is not run again here.
    sharded = ["--config", str(ROOT / "configs" / "sharding" / "fsdp2.yaml")]
    (tmp_path / "sharded").mkdir()
    run(train, "fit", *tiny_recipe("stage2", paths, tmp_path / "sharded"), *sharded, cwd=tmp_path)
    stage2 = load_file(str(runs / "gpu_7b_stage2" / "adapter" / "adapter.safetensors"))
    assert any("lora_" in k for k in stage2) and any(k.startswith("interfaces.image.") for k in stage2)
    assert len(list((runs / "gpu_7b_stage2").rglob("*.ckpt"))) == 0  # no checkpoint in 2 steps (every 500)
