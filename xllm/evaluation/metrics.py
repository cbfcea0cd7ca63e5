"""Text metrics for generated answers: exact match, yes/no accuracy (MME-style), perplexity, CER and WER."""

from __future__ import annotations

import math
import re
import string


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and extra whitespace (SQuAD-style normalisation)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def yes_no(text: str) -> str | None:
    """`yes` / `no` when the answer starts with one of them, else None."""
    match = re.match(r"\W*(yes|no)\b", text.strip().lower())
    return match.group(1) if match else None


def error_rates(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus-level character and word error rates (jiwer: edit distance / reference length) after
    `normalize_answer` (case and punctuation do not count), over pairs whose reference is not empty."""
    import jiwer

    pairs = [(normalize_answer(p), normalize_answer(r)) for p, r in zip(predictions, references)]
    pairs = [(p, r) for p, r in pairs if r]
    if not pairs:
        return {"cer": float("nan"), "wer": float("nan")}
    hypotheses, truths = [p for p, _ in pairs], [r for _, r in pairs]
    return {"cer": float(jiwer.cer(truths, hypotheses)), "wer": float(jiwer.wer(truths, hypotheses))}


def summarize(samples: list[dict]) -> dict[str, float | int | None]:
    """Aggregate per-sample `{prediction, reference, loss_sum, target_tokens}` into corpus metrics."""
    count = len(samples)
    tokens = sum(s["target_tokens"] for s in samples)
    loss = sum(s["loss_sum"] for s in samples) / tokens if tokens else float("nan")
    judged = [s for s in samples if yes_no(s["reference"]) is not None]
    correct = sum(yes_no(s["prediction"]) == yes_no(s["reference"]) for s in judged)
    return {
        "samples": count,
        "loss": loss,
        "perplexity": math.exp(loss) if tokens else float("nan"),
        "exact_match": sum(exact_match(s["prediction"], s["reference"]) for s in samples) / count if count else None,
        "yes_no_samples": len(judged),
        "yes_no_accuracy": correct / len(judged) if judged else None,
        **error_rates([s["prediction"] for s in samples], [s["reference"] for s in samples]),
    }
