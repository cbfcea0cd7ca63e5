"""Data: the conversation format, chat templates, tokenization with label masking, media loading, batching."""

from xllm.data.collator import ConversationCollator
from xllm.data.dataset import ConversationDataset, build_tokenized_dataset
from xllm.data.processor import ConversationProcessor
from xllm.data.records import BadSampleError, BadSamples, read_records

__all__ = [
    "BadSampleError",
    "ConversationCollator",
    "ConversationDataset",
    "ConversationProcessor",
    "BadSamples",
    "build_tokenized_dataset",
    "read_records",
]
