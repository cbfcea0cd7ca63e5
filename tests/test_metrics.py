import math

import pytest

from tests.conftest import make_model
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
               row("a", "colour", "Yes", "I think so"), row("a", "colour", "No", "no")]  # "other", then right
    table = mme_table(results)
    # MME's score of a category: acc×100 + acc+×100.
    assert table["count"] == {"acc": 0.75, "acc_plus": 0.5, "score": 125.0, "other": 0, "questions": 4}
    assert table["colour"] == {"acc": 0.5, "acc_plus": 0.0, "score": 50.0, "other": 1, "questions": 2}
    # acc+ over (image, category) pairs: image a's count pair is right, its colour pair and b's are not.
    assert table["all"] == {"acc": 4 / 6, "acc_plus": 1 / 3, "score": 100.0, "other": 1, "questions": 6}


def test_replies_are_labelled_as_mme_parses_them():
    from xllm.evaluation.mme import mme_label

    assert [mme_label(t) for t in ("Yes", " no", "No, it is not.", "yes.", "Not sure")] == ["yes", "no", "no", "yes", "no"]
    # Only the first four characters count, so a late answer is "other", counted wrong.
    assert [mme_label(t) for t in ("I think yes", "", "Maybe")] == ["other", "other", "other"]


@pytest.mark.parametrize("llm,template", [("llama", "vicuna_v1"), ("glm", "glm4"), ("llama", "tokenizer")])
def test_the_margin_is_read_where_the_template_yes_and_no_replies_part(tiny, llm, template):
    from xllm.evaluation.mme import reply_fork

    model = make_model(tiny, llm=llm, template=template)
    shared, yes, no = reply_fork(model)
    decode = model.tokenizer.decode
    # What the model was trained to write first: " Yes" after Vicuna's "ASSISTANT:", "\nYes" after GLM-4's cue.
    assert decode(shared + [yes]).strip() == "Yes" and decode(shared + [no]).strip() == "No"
    expected_start = {"vicuna_v1": " Yes", "glm4": "\nYes"}.get(template)
    if expected_start:
        assert decode(shared + [yes]) == expected_start


@pytest.mark.parametrize("llm,template", [("llama", "vicuna_v1"), ("glm", "glm4")])
def test_yes_no_scoring_reads_the_greedy_reply_of_the_one_inference_path(tiny, llm, template):
    from xllm.evaluation.mme import load_yes_no, mme_label, reply_fork, score_yes_no

    model = make_model(tiny, llm=llm, template=template).eval()
    path = tiny / "data" / "test_yesno.jsonl"
    records = load_yes_no(str(path), model)[:6]
    results = score_yes_no(model, records, batch_size=4)
    replies = model.reply([r["conversations"][:-1] for r in records], [r["media"] for r in records],
                          max_new_tokens=len(reply_fork(model)[0]) + 3)
    assert [r["reply"].strip() for r in results] == replies
    assert [r["prediction"] for r in results] == [mme_label(text) for text in replies]
    # Each question keeps its category and image from the file (acc+ pairs a category's questions per image).
    assert all(r["category"] != "all" and r["image_id"] != r["id"] for r in results)


def test_bleu4_and_cider_d_give_coco_caption_numbers():
    from xllm.evaluation.metrics import bleu4, cider_d

    predictions = ["a red circle at the top left", "two shapes a blue square and a green triangle", "a yellow star",
                   "One green circle in the center of the image."]
    references = [["a red circle in the top left corner", "a red circle top left"],
                  ["a blue square and a green triangle"], ["a yellow triangle at the bottom"],
                  ["a green circle in the center", "one green circle in the middle"]]
    # pycocoevalcap 1.2 (coco-caption's scorers) on the same, lower-cased and unpunctuated, captions:
    # Bleu(4) 0.5889489987, Cider 4.5685519646.
    assert bleu4(predictions, references) == pytest.approx(0.5889489987, abs=1e-6)
    assert cider_d(predictions, references) == pytest.approx(4.5685519646, abs=1e-9)
    assert cider_d(["a red circle"], [["a red circle"]]) == 0.0  # one sample: every n-gram's idf is log(1) = 0
