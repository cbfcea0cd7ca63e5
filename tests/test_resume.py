"""A run killed with SIGKILL mid-epoch resumes from its last checkpoint (`--ckpt_path last`) and follows the
uninterrupted run's loss curve: the checkpoint holds the model, the optimizer and scheduler, and where the
data loader was in its shuffled epoch."""

import csv
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_cli import ROOT, localized_configs

STEPS = 20  # of 32 steps per epoch (256 tiny pairs / 8): the kill and the end both fall mid-epoch
KILL_AFTER = 4  # steps: past the warm-up's first step, whose learning rate is 0


def logged_trainer(out: Path, steps: int, **checkpoint) -> Path:
    """A config for `steps` steps with the loss of every step in a CSV (`out/csv`), a checkpoint after every step
    (`out/checkpoints`; `checkpoint`: ModelCheckpoint's other arguments) and the adapter in `out/adapter`."""
    path = out / "trainer.yaml"
    path.write_text(yaml.safe_dump({
        "trainer": {
            "max_steps": steps, "num_sanity_val_steps": 0, "log_every_n_steps": 1, "enable_checkpointing": True,
            "logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                       "init_args": {"save_dir": str(out), "name": "csv"}},
            "callbacks": [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {
                "dirpath": str(out / "checkpoints"), "every_n_train_steps": 1, **checkpoint}}],
        },
        "model": {"init_args": {"adapter_dir": str(out / "adapter")}},
    }))
    return path


def command(configs: Path, out: Path, *extra: str) -> list[str]:
    """Stage 0 on the tiny models (no LLM: quick), a checkpoint after every step, the loss of every step in a CSV."""
    trainer = logged_trainer(out, STEPS, save_last=True, save_top_k=0)
    return [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(configs / "common.yaml"),
            "--config", str(configs / "stage0.yaml"), "--config", str(trainer), *extra]


def losses(out: Path) -> dict[int, float]:
    """step -> training loss, from every CSV this folder's runs wrote (a resumed run writes a new version)."""
    found = {}
    for path in sorted((out / "csv").glob("version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("train/loss"):
                found[int(row["step"])] = float(row["train/loss"])
    return found


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_on_the_uninterrupted_loss_curve(tiny, tmp_path, monkeypatch):
    configs = localized_configs(tiny, tmp_path / "runs", tmp_path)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for out in (whole, killed):
        out.mkdir()
    from xllm.training.cli import main as train  # the uninterrupted run in this process (a Python start is ~10 s)

    monkeypatch.chdir(tmp_path)
    train(command(configs, whole)[2:])

    run = subprocess.Popen(command(configs, killed), cwd=tmp_path, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.ckpt"

    def written_step() -> int:  # checkpoints are renamed into place whole, so one read mid-run is safe
        return torch.load(last, weights_only=True)["global_step"] if last.exists() else 0

    deadline = time.monotonic() + 300
    while written_step() < KILL_AFTER and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    step = written_step()
    assert KILL_AFTER <= step < STEPS, f"killed at step {step}: the test needs a kill well inside the run"

    subprocess.run(command(configs, killed, "--ckpt_path", "last"), cwd=tmp_path, check=True, capture_output=True,
                   timeout=600)
    expected, resumed = losses(whole), losses(killed)
    assert sorted(expected) == list(range(STEPS)) and set(range(step, STEPS)) <= set(resumed)
    # The steps after the kill are the uninterrupted run's steps: same batches, weights and learning rates.
    for index in range(step, STEPS):
        assert resumed[index] == pytest.approx(expected[index], rel=1e-4), (index, resumed, expected)
