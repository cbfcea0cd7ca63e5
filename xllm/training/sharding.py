"""Sharded training: FSDP2 (`torch.distributed.fsdp.fully_shard`) through Lightning's `ModelParallelStrategy`.

Select it in YAML (`configs/sharding/fsdp2.yaml`):

    trainer:
      strategy:
        class_path: xllm.training.sharding.ShardedStrategy
        init_args: {data_parallel_size: 2}

Each rank then holds 1/N of the frozen LLM: every decoder layer is its own FSDP2 unit, all-gathered for its
forward and backward and freed after. LoRA's A and B layers are units of their own, so fp32 LoRA can sit beside a
bf16 base (a unit is gathered in one dtype: LlamaFactory PR #10157's error with FSDP1). FSDP2 shards parameter by
parameter, so a unit may hold frozen and trainable parameters without FSDP1's flat-parameter limits (pytorch#104690)
or its gradient memory (litgpt#1417): gradients exist for trainable parameters only, 1/N of them per rank.

Each interface is a unit, and so is each block of its frozen encoder (a ViT's or Whisper's layers, by their
`_no_split_modules`). A unit is gathered from every rank when its forward runs, so every rank must run the same
interfaces at every step: a rank whose batch lacks a modality another rank's holds runs that interface on one
all-zero stand-in item and adds its output to the loss times zero (`XLLM.every_interface_runs`,
`xllm.interfaces.placeholders`); a modality no rank holds runs nowhere. Cache the encoders' features
(`feature_cache`) to keep big encoders out of the step. Stage 0 has no LLM and runs its one interface on every
rank at every step: there the encoder's and the Q-Former's layers are units (`shard_pretraining`). The optimizer is
built after sharding (Lightning calls `configure_model` first), so it holds the sharded parameters (Lightning#17515).

Checkpoints (for `--ckpt_path`) hold the trainable parameters and the optimizer state only, sharded, in a folder;
the adapter written at the end holds full tensors, as a one-process run's.

The LLM itself is never whole on a rank: `train.py` has `XLLMModule` build it on the meta device (`meta_llm`), it is
sharded here, and each rank then reads only its own rows from the safetensors (`xllm.llm.fill_from_checkpoint`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn


def hf_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of the transformers models inside `model`: the modules each declares unsplittable
    (`_no_split_modules`: an LLM's decoder layers, a ViT's or Whisper encoder's layers and embeddings)."""
    names = {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or []}
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    inner = {id(m) for block in blocks for m in block.modules() if m is not block}
    return [m for m in blocks if id(m) not in inner]  # the outermost (BLIP-2 lists attention inside its layers)


def decoder_layers(llm: nn.Module) -> list[nn.Module]:
    """The LLM's transformer blocks (`hf_blocks`); an LLM that declares none cannot be sharded by layer."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    layers = hf_blocks(base)
    if not layers:
        raise ValueError(f"{type(base).__name__} declares no decoder layer class (_no_split_modules): cannot shard it")
    return layers


def lora_layers(llm: nn.Module) -> list[nn.Module]:
    """peft's LoRA A and B layers (`...lora_A.default`), whose forward peft calls."""
    return [m for name, m in llm.named_modules() if re.search(r"\.lora_[AB]\.[^.]+$", name)]


def cast_frozen(model: nn.Module, frozen_dtype: torch.dtype | None) -> None:
    """Frozen parameters to `frozen_dtype` (bf16 on GPUs halves the gathered bytes); trainable ones keep theirs
    (fp32), and so does the optimizer state."""
    if frozen_dtype is not None:
        for parameter in model.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(frozen_dtype)


def shard_model(model: nn.Module, mesh: Any, frozen_dtype: torch.dtype | None = None) -> None:
    """Apply FSDP2 to an `XLLM` in place: LoRA layers, decoder layers, each interface's encoder blocks, each interface,
    then the root (see the module docstring)."""
    from torch.distributed.fsdp import fully_shard

    cast_frozen(model, frozen_dtype)
    for layer in lora_layers(model.llm):
        fully_shard(layer, mesh=mesh)
    for layer in decoder_layers(model.llm):
        fully_shard(layer, mesh=mesh)
    for interface in model.interfaces.values():
        encoder = getattr(interface, "encoder", None)
        for block in hf_blocks(encoder) if isinstance(encoder, nn.Module) else []:
            fully_shard(block, mesh=mesh)
        # Kept whole from its forward to the end of the backward: its output (`ModalityTokens`) is no tensor FSDP2
        # can hook to gather it again for the backward, and it is small beside the encoder and the LLM.
        fully_shard(interface, mesh=mesh, reshard_after_forward=False)
    model.every_interface_runs = True  # the same interfaces on every rank at every step (interfaces/placeholders.py)
    fully_shard(model, mesh=mesh)


def shard_pretraining(module: nn.Module, mesh: Any, frozen_dtype: torch.dtype | None = None) -> None:
    """Apply FSDP2 to stage 0's module (`InterfacePretrainingModule`) in place: the frozen encoder's blocks, then the
    Q-Former's layers, each a unit; then the module itself, the root: the rest of the interface with the objective's
    heads, gathered around its `forward`.

    Stage 0 runs its one interface on every rank at every step, so it needs no stand-in items. Only modules whose
    `forward` runs can be units: the objective reads the Q-Former through `joint`/`encode_text` and its word table
    directly, so the Q-Former's layers are units and its embeddings stay in the root."""
    from torch.distributed.fsdp import fully_shard

    interface = module.interface
    cast_frozen(module, frozen_dtype)
    encoder = getattr(interface, "encoder", None)
    for block in hf_blocks(encoder) if isinstance(encoder, nn.Module) else []:
        fully_shard(block, mesh=mesh)
    qformer = getattr(getattr(interface, "bridge", None), "qformer", None)
    for layer in qformer.model.encoder.layer if qformer is not None else []:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)


def gather_for_saving(*owners: nn.Module) -> None:
    """Make the parameters of `owners` (the interfaces, LoRA's layers) whole again on every rank, once training is
    over, so that rank 0 writes the same adapter a one-process run writes (the interfaces' frozen pieces, such as a
    Q-Former's text embeddings, included). A collective: every rank calls it. The LLM's layers stay sharded: they
    are never saved."""
    from xllm.tensors import is_sharded

    for owner in owners:
        for module in owner.modules():
            for name, parameter in list(module._parameters.items()):
                if parameter is not None and is_sharded(parameter):
                    module._parameters[name] = nn.Parameter(parameter.full_tensor(),
                                                            requires_grad=parameter.requires_grad)


class ShardedStrategy(ModelParallelStrategy):
    """Lightning's `ModelParallelStrategy` (FSDP2 over `data_parallel_size` ranks, no tensor parallelism by default)
    whose checkpoints hold trainable parameters and optimizer state only.

    Args:
        data_parallel_size: ranks the model is sharded over ("auto": every device of every node).
        tensor_parallel_size: 1 (xllm applies no tensor parallelism).
        frozen_dtype: `bfloat16` casts the frozen LLM and encoders (GPUs); null keeps their loaded dtype.
        save_distributed_checkpoint: write each rank's shards (a folder) rather than one gathered file.
        process_group_backend: `nccl` on GPUs, `gloo` on CPUs (default: by accelerator).
    """

    def __init__(self, data_parallel_size: int | str = "auto", tensor_parallel_size: int | str = 1,
                 frozen_dtype: str | None = None, save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None, **kwargs: Any) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)
        self.frozen_dtype = getattr(torch, frozen_dtype) if frozen_dtype else None

    def setup_environment(self) -> None:
        # Lightning's "auto" data-parallel size is the node count (its tensor-parallel "auto" takes each node's
        # devices); xllm shards over every rank instead.
        if self._data_parallel_size == "auto" and self._tensor_parallel_size == 1:
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=not self._save_distributed_checkpoint, cpu_offload=True,
                                   ignore_frozen_params=True)
        return get_model_state_dict(self.model, options=options)

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """A checkpoint this strategy wrote: trainable parameters and optimizer state into the sharded model."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():
            raise ValueError(f"{path}: not a sharded checkpoint folder (written by ShardedStrategy with "
                             "save_distributed_checkpoint: true)")
        options = StateDictOptions(ignore_frozen_params=True)
        state = {"state_dict": get_model_state_dict(self.model, options=options)}
        state.update({f"optimizer_{i}": get_optimizer_state_dict(self.model, o, options=options)
                      for i, o in enumerate(self.optimizers)})
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(self.model, state["state_dict"], options=StateDictOptions(strict=False))
        for i, optimizer in enumerate(self.optimizers):
            set_optimizer_state_dict(self.model, optimizer, state[f"optimizer_{i}"], options=options)
        from lightning_fabric.strategies.model_parallel import _METADATA_FILENAME

        metadata = torch.load(path / _METADATA_FILENAME, weights_only=True)
        metadata["state_dict"] = state["state_dict"]  # what was loaded, for the module's check of its names
        return metadata
