"""Modality interfaces: each turns one kind of media into LLM-space token embeddings (see `base.py`, the contract)."""

from xllm.blocks.bridge import QFormerBridge
from xllm.blocks.qformer import QFormer
from xllm.interfaces.base import MediaBatch, ModalityInterface, ModalityTokens, PretrainableInterface, placeholder
from xllm.interfaces.image import ImageInterface
from xllm.interfaces.speech import SpeechInterface
from xllm.interfaces.video import VideoInterface

__all__ = ["ImageInterface", "MediaBatch", "ModalityInterface", "ModalityTokens", "PretrainableInterface", "QFormer",
           "QFormerBridge", "SpeechInterface", "VideoInterface", "placeholder"]
