"""MME-style yes/no evaluation: accuracy and acc+ per category, scored from the "Yes" vs "No" logits.

MME asks two questions per image and category, one whose answer is yes and one whose answer is no;
acc is over questions, acc+ over images (both answers right). Scoring compares the LLM's next-token
logits for "Yes" and "No" right after the assistant cue, which is what greedy decoding would choose
between, at a fraction of generation's cost.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from xllm.data.records import read_records
from xllm.model import XLLM


def answer_token_ids(tokenizer: Any) -> tuple[int, int]:
    """First token ids of "Yes" and "No" (as they start a reply)."""
    yes = tokenizer("Yes", add_special_tokens=False)["input_ids"][0]
    no = tokenizer("No", add_special_tokens=False)["input_ids"][0]
    if yes == no:
        raise ValueError("'Yes' and 'No' start with the same token; cannot score by logits")
    return yes, no


@torch.no_grad()
def score_yes_no(model: XLLM, records: list[dict], batch_size: int = 32) -> list[dict]:
    """Per record: `{"id", "category", "image_id", "reference", "prediction", "margin"}`."""
    yes_id, no_id = answer_token_ids(model.tokenizer)
    model.prepare_media([r["media"] for r in records])  # e.g. cache every file's features once, in batches
    results = []
    model.eval()
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        batch = model.batch([r["conversations"][:-1] for r in chunk], [r["media"] for r in chunk])
        logits = model.next_token_logits(batch)
        margins = (logits[:, yes_id] - logits[:, no_id]).tolist()
        for record, margin in zip(chunk, margins):
            results.append({
                "id": record["id"], "category": record.get("category", "all"), "image_id": record.get("image_id"),
                "reference": record["conversations"][-1]["value"], "prediction": "Yes" if margin > 0 else "No",
                "margin": margin,
            })
    return results


def mme_table(results: list[dict]) -> dict[str, dict[str, float]]:
    """category -> {"acc", "acc_plus", "questions"}, plus "all"."""
    by_category: dict[str, list[dict]] = defaultdict(list)
    for result in results:
        by_category[result["category"]].append(result)
        by_category["all"].append(result)
    table = {}
    for category, rows in by_category.items():
        correct = [r["prediction"].lower() == r["reference"].strip().lower().rstrip(".") for r in rows]
        per_image: dict[tuple, list[bool]] = defaultdict(list)
        for row, ok in zip(rows, correct):
            per_image[(row["image_id"], row["category"])].append(ok)
        table[category] = {
            "acc": sum(correct) / len(correct),
            "acc_plus": sum(all(v) for v in per_image.values()) / len(per_image),
            "questions": len(rows),
        }
    return table


def load_yes_no(
    path: str, model: Any, media_root: str | None = None, limit: int | None = None, allow_outside_root: bool = False,
) -> list[dict]:
    """Records with their `category` / `image_id` fields (kept from the JSONL) for `score_yes_no`."""
    import json

    records = read_records(path, list(model.interfaces), media_root, None, allow_outside_root)[:limit]
    extra = {}
    with open(path) as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                extra[str(row.get("id"))] = row
    for record in records:
        row = extra.get(record["id"], {})
        record["category"] = row.get("category", "all")
        record["image_id"] = row.get("image_id", record["id"])
    return records
