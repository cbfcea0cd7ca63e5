"""Text metrics for generated answers: exact match, yes/no accuracy, perplexity, CER and WER, BLEU-4 and CIDEr-D."""

from __future__ import annotations

import math
import re
import string
from collections import Counter


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


def bleu4(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 (torchmetrics; brevity penalty against each prediction's closest reference length, as
    coco-caption counts it) after `normalize_answer`, on a 0-1 scale."""
    from torchmetrics.functional.text import bleu_score

    return float(bleu_score([normalize_answer(p) for p in predictions],
                            [[normalize_answer(r) for r in refs] for refs in references], n_gram=4))


def ngrams(words: list[str], longest: int = 4) -> Counter:
    return Counter(tuple(words[i:i + n]) for n in range(1, longest + 1) for i in range(len(words) - n + 1))


def cider_d(predictions: list[str], references: list[list[str]], sigma: float = 6.0) -> float:
    """CIDEr-D as coco-caption computes it (its scorer, pycocoevalcap, is a 100 MB wheel of Java tools, so the
    40 lines are here; `tests/test_metrics.py` checks them against its numbers): per n = 1-4, tf-idf vectors with
    document frequencies over the references of the whole corpus, candidate counts clipped to the reference's,
    cosine similarity times a Gaussian penalty on the length difference (counted in bigrams, as coco-caption
    does), averaged over n and references, times 10; the mean over samples."""
    candidates = [ngrams(normalize_answer(p).split()) for p in predictions]
    refs = [[ngrams(normalize_answer(r).split()) for r in group] for group in references]
    frequency = Counter(gram for group in refs for gram in set().union(*group))
    log_samples = math.log(len(refs))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        weights: list[dict] = [{} for _ in range(4)]
        for gram, count in counts.items():
            weights[len(gram) - 1][gram] = count * (log_samples - math.log(max(1.0, frequency[gram])))
        norms = [math.sqrt(sum(v * v for v in w.values())) for w in weights]
        return weights, norms, sum(c for g, c in counts.items() if len(g) == 2)

    scores = []
    for candidate, group in zip(candidates, refs):
        weights, norms, length = vector(candidate)
        total = 0.0
        for reference in group:
            ref_weights, ref_norms, ref_length = vector(reference)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * sigma ** 2))
            for n in range(4):
                dot = sum(min(w, ref_weights[n].get(g, 0.0)) * ref_weights[n].get(g, 0.0) for g, w in weights[n].items())
                if norms[n] and ref_norms[n]:
                    dot /= norms[n] * ref_norms[n]
                total += dot * penalty / 4
        scores.append(10.0 * total / len(group))
    return sum(scores) / len(scores)


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
        "bleu4": bleu4([s["prediction"] for s in samples], [[s["reference"]] for s in samples]) if count else None,
        "cider": cider_d([s["prediction"] for s in samples], [[s["reference"]] for s in samples]) if count else None,
    }
