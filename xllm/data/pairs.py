"""Media-text pairs for LLM-free Q-Former pretraining (stage 0), from the usual conversation files.

Every assistant turn of a sample with exactly one media item makes a pair: the text is the user turn
before it (placeholders removed) followed by the reply — a caption ("Describe the image. A red square.")
or a yes/no statement ("Is the shape red? No") — and that user turn is also the pair's instruction, for
instruction-aware queries. The reply alone is kept too (a speech objective's target is the transcript). A
yes/no pair also carries its *flipped* statement ("Is the shape red? Yes"), a hard ITM negative that only the
image can tell apart from the positive.

With `by_record`, a dataset item is a whole record — all its turns' pairs, the media loaded once — so the turns of
a record always share a batch: a record that asks MME's two questions of one clip ("Does the circle move left?"
Yes, "... move right?" No) gives every batch both answers about the same frames.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from xllm.data.collator import pad_ids
from xllm.data.dataset import MediaLoader, load_item_media
from xllm.data.records import BadSampleError, BadSamples, read_records
from xllm.interfaces.base import MediaBatch, placeholder

FLIPPED = {"yes": "No", "no": "Yes"}


def _strip_placeholders(text: str, modality: str) -> str:
    return " ".join(text.replace(placeholder(modality), " ").split())


def build_pair_dataset(
    path: str,
    modality: str,
    media_root: str | None = None,
    bad_samples: BadSamples | None = None,
    allow_outside_root: bool = False,
) -> datasets.Dataset:
    """Rows `{"id", "source", "record", "path", "text", "instruction", "flipped", "reply", "answer"}`, one per
    assistant turn (`record`: the index of the record among those kept; `answer`: 1 for a "Yes" reply, 0 for "No",
    -1 for any other)."""
    bad_samples = bad_samples if bad_samples is not None else BadSamples()
    rows, records = [], 0
    for record in read_records(path, [modality], media_root, bad_samples, allow_outside_root):
        paths = record["media"].get(modality, [])
        if len(paths) != 1:
            bad_samples.reject(BadSampleError(
                record["source"], record["id"], f"stage 0 pairs need exactly one {modality}, found {len(paths)}",
                "not_one_media",
            ))
            continue
        question = ""
        for turn in record["conversations"]:
            if turn["from"] == "user":
                question = _strip_placeholders(turn["value"], modality)
            elif turn["from"] == "assistant":
                reply = turn["value"].strip()
                text = f"{question} {reply}".strip()
                word = reply.lower().rstrip(".")
                flip = FLIPPED.get(word)
                rows.append({"id": record["id"], "source": record["source"], "record": records, "path": paths[0],
                             "text": text, "instruction": question,
                             "flipped": f"{question} {flip}".strip() if flip else "", "reply": reply,
                             "answer": {"yes": 1, "no": 0}.get(word, -1)})
        records += 1
    if not rows:
        raise ValueError(f"{path}: no usable {modality}-text pairs ({bad_samples.total} skipped: {dict(bad_samples.counts)})")
    return datasets.Dataset.from_list(rows)


Tokenize = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


PAIR_TEXTS = ("text", "instruction", "flipped")


class PairDataset(torch.utils.data.Dataset):
    """Items `{"id", "media": item, "text", "flipped", "<name>_ids" for each of `texts`}`, or
    `{"skipped": BadSampleError}`; with `by_record`, an item is the list of one record's pairs (or the skip).
    The texts an objective reads (`texts`: the Q-Former's "text", "instruction", "flipped"; a speech
    objective's "reply") are tokenized once here, with the objective's tokenizer (`tokenizer_for(text)`, when texts
    use different ones), not once per step: at stage
    0's batch of 128 that was ~8% of a CPU step."""

    def __init__(
        self, rows: datasets.Dataset, modality: str, load: MediaLoader, tokenize: Tokenize,
        bad_samples: BadSamples | None = None, texts: tuple[str, ...] = PAIR_TEXTS, by_record: bool = False,
        tokenizer_for: Callable[[str], Tokenize] | None = None,
    ) -> None:
        # Pairs are a few short strings each: plain Python rows index ~10x faster than Arrow rows, which
        # matters at stage 0's large batches on a CPU.
        self.rows, self.modality, self.loaders = rows.to_list(), modality, {modality: load}
        self.bad_samples = bad_samples if bad_samples is not None else BadSamples()
        self.texts = texts
        for key in texts:
            strings = [row[key] or row["text"] for row in self.rows]  # a pair with no flipped twin repeats its text
            for start in range(0, len(strings), 1024):
                ids, mask = (tokenizer_for(key) if tokenizer_for else tokenize)(strings[start:start + 1024])
                for row, row_ids, row_mask in zip(self.rows[start:start + 1024], ids, mask):
                    row[f"{key}_ids"] = row_ids[row_mask.bool()].tolist()
        # Each item's rows: one row, or every row of one record (build_pair_dataset writes a record's rows together).
        item_of = (lambda index: self.rows[index]["record"]) if by_record else (lambda index: index)
        self.items = [list(rows) for _, rows in itertools.groupby(range(len(self.rows)), key=item_of)]
        self.by_record = by_record

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any] | list[dict[str, Any]]:
        rows = [self.rows[i] for i in self.items[index]]
        media = load_item_media({**rows[0], "media": {self.modality: [rows[0]["path"]]}}, self.loaders,
                                self.bad_samples)
        if isinstance(media, BadSampleError):
            return {"skipped": media}
        items = [{"id": row["id"], "media": media[self.modality][0], "text": row["text"], "flipped": row["flipped"],
                  "answer": row["answer"], **{f"{key}_ids": row[f"{key}_ids"] for key in self.texts}} for row in rows]
        return items if self.by_record else items[0]


@dataclass
class PairCollator:
    """Batches media with the interface's `collate` and pads the pairs' token ids; the instructions join the
    `MediaBatch` (as the conversation collator puts them there)."""

    collate_media: Callable[[list[Any]], MediaBatch]

    def __call__(self, items: list[dict[str, Any] | list[dict[str, Any]]]) -> dict[str, Any] | None:
        items = [pair for item in items for pair in (item if isinstance(item, list) else [item])]  # records' pairs
        skipped = [str(item["skipped"]) for item in items if "skipped" in item]
        items = [item for item in items if "skipped" not in item]
        if not items:
            return None
        texts = {}
        for key in (k.removesuffix("_ids") for k in items[0] if k.endswith("_ids")):
            texts[f"{key}_ids"], texts[f"{key}_mask"] = pad_ids([item[f"{key}_ids"] for item in items])
        media = self.collate_media([item["media"] for item in items])
        if "instruction_ids" in texts:
            media = media.with_instructions(texts.pop("instruction_ids"), texts.pop("instruction_mask"))
        return {
            "ids": [item["id"] for item in items],
            "media": media,
            **texts,
            "pair_keys": [item["text"] for item in items],
            "has_flipped": torch.tensor([bool(item["flipped"]) for item in items]),
            # 1 / 0 for a yes / no reply, -1 for other pairs (read from the reply, not from the flipped text,
            # which for an empty question is a bare "No" / "Yes").
            "answers": torch.tensor([item["answer"] for item in items]),
            "skipped": skipped,
        }
