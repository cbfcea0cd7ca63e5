"""The adapter directory as an artifact: it moves, it refuses what it should, and it works from a wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import TINY_QFORMER, make_model
from xllm.adapters.card import write_model_card
from xllm.interfaces import ImageInterface
from xllm.model import XLLM

ROOT = Path(__file__).resolve().parents[1]
QUESTION = [{"from": "user", "value": "<image>\nIs there a red circle?"}]


def logits(model: XLLM, image: Path) -> torch.Tensor:
    batch = model.processor()([QUESTION], [{"image": str(image)}])
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"], batch["media"]).logits


@pytest.fixture
def project(tiny, tmp_path):
    """A project tree: models in `models/`, an instruction-aware adapter in `runs/adapter`, an image."""
    root = tmp_path / "project"
    for name in ("llama", "vit", "bert"):
        shutil.copytree(tiny / name, root / "models" / name)
    shutil.copy(tiny / "data" / "images" / "test_00000.png", root / "photo.png")
    cwd = os.getcwd()
    os.chdir(root)  # paths as a user writes them in a config: relative to the working directory
    try:
        image = ImageInterface("models/vit", qformer=dict(**TINY_QFORMER, dropout=0.0, text=True, instruction_aware=True,
                                                          bert_init="models/bert"))
        model = XLLM.from_paths("models/llama", {"image": image}, template="vicuna_v1")
        model.save_pretrained("runs/adapter", stage=2)
    finally:
        os.chdir(cwd)
    return root, logits(model.eval(), root / "photo.png")


def test_a_moved_project_loads_and_an_adapter_alone_says_which_override_to_pass(project, tmp_path):
    root, expected = project
    config = json.loads((root / "runs/adapter/config.json").read_text())
    assert config["llm"]["path"] == "../../models/llama" and config["llm"]["hidden_size"] == 64
    assert config["interfaces"]["image"]["encoder_hidden_size"] == 32
    assert config["interfaces"]["image"]["init_args"]["encoder"] == "../../models/vit"
    assert set(load_file(str(root / "runs/adapter/adapter.safetensors"))) == set(
        XLLM.from_pretrained(root / "runs/adapter").trainable_state_dict())

    # The whole tree moves (another folder, another machine): paths resolve against the adapter.
    moved = tmp_path / "elsewhere"
    shutil.move(root, moved)
    shutil.rmtree(moved / "models" / "bert")  # the Q-Former's text side lives in the adapter itself
    model = XLLM.from_pretrained(moved / "runs/adapter")
    torch.testing.assert_close(logits(model, moved / "photo.png"), expected, atol=1e-5, rtol=0)

    # The adapter copied on its own: each missing model is named with the override that replaces it.
    alone = shutil.copytree(moved / "runs/adapter", tmp_path / "downloads" / "adapter")
    with pytest.raises(FileNotFoundError, match=r"the LLM was trained against .*models/llama.*pass llm=PATH"):
        XLLM.from_pretrained(alone)
    with pytest.raises(FileNotFoundError, match=r"image encoder .*pass encoders=\{'image': PATH\}"):
        XLLM.from_pretrained(alone, llm=str(moved / "models/llama"))
    model = XLLM.from_pretrained(alone, llm=str(moved / "models/llama"), encoders={"image": str(moved / "models/vit")})
    torch.testing.assert_close(logits(model, moved / "photo.png"), expected, atol=1e-5, rtol=0)
    card = (alone / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: xllm\n") and "XLLM.from_pretrained" in card
    write_model_card(alone, metrics={"accuracy": 0.5, "questions": 10})
    assert "| accuracy | 0.5000 |\n| questions | 10 |" in (alone / "README.md").read_text()


def test_an_adapter_for_another_llm_width_names_both_sizes(tiny, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny / "llama")
    wider = tmp_path / "llama96"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(wider)
    tokenizer.save_pretrained(wider)
    directory = make_model(tiny).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="hidden size 64, but .*llama96 has hidden size 96"):
        XLLM.from_pretrained(directory, llm=str(wider))


def test_missing_and_unexpected_tensors_are_listed(tiny, tmp_path):
    directory = make_model(tiny).save_pretrained(tmp_path / "adapter")
    path = directory / "adapter.safetensors"
    tensors = load_file(str(path))
    dropped = "interfaces.image.bridge.qformer.query_tokens"
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(path))
    with pytest.raises(KeyError, match=f"1 trained parameters missing: {dropped}"):
        XLLM.from_pretrained(directory)
    save_file({**tensors, "interfaces.image.bridge.extra.weight": torch.zeros(2)}, str(path))
    with pytest.raises(KeyError, match="1 unexpected tensors .*: interfaces.image.bridge.extra.weight"):
        XLLM.from_pretrained(directory)


def edit_config(directory: Path, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


def test_a_newer_format_is_refused(tiny, tmp_path):
    directory = make_model(tiny).save_pretrained(tmp_path / "adapter")
    edit_config(directory, lambda c: c.update(version=99))
    with pytest.raises(ValueError, match="format version 99 .* newer than this xllm"):
        XLLM.from_pretrained(directory)


def test_an_adapter_cannot_run_code(tiny, tmp_path):
    directory = make_model(tiny).save_pretrained(tmp_path / "adapter")
    edit_config(directory, lambda c: c["llm"].update(trust_remote_code=True))
    with pytest.raises(ValueError, match="asks for trust_remote_code.*nothing was loaded"):
        XLLM.from_pretrained(directory)

    # A class path inside the xllm package is not enough: importing xllm.demo.__main__ would run the demo.
    edit_config(directory, lambda c: (c["llm"].pop("trust_remote_code"), c["interfaces"]["image"].update(
        class_path="xllm.demo.__main__.ImageInterface")))
    sys.modules.pop("xllm.demo.__main__", None)
    with pytest.raises(ValueError, match="not one of xllm's interfaces.*nothing was imported"):
        XLLM.from_pretrained(directory)
    assert "xllm.demo.__main__" not in sys.modules


def test_the_wheel_alone_loads_an_adapter_from_another_project(project, tmp_path):
    """Build the wheel, install it into a fresh folder, and answer from an unrelated working directory."""
    root, _ = project
    dist, target, elsewhere = tmp_path / "dist", tmp_path / "site", tmp_path / "other_project"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(ROOT)], check=True, capture_output=True)
    (wheel,) = dist.glob("xllm_toolkit-*.whl")  # the distribution name; `import xllm` stays
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    assert (target / "xllm/apps/serve_page.html").is_file()  # package data travels with the wheel
    elsewhere.mkdir()
    snippet = textwrap.dedent(f"""
        import xllm
        from xllm import XLLM

        model = XLLM.from_pretrained({str(root / "runs/adapter")!r})
        answer = model.chat([{{"from": "user", "value": "<image>\\nIs there a red circle?"}}],
                            {{"image": {str(root / "photo.png")!r}}}, max_new_tokens=4)
        print(xllm.__file__)
        print(repr(answer))
    """)
    env = {**os.environ, "PYTHONPATH": str(target)}  # the wheel's files, not this checkout's
    out = subprocess.run([sys.executable, "-c", snippet], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    module_file, answer = out.stdout.strip().splitlines()[-2:]
    assert Path(module_file).is_relative_to(target)
    assert isinstance(eval(answer), str)


def test_a_version_2_adapter_still_loads_and_gives_the_outputs_it_gave(tiny):
    """`tests/fixtures/adapter_v2` was written by xllm at e6abea8 (format version 2, flat Q-Former settings) against
    the tiny models, with the last position's logits for one question saved beside it by the same code."""
    fixture = ROOT / "tests" / "fixtures" / "adapter_v2"
    assert json.loads((fixture / "config.json").read_text())["version"] == 2
    model = XLLM.from_pretrained(fixture, llm=str(tiny / "llama"), encoders={"image": str(tiny / "vit")})
    stored = load_file(str(fixture / "adapter.safetensors"))
    own = dict(model.named_parameters())
    assert all(torch.equal(own[k], v) for k, v in stored.items())
    got = logits(model, tiny / "data" / "images" / "test_00000.png")[0, -1]
    torch.testing.assert_close(got, load_file(str(fixture / "reference.safetensors"))["last_logits"])
    assert isinstance(model.chat(QUESTION, {"image": str(tiny / "data" / "images" / "test_00000.png")},
                                 max_new_tokens=4), str)


def test_an_adapter_that_needs_an_extra_says_so_before_loading_anything(tiny, tmp_path, monkeypatch):
    """The extras an adapter records are checked first: a missing one is one line naming it, nothing is loaded."""
    directory = tmp_path / "adapter"
    shutil.copytree(ROOT / "tests" / "fixtures" / "adapter_v2", directory)
    config = json.loads((directory / "config.json").read_text())
    config["extras"] = ["vision"]
    config["llm"]["path"] = str(tmp_path / "no_llm_here")  # never reached
    (directory / "config.json").write_text(json.dumps(config))
    write_model_card(directory)
    assert "pip install 'xllm-toolkit[vision]'" in (directory / "README.md").read_text()
    from xllm import extras

    monkeypatch.setitem(extras.EXTRAS, "vision", ("torchvision", "not_installed_here"))
    with pytest.raises(extras.MissingExtraError, match=r"adapter .* needs not_installed_here \(the 'vision' extra\)"):
        XLLM.from_pretrained(directory)
    config["extras"] = ["telepathy"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="extra 'telepathy', which this xllm does not know"):
        XLLM.from_pretrained(directory)
