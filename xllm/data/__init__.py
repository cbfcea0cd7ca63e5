"""Data: the conversation format, chat templates, tokenization with label masking, media loading, batching."""

from xllm.data.collator import ConversationCollator
from xllm.data.dataset import ConversationDataset, build_tokenized_dataset
from xllm.data.processor import IGNORE_INDEX, ConversationProcessor
from xllm.data.records import BadSamples, BadSampleError, read_records

__all__ = [
    "IGNORE_INDEX",
    "BadSampleError",
    "ConversationCollator",
    "ConversationDataset",
    "ConversationProcessor",
    "BadSamples",
    "build_tokenized_dataset",
    "read_records",
]
