"""The LightningModule for stages 1 and 2: interfaces (and optional LoRA) trained through a frozen LLM.

Stage 1 (alignment on caption/transcript pairs) and stage 2 (instruction tuning) train the same things —
each interface's bridge (Q-Former, queries, feature LayerNorm, positions, projection) — and stage 2 may add
LoRA. The LLM and encoders are frozen (see `base.py`); the adapter written after fit holds trainable tensors
only. Stage 0 is `pretrain.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn

from xllm.adapters.compose import compose_configs
from xllm.adapters.format import load_weights
from xllm.adapters.load import build_interface
from xllm.data.collator import ConversationCollator
from xllm.data.dataset import ConversationDataset, build_tokenized_dataset
from xllm.data.records import BadSamples
from xllm.data.streaming import StreamingConversations
from xllm.interfaces.base import ModalityInterface
from xllm.llm import (
    LlmQuantization,
    LoraSettings,
    build_frozen_llm,
    fill_from_checkpoint,
    llm_hidden_size,
    load_tokenizer,
)
from xllm.model import XLLM
from xllm.tensors import IGNORE_INDEX
from xllm.training.base import TrainingModule
from xllm.training.checkpointing import checkpoint_blocks
from xllm.training.sharding import decoder_layers, gather_for_saving, lora_layers, shard_model


class XLLMModule(TrainingModule):
    """Trains the interfaces (and optional LoRA) of an `XLLM` whose LLM stays frozen.

    Args:
        llm: path (or hub id) of the chat LLM, loaded with `AutoModelForCausalLM`.
        interfaces: modality -> interface, e.g. `{"image": {"class_path": "xllm.interfaces.ImageInterface", ...}}`.
        stage: 1 trains interfaces + projections on caption pairs; 2 instruction-tunes (LoRA allowed).
        template: chat template: `tokenizer` (the tokenizer's own), `vicuna_v1` or `glm4`.
        system_prompt: optional system message for every conversation.
        llm_dtype: dtype of the frozen LLM (`float32` on CPU; `bfloat16` on GPUs).
        trust_remote_code: allow hub remote code (ChatGLM-6B/2/3); off unless you set it.
        lora: LoRA settings for stage 2 (null: no LoRA).
        max_length: longest sequence, text plus modality tokens.
        init_adapters: modality -> a trained adapter whose interface (and its tensors) starts this model's, to compose
            adapters trained on their own (`{image: DIR, video: DIR, audio: DIR}`); they must share this model's
            frozen LLM and chat template (see `xllm.adapters.compose`). A modality left out of `interfaces` is
            built as its adapter describes it.
        interface_lr_scale: modality -> factor on `lr` for that interface, e.g. `{image: 0.1, video: 0.1}` to tune
            a speech interface at full rate beside pictures' interfaces that should barely move (joint demo).
        meta_llm: build the frozen LLM on the meta device (no memory) and read its weights in `configure_model`:
            under `ShardedStrategy` after sharding, each rank reading only the rows it keeps, so no rank ever holds
            the whole LLM; otherwise whole. null: on when `train.py` runs under `ShardedStrategy`, off otherwise.
        llm_quantization: quantise the frozen LLM as it loads, e.g. `{bits: 8}` (int8 weights through torchao on a
            CPU, bitsandbytes on a GPU) or `{bits: 4}` (NF4 through bitsandbytes: QLoRA); see `LlmQuantization`.
            The adapter records it, holds trained tensors only, and loads onto a quantised or a full base.
        activation_checkpointing: keep only each frozen LLM decoder layer's input for the backward and recompute
            the layer there (less activation memory for long sequences, ~1 more forward per step); with LoRA and
            FSDP2 too. The encoders run without gradients, so they keep no activations to drop.
        interface_overrides: modality -> init args replacing those an `init_adapters` adapter stores, e.g.
            `{image: {feature_cache: .cache/features/mobilenet-v2}}` (an adapter keeps no training-time cache).
        **training: `TrainingModule`'s settings (init_adapter, adapter_dir, lr, weight_decay, betas, warmup_steps,
            lr_schedule).
    """

    def __init__(
        self,
        llm: str,
        interfaces: dict[str, ModalityInterface] | None = None,
        stage: Literal[1, 2] = 1,
        template: str = "tokenizer",
        system_prompt: str | None = None,
        llm_dtype: str = "float32",
        trust_remote_code: bool = False,
        lora: LoraSettings | None = None,
        max_length: int = 2048,
        init_adapters: dict[str, str] | None = None,
        interface_overrides: dict[str, dict[str, Any]] | None = None,
        interface_lr_scale: dict[str, float] | None = None,
        meta_llm: bool | None = None,
        llm_quantization: LlmQuantization | None = None,
        activation_checkpointing: bool = False,
        **training: Any,
    ) -> None:
        interfaces = dict(interfaces or {})
        composed = compose_configs(init_adapters, interface_overrides=interface_overrides) if init_adapters else None
        for modality, spec in (composed or {}).get("interfaces", {}).items():
            if modality not in interfaces:
                interfaces[modality] = build_interface(modality, spec)
        if not interfaces:
            raise ValueError("no interfaces: give `interfaces`, or `init_adapters` to build them from trained adapters")
        super().__init__(interfaces, **training)
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2 (stage 0 is xllm.training.InterfacePretrainingModule), got {stage}")
        if lora is not None and stage != 2:
            raise ValueError("lora is for stage 2 (instruction tuning); stage 1 keeps the LLM untouched")
        self.save_hyperparameters(ignore=["interfaces"])
        self.stage, self.max_length = stage, max_length
        self.interface_lr_scale = dict(interface_lr_scale or {})
        unknown = sorted(set(self.interface_lr_scale) - set(interfaces))
        if unknown:
            raise ValueError(f"interface_lr_scale names {unknown}, but this run's interfaces are {sorted(interfaces)}")
        self.meta_llm = bool(meta_llm)
        self.llm_bytes_read = 0  # by this rank, when `meta_llm` fills the LLM (`RankMemory` reports it)
        if self.meta_llm and llm_quantization is not None:
            raise ValueError("meta_llm reads the LLM's full-precision weights into shards; a quantised LLM "
                             "(llm_quantization) is loaded whole by each rank: set one of them")
        if self.meta_llm:
            self.model = XLLM(build_frozen_llm(llm, llm_dtype, trust_remote_code), load_tokenizer(llm, trust_remote_code),
                              interfaces, template=template, system_prompt=system_prompt, llm_path=llm,
                              llm_dtype=llm_dtype, trust_remote_code=trust_remote_code)
        else:
            self.model = XLLM.from_paths(
                llm, interfaces, llm_dtype=llm_dtype, trust_remote_code=trust_remote_code,
                template=template, system_prompt=system_prompt, llm_quantization=llm_quantization,
            )
        if lora is not None:
            self.model.enable_lora(lora)
        if activation_checkpointing:
            checkpoint_blocks(decoder_layers(self.model.llm))
        if self.init_adapter is not None:
            # After LoRA is in place, so a stage-2 adapter (with LoRA tensors) can be resumed too.
            load_weights(self.model, self.init_adapter, strict=False)
        if composed is not None:
            if composed["template"] != template or composed["llm"]["hidden_size"] != llm_hidden_size(self.model.llm):
                raise ValueError(
                    f"init_adapters {dict(init_adapters)} were trained with template {composed['template']!r} for an "
                    f"LLM of hidden size {composed['llm']['hidden_size']}; this run has template {template!r} and "
                    f"{llm} (hidden size {llm_hidden_size(self.model.llm)})")
            for modality, directory in init_adapters.items():
                if modality not in self.model.interfaces:
                    raise ValueError(f"init_adapters names {modality!r}, but this run's interfaces are "
                                     f"{sorted(self.model.interfaces)}")
                load_weights(self.model, directory, strict=True, prefix=f"interfaces.{modality}.")
        llm_params = list(self.model.llm.parameters())
        # litgpt's rule: trained parameters cost 6 FLOPs per token they touch, frozen LLM weights 4 (gradients
        # still flow through them to the spliced inputs). Interface parameters are counted per media token.
        self._flop_counts = (
            sum(p.numel() for p in llm_params if not p.requires_grad),
            sum(p.numel() for p in llm_params if p.requires_grad),
            sum(p.numel() for p in self.model.interfaces.parameters() if p.requires_grad),
        )

    @property
    def stage_name(self) -> str:
        return f"stage {self.stage}"

    def frozen_modules(self) -> list[nn.Module]:
        return self.model.frozen_modules()

    def build_dataset(
        self, path: str, media_root: str | None, bad_samples: BadSamples, allow_outside_root: bool = False,
    ) -> ConversationDataset:
        rows = build_tokenized_dataset(path, self.model.processor(self.max_length).text, media_root, bad_samples,
                                       allow_outside_root)
        for modality, interface in self.model.interfaces.items():
            interface.prepare_media([p for media in rows["media"] for p in (media.get(modality) or [])])
        loaders = {m: i.media_loader() for m, i in self.model.interfaces.items()}
        return ConversationDataset(rows, loaders, bad_samples)

    def build_streaming_dataset(self, shards: str | list[str], media_root: str | None, bad_samples: BadSamples,
                                allow_outside_root: bool = False, seed: int = 0, rank: int = 0,
                                world_size: int = 1, batch_size: int = 1) -> StreamingConversations:
        loaders = {m: i.media_loader() for m, i in self.model.interfaces.items()}
        stream = StreamingConversations(shards, self.model.processor(self.max_length).text, loaders, media_root,
                                        bad_samples, allow_outside_root, seed, rank, world_size, batch_size)
        for modality, interface in self.model.interfaces.items():
            if getattr(interface, "cache", None) is not None:  # one pass over the shards' text fills the cache
                for paths in stream.media_paths(modality):
                    interface.prepare_media(paths)
        return stream

    def collator(self) -> ConversationCollator:
        return self.model.processor().collator

    def lr_scale(self, name: str) -> float:
        parts = name.split(".")  # model.interfaces.<modality>.<...>
        if parts[:2] == ["model", "interfaces"] and len(parts) > 2:
            return self.interface_lr_scale.get(parts[2], 1.0)
        return 1.0

    def setup(self, stage: str) -> None:
        # Under DDP every rank gives every trained parameter a gradient at every step (`every_interface_in_loss`);
        # sharded, every rank runs the same interfaces instead (`shard_model` sets `every_interface_runs`).
        sharded = isinstance(self.trainer.strategy, ModelParallelStrategy)
        self.model.every_interface_in_loss = self.trainer.world_size > 1 and not sharded
        # DDP broadcasts rank 0's parameters and buffers when it wraps the module: for the frozen LLM that is a
        # copy of what every rank has just read from the same files (13.5 GB for a 7B LLM in bf16), and quantised
        # weights cannot be broadcast at all (torchao's int8 tensors have no `view`). DDP skips the names listed here.
        self._ddp_params_and_buffers_to_ignore = [
            f"model.{name}" for name, p in self.model.named_parameters() if not p.requires_grad] + [
            f"model.llm.{name}" for name, _ in self.model.llm.named_buffers()]

    def save_result(self, directory: Path) -> None:
        if self.is_sharded:  # every rank comes here: the interfaces and LoRA are gathered whole, rank 0 writes
            gather_for_saving(self.model.interfaces, *lora_layers(self.model.llm))
        if self.trainer.is_global_zero:
            self.model.save_pretrained(directory, stage=self.stage, trained_on=self.trained_on())

    def configure_model(self) -> None:
        """Under `ShardedStrategy` (FSDP2), shard the model before the optimizer is built (see `sharding.py`); then
        read a meta-device LLM's weights (`meta_llm`): each rank its shards, or the whole LLM without sharding."""
        strategy = self.trainer.strategy
        if isinstance(strategy, ModelParallelStrategy) and not self.is_sharded:
            if getattr(self.model.llm, "xllm_quantization", None):
                raise ValueError("llm_quantization under ShardedStrategy: FSDP2 does not shard torchao's or "
                                 "bitsandbytes' quantised weights here; train a quantised LLM with DDP (each rank "
                                 "holds the quantised base), or shard the full-precision one")
            shard_model(self.model, strategy.device_mesh["data_parallel"], getattr(strategy, "frozen_dtype", None))
        if self.meta_llm:
            self.llm_bytes_read += fill_from_checkpoint(self.model.llm, self.model.llm_path)

    def step(self, batch: dict[str, Any] | None, split: str) -> dict[str, Any] | None:
        if batch is None:  # every item of this batch was skipped as bad input
            return None
        self.log_skipped(batch, split)
        out = self.model(batch["input_ids"], batch["attention_mask"], batch["media"], batch["labels"])
        size = batch["input_ids"].shape[0]
        # Over several ranks the logged training loss is their mean (the loss of the global batch when every rank's
        # batch has as many answer tokens), not rank 0's alone.
        self.log(f"{split}/loss", out.loss, prog_bar=True, batch_size=size, on_step=split == "train",
                 on_epoch=split != "train", sync_dist=split != "train" or self.trainer.world_size > 1)
        if split == "train":
            self.log("train/target_tokens", float((batch["labels"] != IGNORE_INDEX).sum()), on_step=True, batch_size=1)
        llm_frozen, llm_trained, interface_trained = self._flop_counts
        flops = out.tokens * (4 * llm_frozen + 6 * llm_trained) + out.media_tokens * 6 * interface_trained
        return {"loss": out.loss, "sequences": size, "tokens": out.tokens, "flops": flops}
