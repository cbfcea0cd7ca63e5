"""LLM-free pretraining objectives (stage 0): each trains one kind of interface bridge without loading the LLM."""

from xllm.pretraining.base import PretrainingObjective, PretrainOutput
from xllm.pretraining.cformer import CIFObjective
from xllm.pretraining.qformer import QFormerObjective

__all__ = ["CIFObjective", "PretrainOutput", "PretrainingObjective", "QFormerObjective"]
