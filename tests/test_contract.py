"""The README's promise: a new modality is one `ModalityInterface` subclass plus one config entry.

A fake third modality with variable-length items (1-D signals in `.npy` files, one token per 4 samples) goes
through records -> processor -> collator -> `XLLM` loss -> Lightning fit -> adapter save/load -> `chat`,
with items of different token counts in one batch. Everything it needs is in this file.
"""

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from xllm.data.dataset import ConversationDataset, build_tokenized_dataset
from xllm.interfaces.base import MediaBatch, ModalityInterface, ModalityTokens
from xllm.model import XLLM
from xllm.training import XLLMDataModule, XLLMModule


class SignalInterface(ModalityInterface):
    """A 1-D signal becomes one LLM token per `chunk` samples (so tokens are proportional to its length)."""

    modality = "signal"

    def __init__(self, chunk: int = 4, hidden: int = 16, longest: int = 64) -> None:
        super().__init__()
        self.chunk, self.longest = chunk, longest
        self.encoder = nn.Linear(chunk, hidden)
        self.projection: nn.Module | None = None

    @property
    def max_tokens(self) -> int:
        return self.longest // self.chunk

    def attach(self, llm_hidden_size: int) -> None:
        self.projection = nn.Linear(self.encoder.out_features, llm_hidden_size)

    def load_media(self, path: str) -> torch.Tensor:
        signal = torch.from_numpy(np.load(path)).float()
        if signal.ndim != 1 or len(signal) % self.chunk or len(signal) > self.longest:
            raise ValueError(f"{path}: expected a 1-D signal of a multiple of {self.chunk} samples, ≤ {self.longest}")
        return signal.reshape(-1, self.chunk)  # [tokens, chunk]: items differ in their first axis

    def forward(self, media: MediaBatch) -> ModalityTokens:
        values = media.values["values"]
        lengths = media.lengths if media.lengths is not None else torch.full((len(media),), values.shape[1])
        return ModalityTokens(self.projection(torch.tanh(self.encoder(values))), lengths.to(values.device))


LENGTHS = {"short": 8, "long": 20}  # 2 and 5 tokens


@pytest.fixture
def signal_data(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for index in range(8):
        name = "short" if index % 2 == 0 else "long"
        np.save(tmp_path / f"s{index}.npy", rng.normal(size=LENGTHS[name]).astype(np.float32))
        rows.append({"id": f"s{index}", "signal": f"s{index}.npy", "conversations": [
            {"from": "human", "value": "<signal>\nIs the signal long?"},
            {"from": "gpt", "value": "Yes" if name == "long" else "No"}]})
    path = tmp_path / "signals.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_a_variable_length_modality_goes_all_the_way(tiny, tmp_path, signal_data):
    torch.manual_seed(0)
    model = XLLM.from_paths(str(tiny / "llama"), {"signal": SignalInterface()}, template="vicuna_v1")
    # records -> processor -> dataset -> collator: one batch holding a 2-token and a 5-token item.
    rows = build_tokenized_dataset(str(signal_data), model.processor(max_length=128).text)
    dataset = ConversationDataset(rows, {"signal": model.interfaces["signal"].media_loader()})
    batch = model.processor().collator([dataset[0], dataset[1]])
    media = batch["media"]["signal"]
    assert media.lengths.tolist() == [2, 5] and media.values["values"].shape == (2, 5, 4)

    # The splice inserts exactly each item's tokens: 1 sentinel -> 2 and 5 positions.
    embeds, mask, labels = model.embed_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                              batch["media"])
    text = batch["attention_mask"].sum(dim=1)
    assert mask.sum(dim=1).tolist() == [int(text[0]) - 1 + 2, int(text[1]) - 1 + 5]
    sentinel = int((batch["input_ids"][0] == model.sentinels["signal"]).nonzero()[0])
    tokens = model.interfaces["signal"](media)
    assert torch.allclose(embeds[0, sentinel:sentinel + 2], tokens.embeds[0, :2])
    assert not torch.allclose(embeds[0, sentinel + 2], tokens.embeds[0, 2])  # the padding token is not spliced

    out = model(batch["input_ids"], batch["attention_mask"], batch["media"], batch["labels"])
    assert out.media_tokens == 7 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.interfaces["signal"].encoder.weight.grad.abs().sum() > 0

    # Training through Lightning writes an adapter; it reloads (naming the class) and chats.
    module = XLLMModule(llm=str(tiny / "llama"), interfaces={"signal": SignalInterface()}, template="vicuna_v1",
                        adapter_dir=str(tmp_path / "adapter"), lr=1e-3, max_length=128)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=XLLMDataModule(train_file=str(signal_data), batch_size=4))
    with pytest.raises(ValueError, match="not one of xllm's interfaces"):
        XLLM.from_pretrained(tmp_path / "adapter")
    reloaded = XLLM.from_pretrained(tmp_path / "adapter", interface_classes=[SignalInterface])
    module.model.eval()
    with torch.no_grad():
        expected = module.model(batch["input_ids"], batch["attention_mask"], batch["media"]).logits
        got = reloaded(batch["input_ids"], batch["attention_mask"], batch["media"]).logits
    assert torch.allclose(expected, got, atol=1e-5)
    messages = [{"from": "user", "value": "<signal>\nIs the signal long?"}]
    answer = reloaded.chat(messages, {"signal": str(tmp_path / "s1.npy")}, max_new_tokens=4)
    assert isinstance(answer, str)
    assert reloaded.chat(messages, {"signal": str(tmp_path / "s1.npy")}, max_new_tokens=4) == answer
    with pytest.raises(ValueError, match=r"1 <signal> placeholder\(s\) but 0 signal item\(s\)"):
        reloaded.chat(messages)
