"""A new modality is one file: a toy depth-map interface (`tests/toy_modality/xllm_depth.py`) and its config are
installed as a user's package would be — a module plus a `.dist-info` declaring the `xllm.interfaces` entry point —
then trained at stage 2 on the tiny LLM, reloaded in a fresh process, chatted with and served, with no change to
xllm itself."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.test_serve import free_port

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "tests" / "toy_modality"
QUESTION = "Is the near side on the left?"


def install_package(site: Path) -> None:
    """What `pip install` of a package declaring `depth = "xllm_depth:DepthInterface"` leaves on disk."""
    site.mkdir()
    shutil.copy(TOY / "xllm_depth.py", site / "xllm_depth.py")
    info = site / "xllm_depth-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: xllm-depth\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[xllm.interfaces]\ndepth = xllm_depth:DepthInterface\n")


def depth_data(folder: Path, n: int = 16) -> None:
    """Maps whose near half is on the left or the right, asked about with Yes/No answers."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    with (folder / "train.jsonl").open("w") as f:
        for i in range(n):
            left = i % 2 == 0
            depth = rng.uniform(0.8, 1.0, (8, 8)).astype(np.float32)
            near = slice(0, 4) if left else slice(4, 8)
            depth[:, near] *= 0.1
            np.save(folder / f"d{i}.npy", depth)
            f.write(json.dumps({"id": str(i), "depth": f"d{i}.npy", "conversations": [
                {"from": "human", "value": f"<depth>\n{QUESTION}"},
                {"from": "gpt", "value": "Yes" if left else "No"}]}) + "\n")


def with_package(site: Path) -> dict[str, str]:
    """The environment of a process that has the package installed in `site` (and this checkout's xllm)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


def python(code: str, cwd: Path, site: Path) -> subprocess.CompletedProcess:
    env = with_package(site)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_a_modality_from_an_installed_package_trains_reloads_chats_and_is_served(tiny, tmp_path):
    site = tmp_path / "site"
    install_package(site)
    shutil.copytree(tiny, tmp_path / "tiny")
    depth_data(tmp_path / "depth")
    env = with_package(site)

    trained = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config", str(TOY / "depth_stage2.yaml")],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    adapter = tmp_path / "runs" / "depth" / "adapter"
    config = json.loads((adapter / "config.json").read_text())
    assert config["interfaces"]["depth"]["class_path"] == "xllm_depth.DepthInterface"
    assert "<depth>" in (adapter / "README.md").read_text()  # the card's example uses the adapter's own modality

    # A fresh process finds the class through the entry point; nothing is passed.
    chat = f"""
from xllm import XLLM
model = XLLM.from_pretrained({str(adapter)!r})
print(repr(model.chat([{{"from": "user", "value": "<depth>\\n{QUESTION}"}}], {{"depth": "depth/d0.npy"}},
                      max_new_tokens=4)))
"""
    answered = python(chat, tmp_path, site)
    assert answered.returncode == 0, answered.stderr[-3000:]
    answer = eval(answered.stdout.strip().splitlines()[-1])
    assert isinstance(answer, str)

    # Without the package's entry point the same adapter is refused, and nothing is imported.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(TOY / "xllm_depth.py", bare / "xllm_depth.py")
    refused = python(chat, tmp_path, bare)
    assert refused.returncode != 0 and "nothing was imported" in refused.stderr

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "xllm.apps.cli", "serve", "--adapter", str(adapter), "--port",
                               str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for _ in range(600):
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except httpx.TransportError:
                assert server.poll() is None, server.stdout.read().decode()[-3000:]
                time.sleep(0.1)
        data = base64.b64encode((tmp_path / "depth" / "d0.npy").read_bytes()).decode()
        part = {"type": "depth_url", "depth_url": {"url": f"data:depth/npy;base64,{data}"}}
        body = {"model": "adapter", "max_tokens": 4,
                "messages": [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}]}
        served = httpx.post(url, json=body, timeout=120)
        assert served.status_code == 200, served.text
        assert served.json()["choices"][0]["message"]["content"] == answer.strip()
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        wrong = httpx.post(url, json={**body, "messages": [{"role": "user", "content": [image]}]}, timeout=60)
        assert wrong.status_code == 400 and "depth_url" in wrong.json()["error"]["message"]
    finally:
        server.terminate()
        server.wait(timeout=30)
