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


def test_error_rates_count_characters_and_words_not_case_or_punctuation():
    from xllm.evaluation.metrics import error_rates

    rates = error_rates(["The red circle.", "two red stars", ""], ["the red circle", "two red squares", "a ring"])
    # words: 0 + 1 substitution + 2 deletions over 3 + 3 + 2 reference words
    assert math.isclose(rates["wer"], 3 / 8)
    # characters: "stars" -> "squares" is 3 edits; "a ring" deleted is 6; over 14 + 15 + 6 reference characters
    assert math.isclose(rates["cer"], 9 / 35)
    assert "cer" in summarize([{"prediction": "x", "reference": "y", "loss_sum": 0.0, "target_tokens": 1}])


def test_mme_table_counts_questions_for_acc_and_image_pairs_for_acc_plus():
    from xllm.evaluation.mme import mme_table

    def row(image: str, category: str, reference: str, prediction: str) -> dict:
        return {"image_id": image, "category": category, "reference": reference, "prediction": prediction}

    results = [row("a", "count", "Yes", "Yes"), row("a", "count", "No", "No"),     # both right: counts for acc+
               row("b", "count", "Yes", "Yes"), row("b", "count", "No.", "Yes"),   # one wrong: not for acc+
               row("a", "colour", "Yes", "No"), row("a", "colour", "No", "No")]
    table = mme_table(results)
    assert table["count"] == {"acc": 0.75, "acc_plus": 0.5, "questions": 4}
    assert table["colour"] == {"acc": 0.5, "acc_plus": 0.0, "questions": 2}
    # acc+ over (image, category) pairs: image a's count pair is right, its colour pair and b's are not.
    assert table["all"] == {"acc": 4 / 6, "acc_plus": 1 / 3, "questions": 6}
