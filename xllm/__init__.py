"""xllm: modality interfaces that turn images, video and speech into foreign-language tokens for a frozen LLM."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from xllm import XLLM` without importing torch and transformers on a bare `import xllm`.
    if name == "XLLM":
        from xllm.model import XLLM

        return XLLM
    raise AttributeError(f"module 'xllm' has no attribute {name!r}")
