"""The shipped tiny configs through LightningCLI (common + stage files merged), then evaluate.py on the stage-2
adapter, then the README's library example, run as written.

The stages run `train.py`'s own `main` in this process (the same parser and code as the command; a Python start
with Lightning costs ~10 s here, and test_resume/test_distributed run `train.py` as a command); evaluate.py and the
README example run as commands."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def localized_configs(tiny: Path, runs: Path, tmp_path: Path) -> Path:
    """The repo's tiny configs with `.cache/tiny` and `runs/` pointed at this test's folders."""
    folder = tmp_path / "configs"
    folder.mkdir(exist_ok=True)
    for source in (ROOT / "configs" / "tiny").glob("*.yaml"):
        text = source.read_text().replace(".cache/tiny", str(tiny)).replace("runs/", f"{runs}/")
        (folder / source.name).write_text(text)
    return folder


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def fit_command(configs: Path, stage: int, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python train.py fit --config common.yaml --config stageN.yaml ...` as a command, in `cwd`."""
    return run(str(ROOT / "train.py"), "fit", "--config", str(configs / "common.yaml"),
               "--config", str(configs / f"stage{stage}.yaml"), *extra, cwd=cwd)


def fit(configs: Path, stage: int, capsys, *extra: str) -> str:
    """`python train.py fit --config common.yaml --config stageN.yaml ...`, in this process; returns its stdout."""
    import wandb

    from xllm.training.cli import main

    capsys.readouterr()
    main(["fit", "--config", str(configs / "common.yaml"), "--config", str(configs / f"stage{stage}.yaml"), *extra])
    if wandb.run is not None:  # a command's W&B run ends with its process
        wandb.finish()
    return capsys.readouterr().out


def test_print_config_lists_the_typed_options(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configs = localized_configs(tiny, tmp_path / "runs", tmp_path)
    with pytest.raises(SystemExit) as printed:
        fit(configs, 1, capsys, "--print_config")
    assert printed.value.code in (0, None)
    out = capsys.readouterr().out
    # The stage file chose the module; the common file's interface merged into it.
    assert "class_path: xllm.training.XLLMModule" in out
    assert "layers: 2" in out and "stage: 1" in out and "on_bad_sample: error" in out


def readme_library_example() -> str:
    """The README's Python block that loads an adapter (a user copies exactly this)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    (example,) = [b for b in blocks if 'from_pretrained("runs/tiny_stage2/adapter")' in b]
    return example


@pytest.mark.slow
def test_stage0_then_stage1_then_stage2_then_evaluate_then_the_readme_example(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    configs = localized_configs(tiny, runs, tmp_path)
    assert "xllm stage 0" in fit(configs, 0, capsys)
    stage0_keys = set(load_file(str(runs / "tiny_stage0" / "adapter" / "adapter.safetensors")))
    out1 = fit(configs, 1, capsys)
    assert "trainable parameters" in out1 and "frozen" in out1
    fit(configs, 2, capsys)

    for stage in ("tiny_stage1", "tiny_stage2"):
        adapter = runs / stage / "adapter"
        keys = set(load_file(str(adapter / "adapter.safetensors")))
        # Everything stage 0 trained that the way to the LLM runs, plus the projection (and LoRA): not the last
        # Q-Former layer's text FFN, which only stage 0's ITC/ITG read (instruction-aware queries skip it).
        text_only = {k for k in stage0_keys if re.search(r"\.layer\.1\.(intermediate|output)\.", k)}
        assert len(text_only) == 6 and stage0_keys - text_only < keys and not keys & text_only, stage
        # Only interface tensors and (stage 2) LoRA matrices: nothing of the frozen LLM or encoder.
        assert all(k.startswith("interfaces.image.") or "lora_" in k for k in keys), stage
        assert not any(".encoder.model." in k for k in keys)
        assert any("lora_" in k for k in keys) == (stage == "tiny_stage2")
        config = json.loads((adapter / "config.json").read_text())
        assert config["interfaces"]["image"]["init_args"]["qformer"]["num_query_tokens"] == 4
        assert "train_" in config["trained_on"] and "optimizer steps" in (adapter / "README.md").read_text()
    assert list((runs / "tiny_stage1").rglob("offline-run-*")), "W&B offline run folder missing"

    # evaluate.py picks the metric from the data: MME's scoring for yes/no questions, text metrics for captions
    # (the first as the command, the second through the function the command calls).
    from xllm.evaluation.run import evaluate

    for data, metric in (("test_yesno.jsonl", "yes_no"), ("test_captions.jsonl", "text")):
        output = tmp_path / f"eval_{metric}.json"
        adapter, path = str(runs / "tiny_stage2" / "adapter"), str(tiny / "data" / data)
        if metric == "yes_no":
            run(str(ROOT / "evaluate.py"), "--adapter", adapter, "--data", path, "--output", str(output),
                "--limit", "6", cwd=tmp_path)
        else:
            evaluate(adapter=adapter, data=path, output=str(output), limit=6)
        result = json.loads(output.read_text())
        assert result["metric"] == metric and len(result["samples"]) == 6
        assert {"id", "reference", "prediction"} <= set(result["samples"][0])
        if metric == "yes_no":
            assert result["metrics"]["all"]["questions"] == 6 and "score" in result["metrics"]["all"]
        else:
            assert result["metrics"]["samples"] == 6 and result["metrics"]["perplexity"] > 1

    # The README's example, verbatim, from a folder holding `runs/tiny_stage2/adapter` (instruction-aware) and
    # a photo. It prints the model's answer.
    Image.open(tiny / "data" / "images" / "test_00000.png").convert("RGB").save(tmp_path / "photo.jpg")
    script = tmp_path / "readme_example.py"
    script.write_text(readme_library_example())
    printed = run(str(script), cwd=tmp_path).stdout
    assert printed.endswith("\n"), "the README example printed no answer"
