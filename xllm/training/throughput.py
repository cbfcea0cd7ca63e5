"""Throughput and MFU logging: sequences/s, LLM tokens/s (real media tokens included), model TFLOP/s.

The training module reports, per step, what it processed: `sequences`, and where an LLM runs, `tokens` (real,
unpadded LLM positions, media tokens included) and `flops` (litgpt's rule, see `XLLMModule`). The frozen
encoders' forward is left out, so the figure is a slight underestimate. MFU needs the device's peak: pass
`peak_tflops` (e.g. 989 for dense bf16 on an H100/H200).
"""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl


class ThroughputLogger(pl.Callback):
    """Logs `perf/sequences_per_s`, and where known `perf/tokens_per_s`, `perf/tflops`, `perf/mfu`.

    Args:
        peak_tflops: the accelerator's peak TFLOP/s for the training precision, per device.
    """

    def __init__(self, peak_tflops: float | None = None) -> None:
        self.peak_tflops = peak_tflops
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not isinstance(outputs, dict) or "sequences" not in outputs:
            return  # a batch whose items were all skipped
        seconds = max(time.perf_counter() - self._start, 1e-9)
        metrics = {"perf/sequences_per_s": outputs["sequences"] / seconds}
        if "tokens" in outputs:
            metrics["perf/tokens_per_s"] = outputs["tokens"] / seconds
        if "flops" in outputs:
            metrics["perf/tflops"] = outputs["flops"] / seconds / 1e12
            if self.peak_tflops:
                metrics["perf/mfu"] = metrics["perf/tflops"] / self.peak_tflops
        module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
