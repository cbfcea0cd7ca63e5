"""The demos' open answers, descriptions and follow-up turns: generated through `model.reply`, scored with
`xllm.evaluation` (VQAv2's exact match, answers read back in the world's words, descriptions read back into
objects), and written as report tables.

A world (pictures, clips) brings its `parse_answer(category, text)` and `parse_description(text)` and the true objects
of each scene; everything else is shared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from xllm.evaluation.metrics import bleu4, cider_d
from xllm.evaluation.open_answers import generate_turns, last_turn_results, open_answer_table
from xllm.evaluation.scenes import Object, scene_scores


def score_open(model: Any, records: list[dict], parse: Callable[[str, str], str], max_new_tokens: int = 16,
               ) -> list[dict]:
    """Open questions and follow-ups (records from `read_records`): the last assistant turn of each, with the model's
    own earlier replies as history, read back with `parse`."""
    return last_turn_results(records, generate_turns(model, records, max_new_tokens=max_new_tokens), parse)


def open_tables(results: list[dict]) -> dict[str, dict]:
    """Accuracy and VQAv2 exact match per category, `all`, and per wording (`seen`, `held_out`)."""
    table = open_answer_table(results)
    for wording, entry in open_answer_table(results, by="wording").items():
        if wording != "all":
            table[f"{wording} wordings"] = entry
    return table


def score_descriptions(model: Any, records: list[dict], parse: Callable[[str], list[Object]],
                       truths: Sequence[list[Object]], max_new_tokens: int = 32) -> tuple[dict, list[dict]]:
    """Descriptions of each record's media, read back into objects and scored against `truths` (exact scene,
    object precision / recall, CHAIR) and against the reference text (CIDEr-D, BLEU-4)."""
    replies = [said[-1] for said in generate_turns(model, records, max_new_tokens=max_new_tokens)]
    references = [[r["conversations"][-1]["value"]] for r in records]
    scores = scene_scores([parse(reply) for reply in replies], truths)
    scores["cider_d"], scores["bleu4"] = cider_d(replies, references), bleu4(replies, references)
    samples = [{"id": r["id"], "question": r["conversations"][-2]["value"], "reply": reply, "reference": ref[0]}
               for r, reply, ref in zip(records, replies, references)]
    return scores, samples


def format_open_table(scores: dict[str, dict], rows: Sequence[str], categories: Sequence[str]) -> str:
    """Categories as rows, model rows as columns; cells are answer accuracy / VQAv2 exact match."""
    lines = ["| question type | questions | " + " | ".join(rows) + " |", "|---|---:|" + "---:|" * len(rows)]
    trained = scores[rows[-1]]
    for category in (*categories, "seen wordings", "held_out wordings", "all"):
        if category not in trained:
            continue
        cells = [f"{scores[row][category]['accuracy']:.3f} / {scores[row][category]['exact_match']:.3f}"
                 if category in scores.get(row, {}) else "—" for row in rows]
        name = "held-out wordings" if category == "held_out wordings" else category
        lines.append(f"| {name} | {trained[category]['questions']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


DESCRIPTION_COLUMNS = (("exact_scene", "exact scene"), ("object_precision", "object precision"),
                       ("object_recall", "object recall"), ("chair_i", "CHAIR-i"), ("cider_d", "CIDEr-D"),
                       ("bleu4", "BLEU-4"))


def format_description_table(scores: dict[str, dict], rows: Sequence[str],
                             columns: Sequence[tuple[str, str]] = DESCRIPTION_COLUMNS) -> str:
    """A row per model present in `scores` (in `rows`' order), a column per `(key, name)` of `columns`."""
    lines = ["| model | descriptions | " + " | ".join(name for _, name in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for row in rows:
        if row in scores:
            s = scores[row]
            lines.append(f"| {row} | {s['descriptions']} | " + " | ".join(f"{s[key]:.3f}" for key, _ in columns)
                         + " |")
    return "\n".join(lines)
