"""Training code (Lightning): stage 0 (`InterfacePretrainingModule`), stages 1-2 (`XLLMModule`), the DataModule, the CLI."""

from xllm.training.base import TrainingModule
from xllm.training.datamodule import XLLMDataModule
from xllm.training.module import XLLMModule
from xllm.training.stage0 import InterfacePretrainingModule

__all__ = ["InterfacePretrainingModule", "TrainingModule", "XLLMDataModule", "XLLMModule"]
