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
    CATEGORIES,
    HELD_OUT,
    TEMPORAL,
    Changer,
    Clip,
    Event,
    Flash,
    Mover,
    build_video_task,
    draw_clip,
    sample_clip,
    sample_held_out_clip,
    yes_no_questions,
)
from xllm.demo.video_files import write_video
from xllm.encoders.video_frames import read_frames


def rows(folder, name):
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def scene(row):
    return json.dumps({k: v for k, v in row.items() if k not in ("id", "video")}, sort_keys=True)


def combos(row):
    m, c, e = row["mover"], row["changer"], row["event"]
    return {("mover", (m["shape"], m["colour"], m["direction"])), ("changer", (c["shape"], c["before"], c["after"])),
            ("event", (e["shape"], e["colour"], e["kind"])), *[("flash", (f["shape"], f["colour"], "flash"))
                                                                for f in row["flashes"]]}


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
    for row in [r for split in scenes.values() for r in split]:  # no shape stands on the mover's path
        horizontal = row["mover"]["direction"] in ("left", "right")
        cells = [(r["row"], r["column"]) for r in (row["changer"], row["event"], *row["flashes"])]
        assert len(set(cells)) == 4 and all((r if horizontal else c) != row["mover"]["line"] for r, c in cells), row
    # Stage 0's records: each holds one clip's Yes and No of one category, the training questions exactly once,
    # the Yes first in some records and second in others; then each clip's open questions and description.
    everything, questions = rows(task, "train_pairs.jsonl"), rows(task, "train_yesno.jsonl")
    pairs = [p for p in everything if p["category"] != "open"]
    opened = {p["video"]: p for p in everything if p["category"] == "open"}
    assert set(opened) == {q["video"] for q in questions} and all(
        len(p["conversations"]) == 2 * 6 for p in opened.values())  # five open questions and a description
    asked = [(p["video"], p["category"], p["conversations"][i]["value"].removeprefix("<video>\n"),
              p["conversations"][i + 1]["value"]) for p in pairs for i in (0, 2)]
    assert sorted(asked) == sorted((q["video"], q["category"], q["conversations"][0]["value"].removeprefix(
        "<video>\n"), q["conversations"][1]["value"]) for q in questions)
    assert all(sorted(a[3] for a in asked[i:i + 2]) == ["No", "Yes"] for i in range(0, len(asked), 2))
    assert {p["conversations"][1]["value"] for p in pairs} == {"Yes", "No"}


def test_one_yes_and_one_no_per_clip_and_category(task):
    questions = rows(task, "test_yesno.jsonl")
    per_clip = Counter((q["image_id"], q["category"], q["conversations"][1]["value"]) for q in questions)
    assert set(per_clip.values()) == {1} and len(per_clip) == 20 * len(CATEGORIES) * 2


def test_the_frames_as_a_set_cannot_answer_a_temporal_question():
    """A clip played backwards shows the same sampled frames in reverse order, and makes every temporal "Yes" a
    "No" (and back) while the static answers stay: so a model that sees the frames without their order cannot
    tell a temporal Yes from its No. Drawing must also keep a clip and its reversal equally likely: the same
    held-out status, and moments inside the ranges drawn."""
    rng = random.Random(0)
    for index in range(60):
        clip = sample_clip(rng) if index % 2 else sample_held_out_clip(rng)
        backwards = clip.reversed()
        assert backwards.reversed() == clip and backwards.held_out_combos() == clip.held_out_combos()
        forwards, reverse = draw_clip(clip, random.Random(index), 48), draw_clip(backwards, random.Random(index), 48)
        for frame in range(1, 16, 2):  # the frames the interface samples (uniform, 8 of 16)
            assert np.array_equal(forwards[frame], reverse[16 - frame]), (clip, frame)
        asked = {(c, a): q for c, q, a in yes_no_questions(clip, random.Random(index))}
        asked_backwards = {(c, a): q for c, q, a in yes_no_questions(backwards, random.Random(index))}
        for category in TEMPORAL:
            assert asked[(category, "Yes")] == asked_backwards[(category, "No")], (clip, category)
            assert asked[(category, "No")] == asked_backwards[(category, "Yes")], (clip, category)
        assert asked[("static", "Yes")] == asked_backwards[("static", "Yes")]
    # Every moment is drawn uniformly from a set; reversal maps each set onto itself.
    clips = [sample_clip(rng) for _ in range(3000)]

    def moments(clip):
        return {"changer": clip.changer.at, "event": clip.event.at, "flashes": tuple(f.at for f in clip.flashes)}

    for what in ("changer", "event", "flashes"):
        assert {moments(c)[what] for c in clips} == {moments(c.reversed())[what] for c in clips}, what


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
    green, the square appears at the end, the yellow triangle flashes before the yellow cross: the questions' "Yes"
    answers."""
    clip = Clip(Mover("circle", "red", "left", 0), Changer("diamond", "blue", "green", 2, 0, 8),
                Event("square", "yellow", "appear", 1, 1, 6),
                (Flash("triangle", "yellow", 2, 2, 2), Flash("cross", "yellow", 1, 2, 9)))
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
    assert square == [False] * 3 + [True] * 5  # appears between sampled frames 5 and 7, and stays
    triangle = [share(f, "yellow", (2, 3), (2, 3)) > 0.1 for f in frames]
    cross = [share(f, "yellow", (1, 2), (2, 3)) > 0.1 for f in frames]
    assert triangle == [False, True, True] + [False] * 5  # frames 2-5 of 16: sampled frames 3 and 5
    assert cross == [False] * 4 + [True, True] + [False] * 2  # frames 9-12: sampled frames 9 and 11
    asked = {(c, a): q for c, q, a in yes_no_questions(clip, random.Random(0))}
    assert asked[("direction", "Yes")] == "Does the circle move to the left?"
    assert asked[("colour_change", "Yes")] == "Does the diamond turn green?"
    assert asked[("order", "Yes")] == "Does the triangle appear before the cross?"
    assert asked[("start_end", "Yes")] == "Is the square there at the end?"
