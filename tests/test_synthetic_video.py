"""The video demo's task: questions that need time, held-out splits that never occur in training, and clips whose
decoded frames show what their questions say."""

import json
import random
import re
from collections import Counter

import numpy as np
import pytest

from xllm.demo.synthetic import COLOURS
from xllm.demo.synthetic_video import (
    CATEGORIES, HELD_OUT, TEMPORAL, Changer, Clip, Event, Mover, build_video_task, draw_clip, yes_no_questions,
)
from xllm.demo.video_files import write_video
from xllm.interfaces.video_frames import read_frames


def rows(folder, name):
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def scene(row):
    return json.dumps({k: v for k, v in row.items() if k not in ("id", "video")}, sort_keys=True)


def combos(row):
    m, c = row["mover"], row["changer"]
    return {("mover", (m["shape"], m["colour"], m["direction"])), ("changer", (c["shape"], c["before"], c["after"])),
            *[("event", (e["shape"], e["colour"], e["kind"])) for e in row["events"]]}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return build_video_task(tmp_path_factory.mktemp("video_task"), train=150, val=10, test=20, test_combos=20,
                            size=48)


def test_held_out_clips_never_occur_in_training(task):
    scenes = {split: rows(task, f"{split}_scenes.jsonl") for split in ("train", "val", "test", "test_combos")}
    train = {scene(r) for r in scenes["train"]}
    assert not train & {scene(r) for r in scenes["test"]} and not train & {scene(r) for r in scenes["val"]}
    held_out = {(role, combo) for role, chosen in HELD_OUT.items() for combo in chosen}
    train_combos = set().union(*(combos(r) for r in scenes["train"]))
    assert not train_combos & held_out  # no training clip holds a held-out combination
    for row in scenes["test_combos"]:  # every shape of a combination clip uses one
        assert combos(row) <= held_out, row["id"]
    assert all(not combos(r) & held_out for r in scenes["test"])  # the unseen-scene split measures scenes alone
    # Stage 0's records: each holds one clip's Yes and No of one category, the training questions exactly once,
    # the Yes first in some records and second in others.
    pairs, questions = rows(task, "train_pairs.jsonl"), rows(task, "train_yesno.jsonl")
    asked = [(p["video"], p["category"], p["conversations"][i]["value"].removeprefix("<video>\n"),
              p["conversations"][i + 1]["value"]) for p in pairs for i in (0, 2)]
    assert sorted(asked) == sorted((q["video"], q["category"], q["conversations"][0]["value"].removeprefix(
        "<video>\n"), q["conversations"][1]["value"]) for q in questions)
    assert all(sorted(a[3] for a in asked[i:i + 2]) == ["No", "Yes"] for i in range(0, len(asked), 2))
    assert {p["conversations"][1]["value"] for p in pairs} == {"Yes", "No"}


def test_one_yes_and_one_no_per_clip_and_category_differing_only_in_time(task):
    questions = rows(task, "test_yesno.jsonl")
    per_clip = Counter((q["image_id"], q["category"], q["conversations"][1]["value"]) for q in questions)
    assert set(per_clip.values()) == {1} and len(per_clip) == 20 * len(CATEGORIES) * 2
    # A temporal "No" is its "Yes" with one word swapped for what time decides (the reverse direction, start for
    # end, after for before, the changer's colour before the change for the one after): nothing the frames as a
    # set could refute.
    swaps = {frozenset(pair) for pair in (("left", "right"), ("up", "down"), ("start", "end"), ("before", "after"))}
    changer = {r["id"]: frozenset((r["changer"]["before"], r["changer"]["after"]))
               for r in rows(task, "test_scenes.jsonl")}
    pairs: dict[tuple, dict[str, str]] = {}
    for q in questions:
        pairs.setdefault((q["image_id"], q["category"]), {})[q["conversations"][1]["value"]] = \
            q["conversations"][0]["value"]
    for (clip, category), asked in pairs.items():
        if category in TEMPORAL:
            yes, no = (re.findall(r"\w+", asked[a]) for a in ("Yes", "No"))
            changed = [frozenset((a, b)) for a, b in zip(yes, no) if a != b]
            assert len(yes) == len(no) and len(changed) == 1, (clip, asked)
            assert changed[0] == changer[clip] if category == "colour_change" else changed[0] in swaps, (clip, asked)


def test_no_word_of_a_question_gives_its_answer_away(task):
    """Without the video a question is a coin toss: every word that occurs often in a category's training questions
    occurs with "Yes" and with "No" alike (a "before" always in the "Yes" would let a blind model answer)."""
    per_word: dict[tuple[str, str], Counter] = {}
    for q in rows(task, "train_yesno.jsonl"):
        for word in set(re.findall(r"\w+", q["conversations"][0]["value"].lower())) - {"video"}:
            per_word.setdefault((q["category"], word), Counter())[q["conversations"][1]["value"]] += 1
    for (category, word), answers in per_word.items():
        if answers.total() >= 40:
            assert 0.3 <= answers["Yes"] / answers.total() <= 0.7, (category, word, answers)


def test_decoded_frames_show_what_the_questions_say(tmp_path):
    """A clip through H.264 and the interface's sampling: the red mover goes left, the changer turns from blue to
    green, the square appears before the triangle disappears: the questions' "Yes" answers."""
    clip = Clip(Mover("circle", "red", "left", 0), Changer("diamond", "blue", "green", 2, 0, 8),
                (Event("square", "yellow", "appear", 1, 1, 5), Event("triangle", "yellow", "disappear", 2, 2, 11)))
    path = str(tmp_path / "clip.mp4")
    write_video(path, draw_clip(clip, random.Random(0), 96), fps=8)
    frames = [np.asarray(f, dtype=float) for f in read_frames(path, 8, "uniform", None, None).frames]

    def share(frame, colour, rows, columns):
        region = frame[rows[0] * 32:rows[1] * 32, columns[0] * 32:columns[1] * 32]
        return float((np.abs(region - COLOURS[colour]).sum(-1) < 90).mean())

    red_x = [np.nonzero((np.abs(f[:32] - COLOURS["red"]).sum(-1) < 90))[1].mean() for f in frames]
    assert all(a > b for a, b in zip(red_x, red_x[1:]))  # moves left
    diamond = [("blue", "green")[share(f, "green", (2, 3), (0, 1)) > share(f, "blue", (2, 3), (0, 1))] for f in frames]
    assert diamond[0] == "blue" and diamond[-1] == "green" and diamond == sorted(diamond)  # blue, then green
    square = [share(f, "yellow", (1, 2), (1, 2)) > 0.1 for f in frames]
    triangle = [share(f, "yellow", (2, 3), (2, 3)) > 0.1 for f in frames]
    assert square.index(True) < triangle.index(False)  # the square appears before the triangle disappears
    asked = {(c, a): q for c, q, a in yes_no_questions(clip, random.Random(0))}
    assert asked[("direction", "Yes")] == "Does the circle move to the left?"
    assert asked[("colour_change", "Yes")] == "Does the diamond turn green?"
    assert asked[("order", "Yes")] in ("Does the square appear before the triangle disappears?",
                                       "Does the triangle disappear after the square appears?")
