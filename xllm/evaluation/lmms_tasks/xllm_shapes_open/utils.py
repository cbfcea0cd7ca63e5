"""The `xllm_shapes_open` task's functions (lmms-eval loads this file beside the YAML): the image demo's open questions,
scored with lmms-eval's own VQAv2 answer processing (`EvalAIAnswerProcessor`) and exact match."""

from __future__ import annotations

from pathlib import Path

from xllm.extras import import_optional

MEDIA_ROOT = Path(".cache/demo/data")  # where `make demo` writes the data; image paths are relative to it
vqa = import_optional("lmms_eval.tasks._task_utils.vqa_eval_metric", "lmms-eval", "the xllm_shapes_open task")


def doc_to_visual(doc: dict) -> list[str]:
    return [str(MEDIA_ROOT / doc["image"])]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["conversations"][0]["value"].replace("<image>", "").strip()


def doc_to_target(doc: dict) -> str:
    return doc["conversations"][-1]["value"]


def process_results(doc: dict, results: list[str]) -> dict:
    """lmms-eval's VQAv2 scoring with the reference as all ten human answers: exact match after its normalisation."""
    processor = vqa.EvalAIAnswerProcessor()

    def normalise(text: str) -> str:
        text = text.replace("\n", " ").replace("\t", " ").strip()
        return processor.process_digit_article(processor.process_punctuation(text))

    return {"exact_match": float(normalise(results[0]) == normalise(doc_to_target(doc)))}
