"""xllm as an lmms-eval model: `lmms-eval eval --model xllm --model_args adapter=DIR[,device=cuda,dtype=bfloat16]`.

lmms-eval finds this class through the `lmms_eval.models` entry point xllm declares (`manifest`, below); nothing of
lmms-eval is edited. It is a chat model (`is_simple = False`): each request brings the task's messages, whose
images, videos and audio become the adapter's media (an image as a PNG, audio as a 16-bit WAV, in a temporary
folder, so they reach the interfaces through the same loaders as files do), and `generate_until` answers them
greedily (or with the request's temperature) through `XLLM.generate`, in batches of `batch_size`.

Installing lmms-eval 0.7.3 into xllm's pinned set would downgrade `av` and `wandb`, so it is the `lmms-eval` extra
for users, and `make test` puts it beside the venv instead (`.cache/lmms-eval-site`, see the Makefile).
"""

from __future__ import annotations

import tempfile
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xllm.extras import import_optional
from xllm.model import XLLM

import_optional("lmms_eval", "lmms-eval", "xllm's lmms-eval model")
from lmms_eval.api.model import lmms  # noqa: E402
from lmms_eval.models.registry_v2 import ModelManifest  # noqa: E402
from lmms_eval.protocol import ChatMessages  # noqa: E402

MODEL_ID = "xllm"
MEDIA_TYPES = {"image": "image", "video": "video", "audio": "audio"}  # lmms-eval content type -> xllm modality


def manifest() -> ModelManifest:
    """What the `lmms_eval.models` entry point gives lmms-eval: the model id and this class."""
    return ModelManifest(model_id=MODEL_ID, chat_class_path=f"{__name__}.XLLMLmms")


def write_media(kind: str, value: Any, folder: Path, index: int) -> str:
    """A path for one media item of a request: a path as it is, a PIL image as PNG, audio arrays as WAV."""
    if isinstance(value, (str, Path)):
        return str(value)
    if kind == "image" and hasattr(value, "save"):
        path = folder / f"media_{index}.png"
        value.convert("RGB").save(path)
        return str(path)
    if kind == "audio" and isinstance(value, dict) and "array" in value:
        path = folder / f"media_{index}.wav"
        samples = np.clip(np.asarray(value["array"], dtype=np.float32), -1.0, 1.0)
        with wave.open(str(path), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(int(value["sampling_rate"]))
            out.writeframes((samples * 32767).astype("<i2").tobytes())
        return str(path)
    raise ValueError(f"xllm's lmms-eval model cannot read a {kind} given as {type(value).__name__}")


class XLLMLmms(lmms):
    """An xllm adapter evaluated by lmms-eval.

    Args:
        adapter: the adapter directory.
        device: `cpu` (default), `cuda`, `cuda:1`...
        dtype: dtype of the frozen LLM and encoders (`bfloat16` on a GPU; float32 on a CPU).
        llm: load the frozen LLM from here instead of the adapter's path.
        batch_size: requests generated together.
    """

    is_simple = False

    def __init__(self, adapter: str, device: str | None = None, dtype: str | None = None, llm: str | None = None,
                 batch_size: int | str = 8, **ignored: Any) -> None:
        super().__init__()
        self.model = XLLM.from_pretrained(adapter, llm=llm, device=device, dtype=dtype)
        self.batch_size_per_gpu = int(batch_size)

    def _conversation(self, messages: ChatMessages, folder: Path, first: int) -> tuple[list[dict], dict[str, list]]:
        """xllm turns (placeholders where the media stood) and media paths of one request's messages."""
        turns, media, count = [], {}, first
        for message in messages.messages:
            value = ""
            for content in message.content:
                if content.type == "text":
                    value += content.text
                    continue
                modality = MEDIA_TYPES[content.type]
                if modality not in self.model.interfaces:
                    raise ValueError(f"the task sends {content.type}, but this adapter reads "
                                     f"{sorted(self.model.interfaces)}")
                media.setdefault(modality, []).append(write_media(content.type, content.url, folder, count))
                value += self.model.interfaces[modality].placeholder + "\n"
                count += 1
            turns.append({"from": message.role, "value": value})
        return turns, media

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        replies: list[str] = []
        with tempfile.TemporaryDirectory(prefix="xllm-lmms-") as scratch:
            for start in range(0, len(requests), self.batch_size_per_gpu):
                chunk = requests[start:start + self.batch_size_per_gpu]
                conversations, media, settings = [], [], []
                for offset, request in enumerate(chunk):
                    _, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
                    messages = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
                    turns, paths = self._conversation(messages, Path(scratch), 100 * (start + offset))
                    conversations.append(turns)
                    media.append(paths)
                    settings.append(gen_kwargs)
                replies += self._generate(conversations, media, settings)
        return replies

    def _generate(self, conversations: list, media: list, settings: list[dict]) -> list[str]:
        """One batch; stop strings (`until`) cut each reply; the longest `max_new_tokens` of the batch is used."""
        temperature = max(float(s.get("temperature") or 0) for s in settings)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
        max_new_tokens = max(int(s.get("max_new_tokens", 64)) for s in settings)
        replies = self.model.reply(conversations, media, max_new_tokens=max_new_tokens, **sampling)
        out = []
        for reply, gen_kwargs in zip(replies, settings):
            until = gen_kwargs.get("until") or []
            for stop in [until] if isinstance(until, str) else until:
                reply = reply.split(stop)[0] if stop else reply
            out.append(reply)
        return out

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError("xllm's lmms-eval model generates answers (generate_until); loglikelihood tasks "
                                  "are not supported: use generation tasks, as MME's are")

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        raise NotImplementedError("xllm's lmms-eval model answers one round per request (generate_until)")
