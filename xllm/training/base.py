"""What every xllm LightningModule shares, whatever it trains.

Frozen means frozen: frozen parts stay in eval mode through Lightning's `.train()`, never reach the optimizer
(AdamW over trainable parameters only, no decay on biases/norms/tables) and never enter a checkpoint
(`on_save_checkpoint` keeps trainable tensors only). Each run prints and logs its parameter counts. A
subclass says what it trains (`frozen_modules`, `training_step`), how its data is read (`build_dataset`,
`collator`) and where its result goes (`save_result`); the DataModule and callbacks ask it, so they never
need to know which stage runs.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import nn
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from xllm.data.records import BadSamples
from xllm.frozen import keep_frozen_in_eval
from xllm.interfaces.base import MediaBatch, ModalityInterface
from xllm.llm import count_parameters
from xllm.tensors import is_sharded

# Parameters that never get weight decay: biases, norms, and learned token/position tables.
NO_DECAY_MARKERS = ("bias", "LayerNorm", "layernorm", "ln_", "norm.", "query_tokens", "position")


class TrainingModule(pl.LightningModule):
    """Base of `XLLMModule` (stages 1-2) and `InterfacePretrainingModule` (stage 0): both train interfaces.

    Args:
        interfaces: modality -> interface, e.g. `{"image": {"class_path": "xllm.interfaces.ImageInterface", ...}}`
            (the subclass decides where they live: inside an `XLLM`, or alone in stage 0).
        init_adapter: checkpoint directory to start from (stage 1 starts from stage 0's, stage 2 from stage 1's).
        adapter_dir: where the result is written after fit (default: `<log dir>/adapter`).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to biases, norms, query tokens, position tables).
        betas: AdamW betas.
        warmup_steps: linear warmup steps before the cosine decay (a float < 1 is a fraction of all steps).
        lr_schedule: after warmup, `cosine` decay to 0 over the run's steps, or `constant` (the demo's short
            stages: their recipe was tuned at a near-constant rate, and a decay over a few hundred steps halves
            what they learn).
        max_nonfinite_in_a_row: a NaN/inf training loss skips its step (counted, logged as
            `train/nonfinite_losses`, its records named); this many in a row stop the run.
    """

    def __init__(
        self,
        interfaces: dict[str, ModalityInterface],
        init_adapter: str | None = None,
        adapter_dir: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: float = 0.05,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        max_nonfinite_in_a_row: int = 5,
    ) -> None:
        super().__init__()
        self.max_nonfinite_in_a_row = max_nonfinite_in_a_row
        self.nonfinite_losses = self.nonfinite_in_a_row = 0
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
        self.lr_schedule = lr_schedule
        self.init_adapter, self.adapter_dir = init_adapter, adapter_dir
        self.lr, self.weight_decay, self.betas, self.warmup_steps = lr, weight_decay, tuple(betas), warmup_steps
        # Checkpoints hold trainable tensors only, so resuming loads non-strictly.
        self.strict_loading = False

    # --- what a subclass provides ------------------------------------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def build_dataset(
        self, path: str, media_root: str | None, bad_samples: BadSamples, allow_outside_root: bool = False,
    ) -> torch.utils.data.Dataset:
        """Read, validate and prepare one data file (media features cached here, before training)."""
        raise NotImplementedError

    def build_streaming_dataset(self, shards: str | list[str], media_root: str | None, bad_samples: BadSamples,
                                allow_outside_root: bool = False, seed: int = 0, rank: int = 0,
                                world_size: int = 1, batch_size: int = 1) -> Any:
        """Training data read lazily from JSONL shards (`xllm.data.streaming`), where the stage supports it."""
        raise ValueError(f"{self.stage_name} reads its data into memory: train_shards (streaming) serves stages 1-2; "
                         "give train_file")

    def collator(self) -> Any:
        raise NotImplementedError

    def save_result(self, directory: Path) -> None:
        raise NotImplementedError

    @property
    def stage_name(self) -> str:
        raise NotImplementedError

    # --- frozen stays frozen -----------------------------------------------------------------------
    def trainable_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def train(self, mode: bool = True) -> TrainingModule:
        super().train(mode)
        keep_frozen_in_eval(self, self.frozen_modules(), mode)
        return self

    def on_fit_start(self) -> None:
        trainable, frozen = count_parameters(self)
        self.print(f"xllm {self.stage_name}: {trainable:,} trainable parameters, {frozen:,} frozen")
        for logger in self.loggers:
            logger.log_hyperparams({"params/trainable": trainable, "params/frozen": frozen})

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        # The random streams too (dropout, ITM's sampled negatives): with the data loader's position, which the
        # checkpoint also holds, a resumed run then takes the very steps the uninterrupted run would have taken.
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        # Every rank writes this dict and rank 0's copy is saved: under DDP each rank's streams go in, by rank (a
        # rank's dropout and sampled negatives reach every rank's loss through the gradients and ITC's gather).
        if self.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(ranks, rng)
            rng = {**rng, "ranks": ranks}
        checkpoint["xllm_rng"] = rng

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints hold trainable tensors only, so Lightning loads them non-strictly; this check restores
        the strictness for what matters: every trainable tensor must be there (a missing one would silently
        keep its fresh initialisation, e.g. LoRA switched on after the checkpoint was written)."""
        stored, wanted = set(checkpoint.get("state_dict", {})), self.trainable_names()
        missing, unexpected = sorted(wanted - stored), sorted(stored - wanted)
        if missing or unexpected:
            def listed(names: list[str]) -> str:
                return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            problems = ([f"{len(missing)} trainable tensor(s) missing: {listed(missing)}"] if missing else []) + \
                ([f"{len(unexpected)} unexpected: {listed(unexpected)}"] if unexpected else [])
            raise ValueError(f"this checkpoint does not fit the model being trained ({'; '.join(problems)}): it was "
                             "written by another configuration (interfaces, LoRA, stage)")
        self.resumed_rng = checkpoint.get("xllm_rng")

    def on_train_start(self) -> None:
        # Applied here, after Lightning has built the data iterator (which draws from the global stream), as the
        # uninterrupted run had drawn it before the checkpoint was written.
        rng, self.resumed_rng = getattr(self, "resumed_rng", None), None
        if rng is not None and len(rng.get("ranks", ())) == self.trainer.world_size:
            rng = rng["ranks"][self.trainer.global_rank]  # this rank's own streams
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def on_fit_end(self) -> None:
        # Sharded, every rank takes part in gathering the trained tensors whole; rank 0 writes them.
        if self.trainer.is_global_zero or self.is_sharded:
            directory = self.resolved_adapter_dir()
            self.save_result(directory)
            self.print(f"adapter written to {directory}")

    @property
    def is_sharded(self) -> bool:
        """Whether FSDP2 has sharded this module's trained parameters (`xllm.training.sharding`)."""
        return any(is_sharded(p) for p in self.parameters() if p.requires_grad)

    def trained_on(self) -> str:
        """For the model card: the training file and how far training went."""
        datamodule = self.trainer.datamodule
        sources = getattr(datamodule, "train_sources", None)
        if sources:
            return ", ".join(f"`{s.file}` (weight {s.weight:g})" for s in sources) + \
                f"; {self.trainer.global_step} optimizer steps"
        data = getattr(datamodule, "train_file", None) or "data given to the trainer"
        return f"`{data}`, {self.trainer.global_step} optimizer steps"

    def resolved_adapter_dir(self) -> Path:
        if self.adapter_dir is not None:
            return Path(self.adapter_dir)
        base = self.trainer.log_dir or self.trainer.default_root_dir
        return Path(base) / "adapter"

    def log_skipped(self, batch: dict[str, Any], split: str) -> None:
        if batch["skipped"]:
            self.log(f"{split}/skipped_media", float(len(batch["skipped"])), reduce_fx="sum", on_epoch=True,
                     on_step=False, batch_size=1)

    def validation_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        self.step(batch, "val")

    def training_step(self, batch: dict[str, Any] | None, batch_idx: int) -> dict[str, Any] | None:
        out = self.step(batch, "train")
        if out is None or bool(torch.isfinite(out["loss"]).all()):
            self.nonfinite_in_a_row = 0
            return out
        # A NaN/inf loss would put NaN into every trained weight through AdamW: skip the step (returning None
        # skips backward and the optimizer step; under DDP every rank must skip alike, so it stops there).
        self.nonfinite_losses += 1
        self.nonfinite_in_a_row += 1
        self.log("train/nonfinite_losses", float(self.nonfinite_losses), on_step=True, batch_size=1)
        records = ", ".join(map(str, batch["ids"][:8])) + (" ..." if len(batch["ids"]) > 8 else "")
        message = f"step {self.global_step}: loss {out['loss'].item()} on records {records}"
        if self.nonfinite_in_a_row >= self.max_nonfinite_in_a_row or self.trainer.world_size > 1:
            ddp = " (under DDP every process would have to skip alike, so one stops the run)" \
                if self.trainer.world_size > 1 else ""
            raise FloatingPointError(
                f"{self.nonfinite_in_a_row} non-finite training loss(es) in a row, the last {message}: check those "
                f"records' media and text, or lower the learning rate{ddp}")
        self.print(f"{message}: non-finite, step skipped ({self.nonfinite_losses} so far)")
        return None

    def step(self, batch: dict[str, Any] | None, split: str) -> dict[str, Any] | None:
        raise NotImplementedError

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Lightning's default walks every element of a batch, each of stage 0's 128 pair strings included
        # (~13 ms a step on a CPU); only tensors and MediaBatches move.
        if isinstance(batch, dict):
            return {k: self.transfer_batch_to_device(v, device, dataloader_idx) for k, v in batch.items()}
        return batch.to(device) if isinstance(batch, (torch.Tensor, MediaBatch)) else batch

    # --- optimisation ------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups over trainable parameters only, with no decay on biases/norms/query tokens/positions, and
        each parameter at `lr × lr_scale(name)`."""
        groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad:
                continue
            decays = not (parameter.ndim < 2 or any(marker in name for marker in NO_DECAY_MARKERS))
            groups.setdefault((decays, self.lr_scale(name)), []).append(parameter)
        return [{"params": params, "weight_decay": self.weight_decay if decays else 0.0, "lr": self.lr * scale}
                for (decays, scale), params in sorted(groups.items(), key=lambda item: (not item[0][0], -item[0][1]))]

    def lr_scale(self, name: str) -> float:
        """The learning-rate factor of the parameter called `name` (1: `lr`)."""
        return 1.0

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.lr, betas=self.betas)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = self.warmup_steps
        warmup_steps = int(math.ceil(warmup * total)) if warmup < 1 else int(warmup)
        if self.lr_schedule == "constant":
            scheduler = get_constant_schedule_with_warmup(optimizer, warmup_steps)
        else:
            scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
