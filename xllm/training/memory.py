"""What each rank holds: parameter bytes (frozen and trained), gradient elements and peak memory, per rank.

Sharding is judged by these numbers, not by a step that happens to fit: under FSDP2 a rank should hold ~1/N of the
frozen LLM and gradients for ~1/N of the trained parameters only (litgpt#1417 found 201M gradient elements where
131K were trained). Counted from each parameter's local shard (`DTensor.to_local()`), before the optimizer step,
when the gradients exist. A quantised tensor counts the bytes it stores (int8 or packed 4-bit weights and their
scales), not its nominal dtype's.

`peak_rss_bytes` is what the OS reports: the process's high-water mark of resident memory (`VmHWM` in
/proc/self/status; `getrusage` elsewhere), which counts everything the process ever held at once — the whole LLM
while it loaded included — and not only the tensors counted above. Each rank writes it twice: at its first optimizer
step and again when training ends (`peak_rss_bytes_end`, the whole run's peak); `peak_rss_bytes_loaded` is the
peak before the first step (building and loading the models, sharding them).
"""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from xllm.tensors import is_sharded


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (its shard under FSDP2; the tensor itself otherwise)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def stored_bytes(tensor: torch.Tensor) -> int:
    """The bytes a tensor stores: a wrapper subclass (torchao's int8 weights: int8 data + scales) counts its inner
    tensors, bitsandbytes' parameters their packed bytes and their `quant_state`'s scales."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    size = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit: absmax (and its own state when nested)
    for part in (getattr(state, "absmax", None), getattr(getattr(state, "state2", None), "absmax", None),
                 getattr(tensor, "SCB", None)):  # bitsandbytes 8-bit: one scale per row
        if isinstance(part, torch.Tensor):
            size += part.numel() * part.element_size()
    return size


def os_peak_rss_bytes() -> float:
    """The process's peak resident memory as the OS reports it (`VmHWM`; `ru_maxrss` where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux reports KiB


def rank_memory(module: torch.nn.Module) -> dict[str, float]:
    """`frozen_param_bytes`, `trained_param_bytes`, `grad_elements` (gradients held now), `trained_elements`
    (this rank's share of the trained parameters) and the process's peak memory (`peak_rss_bytes`; CUDA's too)."""
    out = {"frozen_param_bytes": 0.0, "trained_param_bytes": 0.0, "grad_elements": 0.0, "trained_elements": 0.0}
    for parameter in module.parameters():
        shard = local(parameter)
        out["trained_param_bytes" if parameter.requires_grad else "frozen_param_bytes"] += stored_bytes(shard)
        if parameter.requires_grad:
            out["trained_elements"] += shard.numel()
        if parameter.grad is not None:
            out["grad_elements"] += local(parameter.grad).numel()
    out["peak_rss_bytes"] = os_peak_rss_bytes()
    if torch.cuda.is_available():
        out["peak_cuda_bytes"] = float(torch.cuda.max_memory_allocated())
    return out


class RankMemory(pl.Callback):
    """Logs `memory/*` (rank 0's, as Lightning logs) and writes every rank's figures at its first optimizer step to
    `folder/rank{N}.json`, where they can be compared; at the end of training it adds the whole run's OS peak
    (`peak_rss_bytes_end`).

    Args:
        folder: where each rank writes its JSON (none: only logged).
    """

    def __init__(self, folder: str | None = None) -> None:
        self.folder = Path(folder) if folder else None
        self.written = False

    def on_train_start(self, trainer: pl.Trainer, module: Any) -> None:
        self.loaded = os_peak_rss_bytes()  # the models built, loaded and sharded; no step taken yet

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: Any, optimizer: Any) -> None:
        figures = rank_memory(module)
        if getattr(self, "loaded", None) is not None:
            figures["peak_rss_bytes_loaded"] = self.loaded
        if getattr(module, "llm_bytes_read", 0):  # a meta-device LLM filled by this rank (`meta_llm`)
            figures["llm_bytes_read"] = float(module.llm_bytes_read)
        module.log_dict({f"memory/{k}": v for k, v in figures.items()}, on_step=True, on_epoch=False, batch_size=1,
                        rank_zero_only=True)
        if self.folder is not None and not self.written:
            self.folder.mkdir(parents=True, exist_ok=True)
            figures["world_size"] = trainer.world_size
            (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(figures, indent=2))
            self.written = True

    def teardown(self, trainer: pl.Trainer, module: Any, stage: str) -> None:
        # After the adapter is written (the module's `on_fit_end`): the peak of everything the run did.
        path = self.folder / f"rank{trainer.global_rank}.json" if self.folder is not None else None
        if path is not None and path.is_file():
            figures = json.loads(path.read_text())
            figures["peak_rss_bytes_end"] = os_peak_rss_bytes()
            path.write_text(json.dumps(figures, indent=2))
