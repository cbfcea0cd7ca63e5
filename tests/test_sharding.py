"""Sharded training (FSDP2 through `xllm.training.sharding.ShardedStrategy`) on 2 CPU processes over gloo: stage 0
and stage 2 with LoRA give a one-process run's losses and adapter on the same global batch, each rank holds half the frozen LLM
and gradients for half the trained parameters only, and a run killed with SIGKILL resumes on its loss curve from a
checkpoint that holds no frozen tensor. Sharded, the LLM is built on the meta device and each rank reads only its
rows (`meta_llm`, tests/test_meta_loading.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.test_resume import losses

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "sharding" / "fsdp2.yaml"  # what a user merges in: `--config configs/sharding/fsdp2.yaml`


def config(tiny: Path, out: Path, devices: int, batch_size: int, steps: int = 3, checkpoints: bool = False,
           stage: int = 2, itc_weight: float = 1.0, activation_checkpointing: bool = False) -> Path:
    """Stage 2 with LoRA on the tiny Llama (or stage 0: ITC + ITG, no LLM), no dropout (ranks draw other random
    numbers), one data source (the mix's order depends on the seed only, so 2 ranks × 2 rows see the rows one process
    sees in a batch of 4)."""
    trainer = {"accelerator": "cpu", "max_steps": steps, "log_every_n_steps": 1, "num_sanity_val_steps": 0,
               "enable_checkpointing": checkpoints, "logger": {
                   "class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": str(out), "name": "csv"}},
               "callbacks": [{"class_path": "xllm.training.memory.RankMemory",
                              "init_args": {"folder": str(out / "memory")}}]}
    if checkpoints:
        trainer["callbacks"].append({"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {
            "dirpath": str(out / "checkpoints"), "every_n_train_steps": 1, "save_top_k": -1}})
    trainer["devices"] = devices
    qformer = {"num_query_tokens": 4, "hidden_size": 32, "layers": 2, "heads": 2, "intermediate_size": 64,
               "bert_init": str(tiny / "bert"), "text": True, "instruction_aware": True, "dropout": 0.0}
    path = out / "config.yaml"
    out.mkdir(parents=True, exist_ok=True)
    image = {"class_path": "xllm.interfaces.ImageInterface",
             "init_args": {"encoder": str(tiny / "vit"), "qformer": qformer}}
    if stage == 0:  # ITM's hard negatives are drawn per rank from its own rows: another draw than one process's
        model = {"class_path": "xllm.training.InterfacePretrainingModule", "init_args": {
            "lr": 1.0e-3, "warmup_steps": 0, "lr_schedule": "constant", "adapter_dir": str(out / "adapter"),
            "interfaces": {"image": image}, "objective": {"class_path": "xllm.objectives.QFormerObjective",
                                                           "init_args": {"itm_weight": 0.0, "itc_weight": itc_weight, "embed_dim": 16}}}}
    path.write_text(yaml.safe_dump({
        "seed_everything": 0, "trainer": trainer,
        "model": model if stage == 0 else {"class_path": "xllm.training.XLLMModule", "init_args": {
            "llm": str(tiny / "llama"), "template": "vicuna_v1", "stage": 2, "lr": 1.0e-3, "warmup_steps": 0,
            "lr_schedule": "constant", "max_length": 160, "adapter_dir": str(out / "adapter"),
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "activation_checkpointing": activation_checkpointing, "interfaces": {"image": image}}},
        "data": {"train_sources": [{"file": str(tiny / "data" / "train_yesno.jsonl")}], "batch_size": batch_size}}))
    return path


def command(path: Path, *extra: str) -> list[str]:
    """`train.py fit` with the config, sharded (the preset) when it asks for 2 devices."""
    sharded = yaml.safe_load(path.read_text())["trainer"]["devices"] > 1
    return [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(path),
            *(["--config", str(PRESET)] if sharded else []), *extra]


def fit(path: Path, cwd: Path, *extra: str) -> None:
    result = subprocess.run(command(path, *extra), cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def trains_as_one_process(tiny: Path, out: Path, sharded: dict | None = None, **settings) -> tuple[Path, Path]:
    """Runs a config in one process (batch 4) and on 2 sharded ranks (2 each, with `sharded`'s settings too); checks
    that the losses are equal."""
    one, two = out / "one", out / "two"
    fit(config(tiny, one, devices=1, batch_size=4, **settings), out)
    fit(config(tiny, two, devices=2, batch_size=2, **settings, **(sharded or {})), out)
    expected, sharded = losses(one), losses(two)
    assert sorted(sharded) == [0, 1, 2]
    assert all(abs(sharded[step] - expected[step]) < 1e-5 for step in expected), (expected, sharded)
    return one, two


def trains_as_one_process_and_each_rank_holds_half(tiny: Path, tmp_path: Path, **settings) -> dict:
    """`trains_as_one_process`, then: the same adapter, and each rank holds half."""
    one, two = trains_as_one_process(tiny, tmp_path, **settings)
    whole, halves = load_file(str(one / "adapter" / "adapter.safetensors")), \
        load_file(str(two / "adapter" / "adapter.safetensors"))
    assert set(halves) == set(whole)
    assert all((halves[k] - whole[k]).abs().max() < 1e-5 for k in whole)
    assert sorted(p.name for p in (two / "adapter").iterdir()) == sorted(p.name for p in (one / "adapter").iterdir())

    single = json.loads((one / "memory" / "rank0.json").read_text())
    for rank in (0, 1):
        mine = json.loads((two / "memory" / f"rank{rank}.json").read_text())
        assert 0.45 < mine["frozen_param_bytes"] / single["frozen_param_bytes"] < 0.55
        assert 0.45 < mine["trained_elements"] / single["trained_elements"] < 0.55
        assert mine["grad_elements"] <= mine["trained_elements"]  # gradients for trained parameters only
        assert mine["grad_elements"] > 0.4 * single["trained_elements"]
    return whole


@pytest.mark.slow
def test_sharded_stage2_with_lora_trains_as_one_process_and_each_rank_holds_half(tiny, tmp_path):
    """Sharded: the LLM built on the meta device and read shard by shard; the one process loads it whole. (With
    activation checkpointing too this run took 173 s instead of 49 here, over make test's budget: checkpointing's
    losses and gradients are checked in one process, tests/test_checkpointing.py.)"""
    adapter = trains_as_one_process_and_each_rank_holds_half(tiny, tmp_path, stage=2)
    assert any("lora_" in k for k in adapter)
    hparams = [yaml.safe_load(p.read_text()) for p in (tmp_path / "two" / "csv").glob("version_*/hparams.yaml")]
    assert hparams and all(h["meta_llm"] is True for h in hparams)
    # No rank read the whole LLM: each read about half of its bytes from the safetensors (the rest of the frozen
    # bytes are the encoder's, loaded whole and then sharded).
    llm_bytes = sum(f.stat().st_size for f in (tiny / "llama").glob("*.safetensors"))
    for rank in (0, 1):
        read = json.loads((tmp_path / "two" / "memory" / f"rank{rank}.json").read_text())["llm_bytes_read"]
        assert 0.4 < read / llm_bytes < 0.55, (read, llm_bytes)


@pytest.mark.slow
def test_sharded_stage0_trains_as_one_process_and_each_rank_holds_half(tiny, tmp_path):
    """No LLM here: half of the frozen ViT per rank (its blocks are units), half of the Q-Former and heads. ITG per
    token of the global batch gives one process's losses and adapter. ITG alone: on the tiny models ITC sits at ln 4
    with gradients near 1e-9, where Adam's m/sqrt(v) turns float rounding into steps of ±lr (2% of the elements
    1e-4-1e-3 apart after 3 steps; equal to 1e-7 without ITC); ITC's gather across ranks is checked against one
    process in tests/test_distributed.py (the same code under DDP and FSDP2)."""
    adapter = trains_as_one_process_and_each_rank_holds_half(tiny, tmp_path / "itg", stage=0, itc_weight=0.0)
    assert any(k.startswith("image.bridge.qformer") or ".qformer." in k for k in adapter), sorted(adapter)[:5]


@pytest.mark.slow
def test_a_sharded_run_killed_with_sigkill_resumes_on_its_loss_curve(tiny, tmp_path):
    import torch
    from torch.distributed.checkpoint import FileSystemReader

    steps = 8
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    fit(config(tiny, whole, devices=2, batch_size=2, steps=steps), tmp_path)
    path = config(tiny, killed, devices=2, batch_size=2, steps=steps, checkpoints=True)
    run = subprocess.Popen(command(path), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)

    def written() -> list[Path]:  # checkpoint folders whose metadata (written last) is there, by step
        return sorted((p for p in (killed / "checkpoints").glob("*step=*") if (p / "meta.pt").exists()),
                      key=lambda p: int(p.name.split("step=")[1].split(".")[0]))

    deadline = time.monotonic() + 300
    while len(written()) < 3 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGKILL)  # the launcher and both rank processes
    run.wait()
    # The newest folder may have been cut mid-write: resume from the one before it, which the next one followed.
    saved = written()[-2]
    step = torch.load(saved / "meta.pt", weights_only=True)["global_step"]
    assert 2 <= step < steps - 1, f"resuming from step {step}: the test needs a kill well inside the run"
    keys = " ".join(FileSystemReader(str(saved)).read_metadata().state_dict_metadata)
    assert "lora_" in keys and "interfaces.image" in keys and "optimizer_0" in keys
    assert "embed_tokens" not in keys and "base_layer" not in keys and "encoder.model" not in keys  # nothing frozen
    fit(path, tmp_path, "--ckpt_path", str(saved))
    expected, resumed = losses(whole), losses(killed)
    assert set(range(step, steps)) <= set(resumed)
    for index in range(step, steps):
        assert resumed[index] == pytest.approx(expected[index], abs=1e-5), (index, resumed, expected)
