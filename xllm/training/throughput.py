"""Throughput and MFU logging: sequences/s, LLM tokens/s (media tokens included), model TFLOP/s.

FLOPs per step follow the litgpt rule: parameters that train cost 6 FLOPs per token (forward + both
backward products), frozen LLM weights 4 (gradients still flow through them to the spliced inputs).
Interface parameters are counted per media token they produce; the frozen encoders' forward is left out,
so the figure is a slight underestimate. MFU needs the device's peak: pass `peak_tflops` (e.g. 989 for
dense bf16 on an H100/H200).
"""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl


class ThroughputLogger(pl.Callback):
    """Logs `perf/sequences_per_s`, `perf/tokens_per_s`, `perf/tflops` and (with `peak_tflops`) `perf/mfu`.

    Args:
        peak_tflops: the accelerator's peak TFLOP/s for the training precision, per device.
    """

    def __init__(self, peak_tflops: float | None = None) -> None:
        self.peak_tflops = peak_tflops
        self._start = 0.0

    def on_train_start(self, trainer: pl.Trainer, module: Any) -> None:
        # Parameter counts do not change during fit: count once, not on every step.
        model = module.model
        self._counts = None if model is None else (
            sum(p.numel() for p in model.llm.parameters() if not p.requires_grad),
            sum(p.numel() for p in model.llm.parameters() if p.requires_grad),
            sum(p.numel() for p in model.interfaces.parameters() if p.requires_grad),
        )

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch is None:
            return
        seconds = max(time.perf_counter() - self._start, 1e-9)
        model = module.model
        if model is None:  # stage 0: media-text pairs, no LLM
            module.log("perf/sequences_per_s", batch["media"].shape[0] / seconds, on_step=True, batch_size=1)
            return
        media_tokens = sum(
            int(items.shape[0]) * model.interfaces[m].num_tokens for m, items in batch["media"].items()
        )
        text_tokens = int(batch["attention_mask"].sum()) - sum(int(t.shape[0]) for t in batch["media"].values())
        tokens = text_tokens + media_tokens
        llm_frozen, llm_trained, interface_trained = self._counts
        flops = tokens * (4 * llm_frozen + 6 * llm_trained) + media_tokens * 6 * interface_trained
        tflops = flops / seconds / 1e12
        metrics = {
            "perf/sequences_per_s": batch["input_ids"].shape[0] / seconds,
            "perf/tokens_per_s": tokens / seconds,
            "perf/tflops": tflops,
        }
        if self.peak_tflops:
            metrics["perf/mfu"] = tflops / self.peak_tflops
        module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
