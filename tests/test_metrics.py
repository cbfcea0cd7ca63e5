import math

from xllm.evaluation.metrics import exact_match, normalize_answer, summarize, yes_no


def test_normalisation_and_exact_match():
    assert normalize_answer("  A Red,  Square. ") == "a red square"
    assert exact_match("a red square", "A red square.")
    assert not exact_match("a red circle", "A red square.")


def test_yes_no_reads_only_a_leading_answer():
    assert yes_no("Yes, it is.") == "yes"
    assert yes_no(" no") == "no"
    assert yes_no("Not sure") is None
    assert yes_no("I think yes") is None


def test_summary():
    samples = [
        {"prediction": "Yes", "reference": "Yes", "loss_sum": 2.0, "target_tokens": 2},
        {"prediction": "yes.", "reference": "No", "loss_sum": 4.0, "target_tokens": 2},
        {"prediction": "a cat", "reference": "A cat", "loss_sum": 0.0, "target_tokens": 0},
    ]
    metrics = summarize(samples)
    assert metrics["yes_no_samples"] == 2 and metrics["yes_no_accuracy"] == 0.5
    assert math.isclose(metrics["loss"], 1.5) and math.isclose(metrics["perplexity"], math.exp(1.5))
    assert math.isclose(metrics["exact_match"], 2 / 3)
