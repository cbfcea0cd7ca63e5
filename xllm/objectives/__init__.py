"""LLM-free pretraining objectives (stage 0): each trains one kind of interface bridge without loading the LLM."""

from xllm.objectives.base import PretrainingObjective, PretrainOutput
from xllm.objectives.cformer import CIFObjective
from xllm.objectives.qformer import QFormerObjective

__all__ = ["CIFObjective", "PretrainOutput", "PretrainingObjective", "QFormerObjective"]
