"""MME-style yes/no evaluation: generate each reply, parse it as MME does, then acc, acc+ and MME's score.

MME asks two questions per image and category, one whose answer is yes and one whose answer is no; acc is
over questions, acc+ over images (both answers right), and a category's score is acc×100 + acc+×100 (200 at
most). A reply counts as "yes"/"no" when it is exactly that word or its first four characters hold it (MME's
own parsing, after lower-casing and stripping); anything else is "other" and counted wrong.

Beside each parsed reply, a cheap diagnostic: the logit margin between the first tokens that tell the
template's "Yes" reply from its "No" reply (` Yes` for Vicuna, `Yes` after a newline for GLM-4), read from the
same greedy generation, at the step where the two replies part.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from xllm.data.records import read_records
from xllm.model import XLLM
from xllm.tensors import IGNORE_INDEX


def mme_label(text: str) -> str:
    """`yes`, `no` or `other`, as MME's evaluation tool parses an answer."""
    text = text.lower().strip()
    if text in ("yes", "no"):
        return text
    if "yes" in text[:4]:
        return "yes"
    if "no" in text[:4]:
        return "no"
    return "other"


def reply_fork(model: XLLM) -> tuple[list[int], int, int]:
    """Where the template's "Yes" and "No" replies part: `(shared reply tokens before it, yes id, no id)`."""
    processor = model.processor().text

    def reply_ids(answer: str) -> list[int]:
        turns = [{"from": "user", "value": "?"}, {"from": "assistant", "value": answer}]
        encoded = processor.encode({"source": "reply_fork", "id": answer, "conversations": turns})
        return [label for label in encoded["labels"] if label != IGNORE_INDEX]

    yes, no = reply_ids("Yes"), reply_ids("No")
    fork = next(i for i, (a, b) in enumerate(zip(yes, no)) if a != b)
    return yes[:fork], yes[fork], no[fork]


@torch.no_grad()
def score_yes_no(model: XLLM, records: list[dict], batch_size: int = 32) -> list[dict]:
    """Per record: `{"id", "category", "image_id", "reference", "reply", "prediction", "margin"}`;
    `prediction` is MME's label of the greedy `reply`; `margin` is None where the reply left the template's
    shared start before the yes/no fork."""
    shared, yes_id, no_id = reply_fork(model)
    # Enough tokens for MME's four characters after the template's shared start ("Yes," / "No, " / "Yes<eos>").
    max_new_tokens = len(shared) + 3
    processor = model.processor()
    processor.prepare_media([r["media"] for r in records])  # e.g. cache every file's features once, in batches
    results = []
    model.eval()
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        batch = processor([r["conversations"][:-1] for r in chunk], [r["media"] for r in chunk])
        output = model.generate_ids(batch, max_new_tokens, do_sample=False, output_logits=True)
        replies = model.tokenizer.batch_decode(output.sequences, skip_special_tokens=True)
        at_fork = output.logits[len(shared)].float() if len(output.logits) > len(shared) else None
        for row, (record, reply) in enumerate(zip(chunk, replies)):
            on_template = output.sequences[row, :len(shared)].tolist() == shared and at_fork is not None
            results.append({
                "id": record["id"], "category": record.get("category", "all"), "image_id": record.get("image_id"),
                "reference": record["conversations"][-1]["value"], "reply": reply, "prediction": mme_label(reply),
                "margin": float(at_fork[row, yes_id] - at_fork[row, no_id]) if on_template else None,
            })
    return results


def mme_table(results: list[dict]) -> dict[str, dict[str, float]]:
    """category -> {"acc", "acc_plus", "score" (acc×100 + acc+×100), "other" (unparsed replies), "questions"},
    plus "all" (over every question; MME itself sums the categories' scores instead)."""
    by_category: dict[str, list[dict]] = defaultdict(list)
    for result in results:
        by_category[result["category"]].append(result)
        by_category["all"].append(result)
    table = {}
    for category, rows in by_category.items():
        correct = [mme_label(r["prediction"]) == mme_label(r["reference"]) for r in rows]
        per_image: dict[tuple, list[bool]] = defaultdict(list)
        for row, ok in zip(rows, correct):
            per_image[(row["image_id"], row["category"])].append(ok)
        acc, acc_plus = sum(correct) / len(correct), sum(all(v) for v in per_image.values()) / len(per_image)
        table[category] = {
            "acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus),
            "other": sum(mme_label(r["prediction"]) == "other" for r in rows), "questions": len(rows),
        }
    return table


def load_yes_no(
    path: str, model: Any, media_root: str | None = None, limit: int | None = None, allow_outside_root: bool = False,
) -> list[dict]:
    """Records with their `category` and `image_id` fields (kept from the JSON/JSONL) for `score_yes_no`; a
    record without `image_id` is its own image (acc+ then needs both answers within one record: never)."""
    records = read_records(path, list(model.interfaces), media_root, None, allow_outside_root)[:limit]
    for record in records:
        record["category"] = str(record["fields"].get("category", "all"))
        record["image_id"] = str(record["fields"].get("image_id", record["id"]))
    return records
