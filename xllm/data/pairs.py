"""Media-text pairs for LLM-free Q-Former pretraining (stage 0), from the usual conversation files.

Every assistant turn of a sample with exactly one media item makes a pair: the text is the user turn
before it (placeholders removed) followed by the reply — a caption ("Describe the image. A red square.")
or a yes/no statement ("Is the shape red? No") — and that user turn is also the pair's instruction, for
instruction-aware queries. A yes/no pair also carries its *flipped* statement ("Is the shape red? Yes"),
a hard ITM negative that only the image can tell apart from the positive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import torch

from xllm.data.dataset import MediaLoader
from xllm.data.records import BadSampleError, OnBadSample, SkipCounter, read_records


FLIPPED = {"yes": "No", "no": "Yes"}


def _strip_placeholders(text: str, modality: str) -> str:
    return " ".join(text.replace(f"<{modality}>", " ").split())


def build_pair_dataset(
    path: str,
    modality: str,
    media_root: str | None = None,
    on_bad_sample: OnBadSample = "error",
    skipped: SkipCounter | None = None,
) -> datasets.Dataset:
    """Rows `{"id", "source", "path", "text", "instruction"}`, one per assistant turn."""
    skipped = skipped if skipped is not None else SkipCounter()
    rows = []
    for record in read_records(path, [modality], media_root, on_bad_sample, skipped):
        paths = record["media"].get(modality, [])
        if len(paths) != 1:
            error = BadSampleError(
                record["source"], record["id"], f"stage 0 pairs need exactly one {modality}, found {len(paths)}",
                "not_one_media",
            )
            if on_bad_sample == "error":
                raise error
            skipped.add(error)
            continue
        question = ""
        for turn in record["conversations"]:
            if turn["from"] == "user":
                question = _strip_placeholders(turn["value"], modality)
            elif turn["from"] == "assistant":
                reply = turn["value"].strip()
                text = f"{question} {reply}".strip()
                flip = FLIPPED.get(reply.lower().rstrip("."))
                rows.append({"id": record["id"], "source": record["source"], "path": paths[0], "text": text,
                             "instruction": question, "flipped": f"{question} {flip}".strip() if flip else ""})
    if not rows:
        raise ValueError(f"{path}: no usable {modality}-text pairs ({skipped.total} skipped: {dict(skipped.counts)})")
    return datasets.Dataset.from_list(rows)


class PairDataset(torch.utils.data.Dataset):
    """Items `{"id", "media": tensor, "text", "instruction"}` or `{"skipped": BadSampleError}`."""

    def __init__(self, rows: datasets.Dataset, load: MediaLoader, on_bad_sample: OnBadSample = "error") -> None:
        # Pairs are a few short strings each: plain Python rows index ~10x faster than Arrow rows, which
        # matters at stage 0's large batches on a CPU.
        self.rows, self.load, self.on_bad_sample = rows.to_list(), load, on_bad_sample

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        try:
            media = self.load(row["path"])
        except (OSError, ValueError, RuntimeError) as err:
            error = BadSampleError(row["source"], row["id"], f"cannot load {row['path']}: {err}", "corrupt_media")
            if self.on_bad_sample == "error":
                raise error from err
            return {"skipped": error}
        return {"id": row["id"], "media": media, "text": row["text"], "instruction": row["instruction"],
                "flipped": row["flipped"]}


@dataclass
class PairCollator:
    """Stacks media and tokenizes texts and instructions with the Q-Former's own tokenizer."""

    tokenizer: Any
    max_text_tokens: int = 64

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_text_tokens,
                                 return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"]

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any] | None:
        skipped = [str(item["skipped"]) for item in items if "skipped" in item]
        items = [item for item in items if "skipped" not in item]
        if not items:
            return None
        text_ids, text_mask = self._tokenize([item["text"] for item in items])
        instruction_ids, instruction_mask = self._tokenize([item["instruction"] for item in items])
        flipped_ids, flipped_mask = self._tokenize([item["flipped"] or item["text"] for item in items])
        return {
            "ids": [item["id"] for item in items],
            "media": torch.stack([item["media"] for item in items]),
            "text_ids": text_ids, "text_mask": text_mask,
            "instruction_ids": instruction_ids, "instruction_mask": instruction_mask,
            "pair_keys": [item["text"] for item in items],
            "flipped_ids": flipped_ids, "flipped_mask": flipped_mask,
            "has_flipped": torch.tensor([bool(item["flipped"]) for item in items]),
            # 1 / 0 for a yes / no reply (the flipped twin says "No" / "Yes"), -1 for other pairs.
            "answers": torch.tensor([(1 if item["flipped"].endswith(" No") else 0) if item["flipped"] else -1
                                     for item in items]),
            "skipped": skipped,
        }
