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


def test_open_answers_descriptions_and_follow_ups_say_what_the_scene_holds(tmp_path):
    from xllm.demo.shapes_language import WORDINGS, at_place, parse_answer, parse_description, scene_objects
    from xllm.demo.synthetic import COLOURS, SHAPES, Item, position_name

    out = build_shapes_task(tmp_path, train=200, val=20, test=40, image_size=32)
    for split in ("train", "test"):
        scenes = {r["image"]: [Item(**i) for i in r["items"]] for r in rows(out, f"{split}_scenes.jsonl")}

        def truth(category: str, question: str, items: list) -> str:
            """The answer read off the scene itself, not off the generator's answer function."""
            named = [s for s in SHAPES if s in question.lower()]
            shape = next((i for i in items if named and i.shape == named[0]), None)
            if category == "count":
                return str(len(items))
            if category in ("colour", "position", "follow_up"):  # a follow-up: the shape asked first, "|" then
                return shape.colour if "colo" in question.split("|")[-1].lower() else shape.position
            if category == "absent":
                assert shape is None, question
                return "no"
            if category == "cell":
                place = question.rstrip("?.").rsplit(" the ", 1)[1]  # "What is at the top left?" -> "top left"
                there = [i for i in items if position_name(i.row, i.column) == place]
                return f"{there[0].colour} {there[0].shape}" if there else "nothing"
            colour = next(c for c in ("red", "green", "blue", "yellow") if c in question)
            which = [s for s in SHAPES if any(i.shape == s and i.colour == colour for i in items)]
            return " ".join(which) or "none"

        records = rows(out, f"{split}_open.jsonl") + rows(out, f"{split}_followup.jsonl")
        for record in records:
            turns = record["conversations"]
            items = scenes[record["image"]]
            question = turns[0]["value"] if record["category"] != "follow_up" else turns[0]["value"] + "|" + turns[2]["value"]
            assert parse_answer(record["category"], turns[-1]["value"]) == truth(record["category"], question, items), record
        categories = Counter(r["category"] for r in records)
        assert set(categories) == {"count", "colour", "position", "absent", "cell", "which", "follow_up"}
        for record in rows(out, f"{split}_describe.jsonl"):
            assert sorted(parse_description(record["conversations"][1]["value"])) == \
                sorted(scene_objects(scenes[record["image"]]))

    # Held-out wordings occur only in val and test; there, both kinds are asked and say which they are.
    held_out = {w.format(shape=s, colour=c, at_place=at_place(r, k)) for kind in WORDINGS.values() for w in kind[1]
                for s in SHAPES for c in COLOURS for r in range(3) for k in range(3)}
    for stem in ("open", "describe", "followup", "stage0"):
        for record in rows(out, f"train_{stem}.jsonl"):
            asked = [t["value"].removeprefix("<image>\n") for t in record["conversations"][0::2]]
            assert not set(asked) & held_out, record
    test_wordings = Counter(r["wording"] for stem in ("open", "describe", "followup")
                            for r in rows(out, f"test_{stem}.jsonl"))
    # Every wording equally likely: 2 of each type's 9 are held out (~0.22 of the questions).
    assert test_wordings["held_out"] > 0.15 * sum(test_wordings.values()) and test_wordings["seen"] > 0
