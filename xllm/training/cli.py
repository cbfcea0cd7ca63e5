"""`python train.py fit --config configs/tiny/common.yaml --config configs/tiny/stage1.yaml` (also the
`xllm-train` console script), via LightningCLI.

The config chooses the LightningModule (`model.class_path`): `xllm.training.InterfacePretrainingModule` for
stage 0, `xllm.training.XLLMModule` for stages 1-2. Several `--config` files merge in order, so a shared file
(trainer defaults, the interface) and a per-stage file compose instead of copying.
"""

from __future__ import annotations

import importlib
import os
import warnings

from pytorch_lightning.cli import LightningCLI

from xllm.training.base import TrainingModule
from xllm.training.datamodule import XLLMDataModule
from xllm.training.throughput import ThroughputLogger


class XLLMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.logger": _default_logger()})
        # Throughput/MFU logging is on in every run (set `throughput.peak_tflops` for MFU).
        parser.add_lightning_class_args(ThroughputLogger, "throughput")

    def before_instantiate_classes(self) -> None:
        # The model is built before the trainer: only here are both known. Sharded, an XLLMModule builds its LLM on
        # the meta device and each rank reads only its shards (`meta_llm`), unless the config says otherwise.
        config = self.config[self.subcommand] if self.subcommand else self.config
        model = config.get("model")
        arguments = getattr(model, "init_args", None)
        if arguments is not None and "meta_llm" in arguments and arguments.get("meta_llm") is None \
                and arguments.get("llm_quantization") is None and _sharded(config.get("trainer.strategy")):
            arguments["meta_llm"] = True


def _sharded(strategy: object) -> bool:
    """Whether the configured strategy is Lightning's `ModelParallelStrategy` (xllm's `ShardedStrategy`) or a
    subclass."""
    from pytorch_lightning.strategies import ModelParallelStrategy

    if isinstance(strategy, ModelParallelStrategy):
        return True
    class_path = getattr(strategy, "class_path", None)
    if not isinstance(class_path, str):
        return False
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False  # jsonargparse names the bad class path itself when it instantiates it
    return isinstance(cls, type) and issubclass(cls, ModelParallelStrategy)


def _default_logger() -> dict:
    # W&B runs offline (a local folder, no network) unless the user configures a project or a key.
    project = os.environ.get("WANDB_PROJECT")
    if not project and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    return {
        "class_path": "pytorch_lightning.loggers.WandbLogger",
        "init_args": {"project": project or "xllm", "save_dir": "runs"},
    }


# The frozen LLM and encoders are in eval mode on purpose (frozen means frozen); Lightning warns about it.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def main(args: list[str] | None = None) -> XLLMCLI:
    return XLLMCLI(
        TrainingModule, XLLMDataModule, subclass_mode_model=True, save_config_kwargs={"overwrite": True}, args=args,
    )


if __name__ == "__main__":
    main()
