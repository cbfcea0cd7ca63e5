"""The demo's shapes task: one yes and one no question per image and category, and held-out splits whose scenes
never occur in training."""

import json
from collections import Counter

from xllm.demo.synthetic import CATEGORIES, build_shapes_task


def rows(folder, name):
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def test_questions_are_balanced_and_splits_share_no_scene(tmp_path):
    out = build_shapes_task(tmp_path, train=300, val=20, test=40, image_size=32)
    # A caption names every shape with its colour and cell, in reading order: it identifies the scene.
    scenes = {split: {r["conversations"][1]["value"] for r in rows(out, f"{split}_captions.jsonl")}
              for split in ("train", "val", "test")}
    assert not scenes["test"] & scenes["train"] and not scenes["test"] & scenes["val"]
    assert not scenes["val"] & scenes["train"]
    assert any(" and " not in scene for scene in scenes["test"])  # one-shape scenes stay in the test mix

    questions = rows(out, "test_yesno.jsonl")
    per_image = Counter((q["image_id"], q["category"], q["conversations"][1]["value"]) for q in questions)
    assert set(per_image.values()) == {1} and len(per_image) == 40 * len(CATEGORIES) * 2
    answers = Counter(q["conversations"][1]["value"] for q in questions)
    assert answers["Yes"] == answers["No"] == 40 * len(CATEGORIES)
