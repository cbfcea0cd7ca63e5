"""Open answers scored as VQAv2 scores them, descriptions read back into objects and scored as CHAIR scores them
(`xllm.evaluation.open_answers`, `xllm.evaluation.scenes`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.test_lmms_eval import lmms_site
from xllm.evaluation.open_answers import open_answer_table, vqa_match, vqa_normalize
from xllm.evaluation.scenes import SceneVocabulary, scene_scores


def test_vqa_normalisation_is_lmms_evals_on_the_demos_answers(tiny):
    """Every reference of the shapes task's open questions and descriptions, and replies a model might give,
    normalised by ours and by lmms-eval's `EvalAIAnswerProcessor` (as its VQAv2 task applies it)."""
    site = lmms_site()
    texts = [turn["value"] for stem in ("open", "describe", "followup") for split in ("train", "test")
             for line in (tiny / "data" / f"{split}_{stem}.jsonl").read_text().splitlines()
             for turn in json.loads(line)["conversations"]]
    texts += ["There are three shapes.", "3", "It's 2.5 wide!", "dont know; Im (not) sure", "1,000 red-ish squares?",
              "A red circle at the top left, a blue square.", "None.", "yes\tno\n"]
    script = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("vqa", {site!r} + "/lmms_eval/tasks/_task_utils/vqa_eval_metric.py")
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
processor = module.EvalAIAnswerProcessor()
texts = json.loads(sys.stdin.read())
print(json.dumps([processor.process_digit_article(processor.process_punctuation(
    t.replace("\\n", " ").replace("\\t", " ").strip())) for t in texts]))
"""
    run = subprocess.run([sys.executable, "-c", script], input=json.dumps(texts), capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": site}, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = json.loads(run.stdout)
    assert len(texts) > 300 and [vqa_normalize(t) for t in texts] == theirs


def test_exact_match_is_strict_and_accuracy_reads_free_phrasing():
    assert vqa_match("Three.", "three") and vqa_match("3", "Three.") and vqa_match("The circle.", "circle")
    assert not vqa_match("There are three shapes.", "Three.")
    results = [
        {"category": "count", "reply": "Three.", "reference": "Three.", "parsed": "3", "parsed_reference": "3"},
        {"category": "count", "reply": "There are three shapes.", "reference": "Three.", "parsed": "3",
         "parsed_reference": "3"},
        {"category": "colour", "reply": "I do not know.", "reference": "Red.", "parsed": "?", "parsed_reference": "red"},
        {"category": "colour", "reply": "Blue.", "reference": "Blue.", "parsed": "?", "parsed_reference": "?"},
    ]
    table = open_answer_table(results)
    assert table["count"] == {"questions": 2, "exact_match": 0.5, "accuracy": 1.0}
    # An unreadable reply is wrong even where the reference is unreadable too.
    assert table["colour"] == {"questions": 2, "exact_match": 0.5, "accuracy": 0.0}
    assert table["all"]["questions"] == 4 and table["all"]["accuracy"] == 0.5
    assert "accuracy" not in open_answer_table([{"reply": "a", "reference": "a"}])["all"]


VOCABULARY = SceneVocabulary(("circle", "square", "triangle"),
                             {"colour": {"red": "red", "blue": "blue"},
                              "place": {"top left": "top left", "top": "top", "left": "left", "center": "center",
                                        "centre": "center"}})


def test_descriptions_are_read_back_into_objects_and_scored():
    truth = VOCABULARY.truth([{"kind": "circle", "colour": "red", "place": "top left"},
                              {"kind": "square", "colour": "blue", "place": "center"}])
    exact = VOCABULARY.parse("A red circle at the top left and a blue square in the centre.")
    assert sorted(exact) == sorted(truth)  # "top left" is one place; "centre" is "center"
    wrong_colour = VOCABULARY.parse("A blue circle at the top left, a blue square in the center.")
    hallucinated = VOCABULARY.parse("A red circle at the top left, a blue square in the center and a red triangle.")
    duplicated = VOCABULARY.parse("A red circle at the top left. A red circle at the top left.")
    scores = scene_scores([exact, wrong_colour, hallucinated, duplicated], [truth] * 4)
    assert scores["exact_scene"] == 0.25
    assert scores["objects_named"] == 2 + 2 + 3 + 2 and scores["objects_true"] == 8
    # Named objects right in kind and every attribute: 2 + 1 + 2 + 1 (a duplicate matches once); true ones found: same.
    assert scores["object_precision"] == pytest.approx(6 / 9) and scores["object_recall"] == pytest.approx(6 / 8)
    assert scores["chair_i"] == pytest.approx(1 / 9) and scores["chair_s"] == 0.25  # only the triangle is not there
    # An attribute named twice in one clause is unknown, not the first one.
    assert VOCABULARY.parse("a red or blue square") == [("square", (("colour", ""), ("place", "")))]


def test_a_vocabulary_built_from_records_objects_reads_their_descriptions():
    objects = [{"kind": "dog", "colour": "brown", "place": "left"}, {"kind": "cat", "colour": "black", "place": "right"}]
    vocabulary = SceneVocabulary.from_objects(objects)
    said = vocabulary.parse("A brown dog on the left and two black cats on the right.")
    assert sorted(said) == sorted(vocabulary.truth(objects))


def test_event_lists_are_scored_in_order():
    from xllm.evaluation.scenes import event_scores

    truth = [("moves", "circle", "red", "left"), ("turns", "square", "blue"), ("flashes", "cross")]
    swapped = [truth[0], truth[2], truth[1]]
    scores = event_scores([truth, swapped, truth[:2], truth + [("appears", "diamond")]], [truth] * 4)
    assert scores["all_events_right"] == 0.25
    assert scores["event_recall"] == pytest.approx((3 + 3 + 2 + 3) / (4 * 3))
    assert scores["event_precision"] == pytest.approx((3 + 3 + 2 + 3) / (3 + 3 + 2 + 4))
    assert scores["in_order"] == 0.5  # of the two that told every event, one told them in order


def test_evaluate_py_scores_open_answers_and_descriptions_by_their_records(tiny, tmp_path):
    """`evaluate.py` picks the metric from the records: descriptions list their `objects`, open questions have a
    `category`; the numbers are the library's scorers' on the replies it wrote."""
    from tests.conftest import make_model
    from xllm.evaluation.run import evaluate

    adapter = make_model(tiny).eval().save_pretrained(tmp_path / "adapter", stage=2)
    opened = evaluate(adapter=str(adapter), data=str(tiny / "data" / "test_open.jsonl"),
                      output=str(tmp_path / "open.json"), max_new_tokens=8, limit=12)
    assert opened["metric"] == "open" and opened["metrics"]["all"]["questions"] == 12
    assert set(opened["metrics"]) >= {"count", "colour", "position", "cell", "which", "all"}
    assert opened["metrics"]["all"] == open_answer_table(opened["samples"])["all"]
    described = evaluate(adapter=str(adapter), data=str(tiny / "data" / "test_describe.jsonl"),
                         output=str(tmp_path / "describe.json"), max_new_tokens=8)
    assert described["metric"] == "describe" and described["metrics"]["descriptions"] == 6
    assert {"exact_scene", "object_precision", "object_recall", "chair_i", "cider_d", "bleu4"} <= set(described["metrics"])
    # A reference read back with the records' own vocabulary is its scene, exactly.
    rows = [json.loads(line) for line in (tiny / "data" / "test_describe.jsonl").read_text().splitlines()]
    vocabulary = SceneVocabulary.from_objects([o for r in rows for o in r["objects"]])
    references = [vocabulary.parse(r["conversations"][1]["value"]) for r in rows]
    assert scene_scores(references, [vocabulary.truth(r["objects"]) for r in rows])["exact_scene"] == 1.0
