"""Adapters: projections from an interface's width into the LLM's embedding space; adapter save/load."""

from xllm.adapters.io import load_adapter, load_adapter_weights, save_adapter
from xllm.adapters.projection import build_projection

__all__ = ["build_projection", "load_adapter", "load_adapter_weights", "save_adapter"]
