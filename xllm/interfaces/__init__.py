"""Modality interfaces: each turns one kind of media into LLM-space token embeddings."""

from xllm.interfaces.base import ModalityInterface
from xllm.interfaces.image import ImageInterface
from xllm.interfaces.qformer import QFormer

__all__ = ["ImageInterface", "ModalityInterface", "QFormer"]
