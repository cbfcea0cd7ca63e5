"""The LightningModule for all stages.

Stage 0 (optional, LLM-free) pretrains one Q-Former interface with BLIP-2's ITC/ITM/ITG and never loads
the LLM. Stage 1 (alignment on caption/transcript pairs) and stage 2 (instruction tuning) train the same
things — each interface's Q-Former, queries, feature LayerNorm and adapter — and stage 2 may add LoRA.
The LLM and encoders are frozen: `requires_grad=False`, eval mode, not in the optimizer, not in
checkpoints (`on_save_checkpoint` keeps trainable tensors only), not in the adapter written after fit.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from transformers import get_cosine_schedule_with_warmup

from torch import nn

from xllm.adapters.io import load_adapter_weights, save_adapter, save_interface_checkpoint
from xllm.interfaces.base import ModalityInterface
from xllm.interfaces.qformer_pretraining import QFormerPretrainer
from xllm.llm import LoraSettings, count_parameters
from xllm.model import XLLM

# Parameters that never get weight decay: biases, norms, and learned token/position tables.
NO_DECAY_MARKERS = ("bias", "LayerNorm", "layernorm", "ln_", "norm.", "query_tokens", "position")


@dataclass
class PretrainSettings:
    """Stage-0 losses (BLIP-2 stage 1): weights of ITC, ITM and ITG (0 turns one off), ITC width."""

    itc_weight: float = 1.0
    itm_weight: float = 1.0
    itg_weight: float = 1.0
    embed_dim: int = 256
    flipped_negatives: bool = True  # a yes/no statement's flipped answer is an extra ITM negative
    qa_itm_weight: float = 0.0  # question-aware matching on yes/no pairs (see qformer_pretraining.py)


class XLLMModule(pl.LightningModule):
    """Trains the interfaces (and optional LoRA) of an `XLLM` whose LLM stays frozen.

    Args:
        llm: path (or hub id) of the chat LLM, loaded with `AutoModelForCausalLM` (not loaded in stage 0).
        interfaces: modality -> interface, e.g. `{"image": {"class_path": "xllm.interfaces.ImageInterface", ...}}`.
        stage: 0 pretrains a Q-Former without the LLM; 1 trains interfaces + adapters on caption pairs;
            2 instruction-tunes (LoRA allowed).
        template: chat template: `tokenizer` (the tokenizer's own), `vicuna_v1` or `glm4`.
        system_prompt: optional system message for every conversation.
        llm_dtype: dtype of the frozen LLM (`float32` on CPU; `bfloat16` on GPUs).
        trust_remote_code: allow hub remote code (ChatGLM-6B/2/3); off unless you set it.
        lora: LoRA settings for stage 2 (null: no LoRA).
        init_adapter: adapter directory to start from (stage 2 starts from the stage-1 adapter).
        adapter_dir: where the trained adapter is written after fit (default: `<log dir>/adapter`).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to biases, norms, query tokens).
        betas: AdamW betas.
        warmup_steps: linear warmup steps before the cosine decay (a float < 1 is a fraction of all steps).
        max_length: longest sequence, text plus modality tokens.
        pretrain: stage-0 loss settings.
    """

    def __init__(
        self,
        llm: str | None,
        interfaces: dict[str, ModalityInterface],
        stage: Literal[0, 1, 2] = 1,
        template: str = "tokenizer",
        system_prompt: str | None = None,
        llm_dtype: str = "float32",
        trust_remote_code: bool = False,
        lora: LoraSettings | None = None,
        init_adapter: str | None = None,
        adapter_dir: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: float = 0.05,
        max_length: int = 2048,
        pretrain: PretrainSettings | None = None,
    ) -> None:
        super().__init__()
        if stage not in (0, 1, 2):
            raise ValueError(f"stage must be 0, 1 or 2, got {stage}")
        if lora is not None and stage != 2:
            raise ValueError("lora is for stage 2 (instruction tuning); stages 0 and 1 keep the LLM untouched")
        self.save_hyperparameters(ignore=["interfaces"])
        self.stage = stage
        self.adapter_dir = adapter_dir
        self.max_length = max_length
        # Checkpoints hold trainable tensors only, so resuming loads non-strictly.
        self.strict_loading = False
        self.model: XLLM | None = None
        if stage == 0:
            if len(interfaces) != 1:
                raise ValueError(f"stage 0 pretrains one interface at a time, got {sorted(interfaces)}")
            # No LLM object at all: stage 0 spends neither memory nor time on it.
            self.interfaces = nn.ModuleDict(interfaces)
            settings = asdict(pretrain or PretrainSettings())
            self.flipped_negatives = settings["flipped_negatives"]
            (interface,) = interfaces.values()
            self.pretrainer = QFormerPretrainer(
                interface, embed_dim=settings["embed_dim"], itc_weight=settings["itc_weight"],
                itm_weight=settings["itm_weight"], itg_weight=settings["itg_weight"],
                qa_itm_weight=settings["qa_itm_weight"],
                instruction_aware=getattr(interface, "instruction_aware", False),
            )
            if init_adapter is not None:
                load_adapter_weights(self, init_adapter)
            return
        if llm is None:
            raise ValueError(f"stage {stage} needs an llm path")
        self.model = XLLM.from_paths(
            llm, interfaces, llm_dtype=llm_dtype, trust_remote_code=trust_remote_code,
            template=template, system_prompt=system_prompt,
        )
        if lora is not None:
            self.model.enable_lora(lora)
        if init_adapter is not None:
            # After LoRA is in place, so a stage-2 adapter (with LoRA tensors) can be resumed too.
            load_adapter_weights(self.model, init_adapter)

    def trainable_names(self) -> set[str]:
        return {name for name, p in self.named_parameters() if p.requires_grad}

    def frozen_modules(self) -> list[nn.Module]:
        if self.model is not None:
            return self.model.frozen_modules()
        return [m for interface in self.interfaces.values() for m in interface.frozen_modules()]

    def train(self, mode: bool = True) -> XLLMModule:
        super().train(mode)  # reaches XLLM.train, which keeps frozen parts in eval (LoRA dropout excepted)
        if self.model is None:  # stage 0 has no XLLM: keep the frozen encoder and tables in eval here
            for module in self.frozen_modules():
                module.eval()
        return self

    # --- bookkeeping ------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        trainable, frozen = count_parameters(self)
        message = f"xllm stage {self.stage}: {trainable:,} trainable parameters, {frozen:,} frozen"
        self.print(message)
        for logger in self.loggers:
            logger.log_hyperparams({"params/trainable": trainable, "params/frozen": frozen})

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            directory = self.resolved_adapter_dir()
            if self.stage == 0:
                save_interface_checkpoint(self.interfaces, directory, stage=0)
            else:
                save_adapter(self.model, directory, stage=self.stage)
            self.print(f"adapter written to {directory}")

    def resolved_adapter_dir(self) -> Path:
        if self.adapter_dir is not None:
            return Path(self.adapter_dir)
        base = self.trainer.log_dir or self.trainer.default_root_dir
        return Path(base) / "adapter"

    # --- steps -------------------------------------------------------------------------------------
    def _step(self, batch: dict[str, Any] | None, split: str) -> torch.Tensor | None:
        if batch is None:  # every item of this batch was skipped as bad input
            return None
        if batch["skipped"]:
            self.log(f"{split}/skipped_media", float(len(batch["skipped"])), reduce_fx="sum", on_epoch=True,
                     on_step=False, batch_size=1)
        if self.stage == 0:
            return self._pretrain_step(batch, split)
        out = self.model(batch["input_ids"], batch["attention_mask"], batch["media"], batch["labels"],
                         media_text=batch.get("media_text"))
        tokens = int((batch["labels"] != -100).sum())
        self.log(f"{split}/loss", out.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0],
                 on_step=split == "train", on_epoch=split != "train", sync_dist=split != "train")
        if split == "train":
            self.log("train/target_tokens", float(tokens), on_step=True, batch_size=1)
        return out.loss

    def _pretrain_step(self, batch: dict[str, Any], split: str) -> torch.Tensor:
        out = self.pretrainer(
            batch["media"], batch["text_ids"], batch["text_mask"], batch["pair_keys"],
            batch["instruction_ids"], batch["instruction_mask"],
            answers=batch["answers"],
            **({k: batch[k] for k in ("flipped_ids", "flipped_mask", "has_flipped")} if self.flipped_negatives else {}),
        )
        size = batch["media"].shape[0]
        on_step, sync = split == "train", split != "train"
        self.log(f"{split}/loss", out.loss, prog_bar=True, batch_size=size, on_step=on_step, on_epoch=not on_step,
                 sync_dist=sync)
        for name in ("itc", "itm", "itg", "itm_accuracy", "qa_itm", "qa_itm_accuracy"):
            value = getattr(out, name)
            if value is not None:
                self.log(f"{split}/{name}", value, batch_size=size, on_step=on_step, on_epoch=not on_step, sync_dist=sync)
        return out.loss

    def training_step(self, batch: dict[str, Any] | None, batch_idx: int) -> torch.Tensor | None:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        self._step(batch, "val")

    # --- optimisation ------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups over trainable parameters only, with no decay on biases/norms/query tokens."""
        decay, no_decay = [], []
        for name, parameter in self.named_parameters():
            if not parameter.requires_grad:
                continue
            if parameter.ndim < 2 or any(marker in name for marker in NO_DECAY_MARKERS):
                no_decay.append(parameter)
            else:
                decay.append(parameter)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.hparams.lr, betas=tuple(self.hparams.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = self.hparams.warmup_steps
        warmup_steps = int(math.ceil(warmup * total)) if warmup < 1 else int(warmup)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
