"""Stage 0: LLM-free pretraining of one interface's bridge with an objective chosen in the config.

The LLM is never created, so stage 0 spends neither memory nor time on it. The objective (e.g.
`xllm.objectives.QFormerObjective`, BLIP-2's ITC/ITM/ITG + question-aware matching) binds to the interface
through `PretrainableInterface` and owns its text tokenization; the data are media-text pairs from the usual
conversation files (`xllm.data.pairs`). The result is an interface checkpoint that stage 1 loads with
`init_adapter:`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn

from xllm.adapters.format import load_weights
from xllm.adapters.save import save_interface_checkpoint
from xllm.data.pairs import PairCollator, PairDataset, build_pair_dataset
from xllm.data.records import BadSamples
from xllm.interfaces.base import ModalityInterface
from xllm.objectives.base import PretrainingObjective
from xllm.objectives.qformer import QFormerObjective
from xllm.training.base import TrainingModule
from xllm.training.sharding import gather_for_saving, shard_pretraining


class InterfacePretrainingModule(TrainingModule):
    """Pretrains one interface without the LLM.

    Args:
        interfaces: exactly one modality -> interface (its bridge is what trains).
        objective: the LLM-free objective and its loss weights (default: `QFormerObjective()`).
        batch_by_record: a data record (all its turns' pairs) is one item, so its turns share a batch and the data's
            `batch_size` counts records. Give each record a yes/no pair about one media item (MME's two questions):
            on the video demo's five categories, 600 steps from scratch reached 0.85 on val so, 0.61 with the same
            questions shuffled singly (README).
        **training: `TrainingModule`'s settings (init_adapter, adapter_dir, lr, weight_decay, betas, warmup_steps,
            lr_schedule).
    """

    def __init__(
        self,
        interfaces: dict[str, ModalityInterface],
        objective: PretrainingObjective | None = None,
        batch_by_record: bool = False,
        **training: Any,
    ) -> None:
        super().__init__(interfaces, **training)
        if len(interfaces) != 1:
            raise ValueError(f"stage 0 pretrains one interface at a time, got {sorted(interfaces)}")
        self.save_hyperparameters(ignore=["interfaces", "objective"])
        self.interfaces = nn.ModuleDict(interfaces)
        (self.modality,) = interfaces
        self.batch_by_record = batch_by_record
        self.objective = objective if objective is not None else QFormerObjective()
        self.objective.bind(self.interface)
        for parameter in self.objective.unused_parameters(self.interface):
            parameter.requires_grad_(False)
        if self.init_adapter is not None:
            load_weights(self, self.init_adapter, strict=False)

    @property
    def interface(self) -> ModalityInterface:
        return self.interfaces[self.modality]

    @property
    def stage_name(self) -> str:
        return "stage 0"

    def frozen_modules(self) -> list[nn.Module]:
        return self.interface.frozen_modules()

    def build_dataset(
        self, path: str, media_root: str | None, bad_samples: BadSamples, allow_outside_root: bool = False,
    ) -> PairDataset:
        rows = build_pair_dataset(path, self.modality, media_root, bad_samples, allow_outside_root)
        self.interface.prepare_media(list(rows["path"]))
        return PairDataset(rows, self.modality, self.interface.media_loader(), self.objective.tokenize, bad_samples,
                           self.objective.pair_texts, by_record=self.batch_by_record,
                           tokenizer_for=self.objective.tokenizer_for)

    def collator(self) -> PairCollator:
        return PairCollator(self.interface.collate)

    def configure_model(self) -> None:
        """Under `ShardedStrategy` (FSDP2), shard the interface and the objective's heads before the optimizer is
        built (`xllm.training.sharding.shard_pretraining`)."""
        strategy = self.trainer.strategy
        if isinstance(strategy, ModelParallelStrategy) and not self.is_sharded:
            shard_pretraining(self, strategy.device_mesh["data_parallel"], getattr(strategy, "frozen_dtype", None))

    def save_result(self, directory: Path) -> None:
        if self.is_sharded:  # every rank comes here: the interface is gathered whole, rank 0 writes
            gather_for_saving(self.interfaces)
        if not self.trainer.is_global_zero:
            return
        save_interface_checkpoint(self.interfaces, directory, stage=0, trained_on=self.trained_on())

    def step(self, batch: dict[str, Any] | None, split: str) -> dict[str, Any] | None:
        if batch is None:
            return None
        self.log_skipped(batch, split)
        loss, metrics = self(batch)
        size = len(batch["media"])
        # Over several ranks the logged training loss is their mean (the global batch's ITC), not rank 0's alone.
        on_step, sync = split == "train", split != "train" or self.trainer.world_size > 1
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=size, on_step=on_step, on_epoch=not on_step,
                 sync_dist=sync)
        for name, value in metrics.items():
            self.log(f"{split}/{name}", value, batch_size=size, on_step=on_step, on_epoch=not on_step, sync_dist=sync)
        return {"loss": loss, "sequences": size}

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective's loss and metrics on a pair batch. A call of this module, not of the objective alone: sharded,
        this module is FSDP2's root, whose hooks gather the interface and the heads around it."""
        out = self.objective(self.interface, batch)
        return out.loss, out.metrics
