"""Evaluate an adapter directory on a conversation file: generate, score, write per-sample JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from xllm.adapters.io import load_adapter
from xllm.data.collator import ConversationCollator
from xllm.data.processor import IGNORE_INDEX
from xllm.data.records import read_records
from xllm.evaluation.metrics import summarize


def prepare_record_media(model: Any, records: list[dict]) -> None:
    """Let each interface prepare (e.g. cache features of) every media item of `records` once."""
    for modality, interface in model.interfaces.items():
        interface.prepare_media([p for r in records for p in r["media"].get(modality, [])])


def media_batch(model: Any, records: list[dict]) -> dict[str, torch.Tensor]:
    """The records' media, loaded and collated per modality (in record order)."""
    media: dict[str, torch.Tensor] = {}
    for modality, interface in model.interfaces.items():
        items = [interface.load_media(path) for record in records for path in record["media"].get(modality, [])]
        if items:
            media[modality] = interface.collate_media(items)
    return media


def media_text_batch(processor: Any, records: list[dict]) -> dict[str, list[str]]:
    """Per media item, the text of the user turn holding it (read by instruction-aware interfaces)."""
    out: dict[str, list[str]] = {}
    for record in records:
        for modality, texts in processor.media_instructions(record["conversations"]).items():
            out.setdefault(modality, []).extend(texts)
    return out


@torch.no_grad()
def _teacher_forced_loss(
    model: Any, records: list[dict], media: dict[str, torch.Tensor], max_length: int
) -> list[tuple[float, int]]:
    """Per record: (summed next-token loss over assistant tokens, number of those tokens)."""
    processor = model.processor(max_length=max_length)
    items = []
    for record in records:
        encoded = processor.encode(record)
        items.append({"id": record["id"], "input_ids": encoded["input_ids"], "labels": encoded["labels"], "media": {}})
    batch = ConversationCollator(pad_token_id=model.tokenizer.pad_token_id)(items)
    device = next(model.parameters()).device
    media = {m: t.to(device) for m, t in media.items()}
    embeds, mask, labels = model.embed_inputs(
        batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device), media,
        media_text=media_text_batch(processor, records),
    )
    # Per-row sums (the LLM's own loss is a batch mean).
    logits = model.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    return [(float(l), int(c)) for l, c in zip(losses.sum(dim=1), counts)]


def evaluate(
    *,
    adapter: str,
    data: str,
    output: str,
    media_root: str | None = None,
    llm: str | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    max_length: int = 2048,
    limit: int | None = None,
) -> dict[str, Any]:
    """Generate the last assistant turn of every conversation in `data` and score it.

    Args:
        adapter: adapter directory written by training (config.json + adapter.safetensors).
        data: JSON/JSONL conversations; the last assistant turn is the reference answer.
        output: JSON file to write (metrics + one entry per sample).
        media_root: folder media paths resolve against (default: the data file's folder).
        llm: override the LLM path stored in the adapter (e.g. the same model in another folder).
        max_new_tokens: generation length limit.
        batch_size: samples per generation batch.
        max_length: longest sequence for the teacher-forced loss.
        limit: evaluate only the first N samples.
    """
    model = load_adapter(adapter, llm=llm)
    records = read_records(data, list(model.interfaces), media_root)[:limit]
    prepare_record_media(model, records)
    processor = model.processor(max_length=max_length)
    samples: list[dict[str, Any]] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = []
        for record in chunk:
            turns = record["conversations"]
            last = max(i for i, t in enumerate(turns) if t["from"] == "assistant")
            prompts.append(processor.encode_prompt(turns[:last]))
        media = media_batch(model, chunk)  # decoded once, used by generation and by the loss
        predictions = model.generate(
            prompts, media, max_new_tokens=max_new_tokens,
            media_text=media_text_batch(processor, chunk), do_sample=False,
        )
        losses = _teacher_forced_loss(model, chunk, media, max_length)
        for record, prediction, (loss_sum, tokens) in zip(chunk, predictions, losses):
            turns = record["conversations"]
            last = max(i for i, t in enumerate(turns) if t["from"] == "assistant")
            samples.append({
                "id": record["id"], "question": turns[last - 1]["value"] if last else "",
                "reference": turns[last]["value"], "prediction": prediction.strip(),
                "loss_sum": loss_sum, "target_tokens": tokens,
            })
    result = {"adapter": adapter, "data": data, "metrics": summarize(samples), "samples": samples}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(json.dumps(result["metrics"], indent=2))
    return result


def main() -> None:
    from jsonargparse import auto_cli

    auto_cli(evaluate)


if __name__ == "__main__":
    main()
