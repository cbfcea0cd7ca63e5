"""xllm: modality interfaces that turn images, video and speech into foreign-language tokens for a frozen LLM."""

__version__ = "0.1.0"
