"""Evaluate an adapter directory on a conversation file: generate, score, write per-sample JSON.

The metric follows the data: yes/no references (MME-style files with `category` and `image_id`) get MME's
scoring (`xllm.evaluation.mme`, the same function the demos report with); records that list the `objects` their
media hold are descriptions, read back into objects (exact scene, object precision / recall, CHAIR-i, with CIDEr-D
and BLEU-4: `xllm.evaluation.scenes`); other records with a `category` are open questions, scored as VQAv2 scores
them per category (`xllm.evaluation.open_answers`); the rest get exact match, CER/WER and the teacher-forced loss. Generation and the loss go through the model's one inference path
(`XLLM.batch`, then `generate` or `forward`), the same batches training uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from xllm.evaluation.metrics import bleu4, cider_d, normalize_answer, summarize
from xllm.evaluation.mme import load_yes_no, mme_table, score_yes_no
from xllm.evaluation.open_answers import generate_turns, last_turn_results, open_answer_table
from xllm.evaluation.scenes import SceneVocabulary, scene_scores
from xllm.model import XLLM


def last_reply(record: dict) -> int:
    """Index of the last assistant turn (the reference)."""
    return max(i for i, t in enumerate(record["conversations"]) if t["from"] == "assistant")


@torch.no_grad()
def teacher_forced_loss(
    model: XLLM, records: list[dict], media: list[dict], max_length: int
) -> list[tuple[float, int]]:
    """Per record: (summed next-token loss over assistant tokens, number of those tokens); `media` per record."""
    batch = model.processor(max_length)([r["conversations"] for r in records], media, prompt=False)
    device = model.device
    out = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                {m: b.to(device) for m, b in batch["media"].items()}, batch["labels"].to(device), per_row=True)
    return [(float(l), int(c)) for l, c in zip(out.row_loss_sums, out.row_label_counts)]


def evaluate(
    *,
    adapter: str,
    data: str,
    output: str,
    media_root: str | None = None,
    allow_media_outside_root: bool = False,
    llm: str | None = None,
    encoders: dict[str, str] | None = None,
    interface_overrides: dict[str, dict[str, Any]] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    metric: str = "auto",
    own_history: bool = False,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    max_length: int = 2048,
    limit: int | None = None,
) -> dict[str, Any]:
    """Generate the last assistant turn of every conversation in `data` and score it.

    `metric="yes_no"` (chosen by `auto` when every reference is a bare Yes/No) parses replies as MME does and
    reports acc, acc+ and MME's score per category; `describe` (chosen when records list their media's `objects`,
    dicts of a `kind` and attributes) reads each description back into objects with the vocabulary of all records'
    objects and reports exact scene, object precision / recall, CHAIR-i, CIDEr-D and BLEU-4; `open` (chosen when
    records have a `category`) reports VQAv2's exact match per category and per `wording`; `text` reports exact
    match, CER/WER and the loss.

    Args:
        adapter: adapter directory written by training (config.json + adapter.safetensors).
        data: JSON/JSONL conversations; the last assistant turn is the reference answer.
        output: JSON file to write (metrics + one entry per sample).
        media_root: folder media paths resolve against (default: the data file's folder).
        allow_media_outside_root: accept media paths leading outside the media root (absolute or `..`).
        llm: override the LLM path stored in the adapter (e.g. the same model in another folder).
        encoders: override frozen encoder paths per modality, e.g. `{"image": "/models/vit"}`.
        interface_overrides: other interface settings per modality, e.g. `{"image": {"feature_cache": "c/"}}`.
        device: run on this device (`cuda`, `cuda:1`; default the CPU).
        dtype: dtype of the frozen LLM and encoders (`bfloat16` on a GPU).
        metric: `auto`, `yes_no`, `describe`, `open` or `text` (see above).
        own_history: in conversations with several assistant turns, generate each turn after the model's own earlier
            replies (a chat as a user has it) instead of the references (`open` and `describe`).
        max_new_tokens: generation length limit (text metrics; yes/no replies need only their first words).
        batch_size: samples per generation batch.
        max_length: longest sequence for the teacher-forced loss.
        limit: evaluate only the first N samples.
    """
    model = XLLM.from_pretrained(adapter, llm=llm, encoders=encoders, interface_overrides=interface_overrides,
                                 device=device, dtype=dtype)
    # Read once, with the MME fields (`category`, `image_id`) that yes/no scoring needs and text metrics ignore.
    records = load_yes_no(data, model, media_root, limit, allow_media_outside_root)
    if metric == "auto":
        answers = {normalize_answer(r["conversations"][last_reply(r)]["value"]) for r in records}
        metric = ("yes_no" if answers and answers <= {"yes", "no"} else
                  "describe" if records and all("objects" in r["fields"] for r in records) else
                  "open" if records and all("category" in r["fields"] for r in records) else "text")
    if metric == "yes_no":
        samples = score_yes_no(model, records, batch_size)
        return write_result(output, {"adapter": adapter, "data": data, "metric": metric,
                                     "metrics": mme_table(samples), "samples": samples})
    if metric in ("open", "describe"):
        replies = generate_turns(model, records, own_history, batch_size, max_new_tokens)
        samples = last_turn_results(records, replies)
        if metric == "open":
            metrics = {**open_answer_table(samples), **{f"{k} wordings": v for k, v in
                                                       open_answer_table(samples, by="wording").items() if k != "all"}}
        else:
            objects = [r["fields"].get("objects") for r in records]
            if any(not isinstance(o, list) for o in objects):
                bad = next(r for r, o in zip(records, objects) if not isinstance(o, list))
                raise ValueError(f"{bad['source']}: record {bad['id']} lists no `objects` (a list of {{kind, ...}}): "
                                 "describe scoring needs what each picture holds")
            vocabulary = SceneVocabulary.from_objects([o for group in objects for o in group])
            references = [[s["reference"]] for s in samples]
            metrics = scene_scores([vocabulary.parse(s["reply"]) for s in samples],
                                   [vocabulary.truth(group) for group in objects])
            metrics |= {"cider_d": cider_d([s["reply"] for s in samples], references),
                        "bleu4": bleu4([s["reply"] for s in samples], references)}
        return write_result(output, {"adapter": adapter, "data": data, "metric": metric, "metrics": metrics,
                                     "samples": samples})
    if metric != "text":
        raise ValueError(f"metric must be auto, yes_no, describe, open or text, got {metric!r}")
    processor = model.processor(max_length)
    processor.prepare_media([r["media"] for r in records])  # e.g. cache every file's features once, in batches
    samples: list[dict[str, Any]] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        media = processor.load_media([r["media"] for r in chunk])  # decoded once, for generation and for the loss
        prompts = [r["conversations"][: last_reply(r)] for r in chunk]
        predictions = model.reply(prompts, media, max_new_tokens=max_new_tokens)
        losses = teacher_forced_loss(model, chunk, media, max_length)
        for record, prediction, (loss_sum, tokens) in zip(chunk, predictions, losses):
            turns, last = record["conversations"], last_reply(record)
            samples.append({
                "id": record["id"], "question": turns[last - 1]["value"] if last else "",
                "reference": turns[last]["value"], "prediction": prediction,
                "loss_sum": loss_sum, "target_tokens": tokens,
            })
    return write_result(output, {"adapter": adapter, "data": data, "metric": metric, "metrics": summarize(samples),
                                 "samples": samples})


def write_result(output: str, result: dict[str, Any]) -> dict[str, Any]:
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(json.dumps(result["metrics"], indent=2))
    return result


def main() -> None:
    from jsonargparse import auto_cli

    auto_cli(evaluate)


if __name__ == "__main__":
    main()
