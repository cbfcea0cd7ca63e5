"""The `xllm_shapes_mme` task's functions (lmms-eval loads this file beside the YAML): xllm's yes/no records in
MME's form, scored with lmms-eval's own MME answer parser."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from xllm.extras import import_optional

MEDIA_ROOT = Path(".cache/demo/data")  # where `make demo` writes the data; image paths are relative to it
mme = import_optional("lmms_eval.tasks.mme.utils", "lmms-eval", "the xllm_shapes_mme task")


def question(doc: dict) -> str:
    return doc["conversations"][0]["value"].replace("<image>", "").strip()


def doc_to_visual(doc: dict) -> list[str]:
    return [str(MEDIA_ROOT / doc["image"])]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return question(doc)


def doc_to_target(doc: dict) -> str:
    return doc["conversations"][-1]["value"]


def process_results(doc: dict, results: list[str]) -> dict:
    right = float(mme.parse_pred_ans(results[0]) == doc_to_target(doc).lower().strip().rstrip("."))
    row = {"image_id": doc["image_id"], "category": doc["category"], "right": right}
    return {"mme_acc": row, "mme_acc_plus": row, "mme_score": row}


def _pairs(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    by_category: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_category[row["category"]][row["image_id"]].append(row["right"])
    for category, images in by_category.items():
        for image, answers in images.items():
            assert len(answers) == 2, f"{category} {image}: MME scores pairs; keep both questions (an even --limit)"
    return by_category


def aggregate_acc(rows: list[dict]) -> float:
    return sum(row["right"] for row in rows) / len(rows)


def aggregate_acc_plus(rows: list[dict]) -> float:
    pairs = [answers for images in _pairs(rows).values() for answers in images.values()]
    return sum(all(answers) for answers in pairs) / len(pairs)


def aggregate_score(rows: list[dict]) -> float:
    """MME's score: per category acc x 100 + acc+ x 100, summed over the categories."""
    total = 0.0
    for images in _pairs(rows).values():
        answers = [a for pair in images.values() for a in pair]
        total += 100 * sum(answers) / len(answers) + 100 * sum(all(p) for p in images.values()) / len(images)
    return total
