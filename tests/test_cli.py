"""The shipped tiny configs through LightningCLI, then evaluate.py on the stage-2 adapter."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def localized_config(name: str, tiny: Path, runs: Path, tmp_path: Path) -> Path:
    """The repo's config with `.cache/tiny` and `runs/` pointed at this test's folders."""
    text = (ROOT / "configs" / name).read_text()
    text = text.replace(".cache/tiny", str(tiny)).replace("runs/", f"{runs}/")
    path = tmp_path / name
    path.write_text(text)
    return path


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_print_config_lists_the_typed_options(tiny, tmp_path):
    config = localized_config("tiny_stage1.yaml", tiny, tmp_path / "runs", tmp_path)
    out = run(str(ROOT / "train.py"), "fit", "--config", str(config), "--print_config", cwd=tmp_path).stdout
    assert "qformer_layers: 2" in out and "stage: 1" in out and "on_bad_sample: error" in out


@pytest.mark.slow
def test_stage0_then_stage1_then_stage2_then_evaluate(tiny, tmp_path):
    runs = tmp_path / "runs"
    stage0 = localized_config("tiny_stage0.yaml", tiny, runs, tmp_path)
    out0 = run(str(ROOT / "train.py"), "fit", "--config", str(stage0), cwd=tmp_path)
    assert "xllm stage 0" in out0.stdout
    stage0_keys = set(load_file(str(runs / "tiny_stage0" / "adapter" / "adapter.safetensors")))
    stage1 = localized_config("tiny_stage1.yaml", tiny, runs, tmp_path)
    stage2 = localized_config("tiny_stage2.yaml", tiny, runs, tmp_path)
    out1 = run(str(ROOT / "train.py"), "fit", "--config", str(stage1), cwd=tmp_path)
    assert "trainable parameters" in out1.stdout and "frozen" in out1.stdout
    run(str(ROOT / "train.py"), "fit", "--config", str(stage2), cwd=tmp_path)

    for stage in ("tiny_stage1", "tiny_stage2"):
        adapter = runs / stage / "adapter"
        keys = set(load_file(str(adapter / "adapter.safetensors")))
        assert stage0_keys < keys, stage  # everything stage 0 trained, plus the adapter (and LoRA)
        # Only interface tensors and (stage 2) LoRA matrices: nothing of the frozen LLM or encoder.
        assert all(k.startswith("interfaces.image.") or "lora_" in k for k in keys), stage
        assert not any(".encoder.model." in k for k in keys)
        assert any("lora_" in k for k in keys) == (stage == "tiny_stage2")
        config = json.loads((adapter / "config.json").read_text())
        assert config["interfaces"]["image"]["init_args"]["num_query_tokens"] == 4
    assert list((runs / "tiny_stage1").rglob("offline-run-*")), "W&B offline run folder missing"

    output = tmp_path / "eval.json"
    run(str(ROOT / "evaluate.py"), "--adapter", str(runs / "tiny_stage2" / "adapter"),
        "--data", str(tiny / "data" / "test_yesno.jsonl"), "--output", str(output), "--limit", "6", cwd=tmp_path)
    result = json.loads(output.read_text())
    assert result["metrics"]["samples"] == 6 and result["metrics"]["yes_no_samples"] == 6
    assert result["metrics"]["perplexity"] > 1
    assert {"id", "reference", "prediction"} <= set(result["samples"][0])
