"""The joint demo's data (issue 26): spoken questions held out three ways — scenes and clips of no split of the image
or video task, voices no training clip uses, sentences training never speaks — asked as MME pairs."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

from xllm.demo.joint_data import build_joint_task, held_out, held_out_open
from xllm.demo.synthetic import build_shapes_task
from xllm.demo.synthetic_video import build_video_task


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def joint(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    images = build_shapes_task(root / "image", train=40, val=4, test=4, seed=0, image_size=32)
    clips = build_video_task(root / "video", train=12, val=2, test=2, test_combos=1, size=64)
    return build_joint_task(root / "joint", images, clips, train_image=30, train_video=30, val_images=3,
                            test_images=6, val_clips=2, test_clips=3)


def test_held_out_questions_are_unseen_scenes_voices_and_sentences(joint):
    heard = {r["conversations"][1]["value"] for r in rows(joint / "train_spoken_asr.jsonl")}
    training_voices = {r["voice"] for r in rows(joint / "train_spoken_asr.jsonl")}
    task_media = {r["image"] for r in rows(joint / "train_spoken_image.jsonl")}
    trained = rows(joint / "train_spoken_image.jsonl") + rows(joint / "train_spoken_video.jsonl")
    assert all(not held_out(r["category"], r["conversations"][0]["instruction"]) for r in trained
               if "-open-" not in r["id"])
    assert all(not held_out_open(r["category"], r["conversations"][0]["instruction"], "seen") for r in trained
               if "-open-" in r["id"]) and any("-open-" in r["id"] for r in trained)
    for split in ("val", "test"):
        for kind in ("image", "video"):
            spoken = rows(joint / f"{split}_{kind}_spoken.jsonl")
            assert spoken and all(held_out(r["category"], r["question"]) for r in spoken)
            assert not {r["question"] for r in spoken} & heard
            assert not {r["voice"] for r in spoken} & training_voices
            assert not {r[kind] for r in spoken} & task_media and all(r[kind].startswith(f"{kind}s/") for r in spoken)
            opened = rows(joint / f"{split}_{kind}_open_spoken.jsonl")  # open questions: sentences never spoken
            assert opened and not {r["question"] for r in opened} & heard
            assert all(held_out_open(r["category"], r["question"], r["wording"]) for r in opened)
            typed = rows(joint / f"{split}_{kind}_typed.jsonl")
            assert [r["id"] for r in typed] == [r["id"] for r in spoken]
            answers = defaultdict(list)  # MME's pairs: one Yes and one No per scene and category
            for r in spoken:
                answers[(r["image_id"], r["category"])].append(r["conversations"][1]["value"])
            assert all(sorted(a) == ["No", "Yes"] for a in answers.values())
    # The spoken training questions are the image and video tasks' own training records, about their scenes.
    assert all(r["image"].startswith("image_task/images/train_") for r in rows(joint / "train_spoken_image.jsonl"))
    assert (joint / "image_task" / "images").is_dir() and (joint / "video_task" / "videos").is_dir()
