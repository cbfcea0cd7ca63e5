"""Modality interfaces: each turns one kind of media into LLM-space token embeddings.

`base.py` is the contract; `image.py`, `video.py` and `speech.py` are xllm's modalities, composed of trainable
`xllm.blocks` and frozen `xllm.encoders`; `catalog.py` lists them once and finds those of installed packages.
"""

from xllm.interfaces.base import MediaBatch, ModalityInterface, ModalityTokens, PretrainableInterface, placeholder
from xllm.interfaces.image import ImageInterface
from xllm.interfaces.speech import SpeechInterface
from xllm.interfaces.video import VideoInterface

__all__ = ["ImageInterface", "MediaBatch", "ModalityInterface", "ModalityTokens", "PretrainableInterface",
           "SpeechInterface", "VideoInterface", "placeholder"]
