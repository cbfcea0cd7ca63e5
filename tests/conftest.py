"""Shared fixtures: tiny random models and data, built once per session into a temp folder (offline)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

from xllm.demo.tiny import build_all
from xllm.interfaces import ImageInterface
from xllm.model import XLLM

TINY_QFORMER = dict(num_query_tokens=4, hidden_size=32, layers=2, heads=2, intermediate_size=64)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return build_all(tmp_path_factory.mktemp("tiny"))


def text_side(tiny: Path, instruction_aware: bool = True) -> dict:
    """Q-Former settings for BLIP-2's text side started from the tiny BERT (instruction-aware by default)."""
    return dict(text=True, instruction_aware=instruction_aware, bert_init=str(tiny / "bert"))


def make_image_interface(tiny: Path, qformer: dict | None = None, **overrides) -> ImageInterface:
    """A tiny image interface; `qformer` settings go over the tiny Q-Former's."""
    return ImageInterface(str(tiny / "vit"), qformer={**TINY_QFORMER, "dropout": 0.0, **(qformer or {})}, **overrides)


def make_model(tiny: Path, llm: str = "llama", template: str = "vicuna_v1", **interface_overrides) -> XLLM:
    torch.manual_seed(0)
    return XLLM.from_paths(
        str(tiny / llm), {"image": make_image_interface(tiny, **interface_overrides)}, template=template
    )
