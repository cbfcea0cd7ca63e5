"""Evaluation: metrics and the evaluate entry point."""

from xllm.evaluation.metrics import exact_match, normalize_answer, summarize, yes_no

__all__ = ["exact_match", "normalize_answer", "summarize", "yes_no"]
