"""Training code (Lightning): the module for stages 1 and 2, the DataModule and the CLI."""

from xllm.training.datamodule import XLLMDataModule
from xllm.training.module import XLLMModule

__all__ = ["XLLMDataModule", "XLLMModule"]
