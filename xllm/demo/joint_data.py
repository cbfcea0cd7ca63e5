"""The joint demo's data: the image and video demos' yes/no questions, spoken by eSpeak voices, as xllm JSONL + wav.

Held-out means unseen three ways. The val and test splits ask about **scenes and clips drawn here**, none of which
occurs in any split of the image or video task; their questions are spoken by **voice settings** no training clip
uses (the speech demo's held-out variants, rates and pitches); and they are **sentences never spoken in training**:
for each category the questions with some words are held out (`HELD_OUT_WORDS`: a shape, or for counts "two" and
"three"), and training speaks only the others. Typed questions are not held out
that way: the image and video adapters were trained on all of them.

Files (in `out`):
- `train_spoken_asr.jsonl`: `<audio>` + "Transcribe the audio." -> the spoken question's words (the speech side
  learns the questions' vocabulary), and counting sentences no task asks (`counting_sentences`);
- `train_spoken_image.jsonl` / `train_spoken_video.jsonl`: `<image>\\n<audio>` -> Yes/No, over the image / video
  task's training scenes; the user turn's `instruction` is the question's words (what the Q-Former reads; at test
  time the model's own transcript takes its place);
- `{val,test}_{image,video}_{typed,spoken}.jsonl`: MME-style pairs (one Yes and one No per scene and category);
- `{val,test}_{image,video}_open_{typed,spoken}.jsonl`: one open question per type and scene, each a sentence
  training never speaks (`held_out_open`: a held-out wording, or a held-out word of its type); training speaks the
  image and video tasks' other open questions (in `train_spoken_*.jsonl`, with their transcripts).

    python -m xllm.demo.joint_data --image_data .cache/demo/data --video_data .cache/demo_video/data
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from pathlib import Path

from xllm.demo import synthetic as images
from xllm.demo import synthetic_video as videos
from xllm.demo.espeak import Espeak
from xllm.demo.speech_data import TRANSCRIBE, resample, voices, write_wav

# Per category, the words whose questions are never spoken in training (val and test ask only these); the category's
# other questions are. Different words per category, so every word is heard in training, in other sentences.
HELD_OUT_WORDS = {
    "existence": {"triangle"}, "colour": {"circle"}, "position": {"square"}, "count": {"two", "three"},
    "direction": {"circle", "cross"}, "colour_change": {"square", "circle"}, "order": {"diamond"},
    "start_end": {"triangle", "diamond"}, "static": {"cross", "square"},
}
# Open questions (`xllm.demo.shapes_language`, `xllm.demo.video_language`): a sentence is never spoken in training
# when its wording is one of the held-out wordings or it holds one of these words; val and test ask only such ones.
HELD_OUT_OPEN_WORDS = {
    "count": set(), "colour": {"circle"}, "position": {"square"}, "absent": {"triangle"}, "cell": {"center"},
    "which": {"blue"}, "direction": {"circle", "cross"}, "colour_change": {"square"}, "order": {"diamond"},
    "event": {"disappears", "disappear"}, "static": {"cross"},
}
ALL_SHAPES = set(images.SHAPES) | set(videos.SHAPES)


def spoken_words(question: str) -> str:
    """What a listener writes down: `Is the circle red?` -> `is the circle red` (the speech demo's transcripts)."""
    return " ".join(re.sub(r"[^a-z ]", " ", question.lower()).split())


def held_out(category: str, question: str) -> bool:
    """Whether `question` is one of the sentences training never speaks."""
    return bool(set(spoken_words(question).split()) & HELD_OUT_WORDS[category])


def held_out_open(category: str, question: str, wording: str) -> bool:
    """Whether an open question is one of the sentences training never speaks (see `HELD_OUT_OPEN_WORDS`). An `absent`
    question is worded as a colour or position one ("Where is the square?"), and a clip's `static` one as a picture's
    colour one ("What colour is the triangle?"), so those four share their words."""
    sharing = {"colour", "position", "absent", "static"}
    words = set(spoken_words(question).split())
    return wording == "held_out" or any(words & HELD_OUT_OPEN_WORDS[c] for c in (sharing if category in sharing
                                                                                    else {category}))


def open_questions(kind: str, scene, rng: random.Random, held_out_sentences: bool, tries: int = 40,
                   ) -> list[tuple[str, str, str, str]]:
    """(category, question, answer, wording) for each open type that has a sentence of the wanted kind (held out or
    not) about `scene` (a picture's items or a clip), drawn from all wordings."""
    from xllm.demo import shapes_language, video_language

    language = shapes_language if kind == "image" else video_language
    out = []
    for category in language.OPEN_TYPES:
        if category == "absent" and len(scene) == len(images.SHAPES):
            continue
        for _ in range(tries):
            q = language.draw_question(category, scene, rng, None)
            if held_out_open(category, q["question"], q["wording"]) == held_out_sentences:
                out.append((category, q["question"], q["answer"], q["wording"]))
                break
    return out


def image_pairs(items: list[images.Item], rng: random.Random) -> list[tuple[str, str, str]]:
    """(category, question, answer): per category one Yes and one No among the held-out sentences that apply to
    the scene (a category none of whose held-out sentences is true, or false, of it is not asked)."""
    present = {(i.colour, i.shape) for i in items}
    candidates = {
        "existence": [(f"Is there a {c} {s} in the image?", (c, s) in present)
                      for c in images.COLOURS for s in images.SHAPES],
        "count": [(f"Are there {word} shapes in the image?", n == len(items)) for n, word in images.COUNT_WORDS.items()],
        "colour": [(f"Is the {i.shape} {c}?", c == i.colour) for i in items for c in images.COLOURS],
        "position": [(f"Is the {i.shape} at the {images.position_name(r, c)}?", (r, c) == (i.row, i.column))
                     for i in items for r in range(3) for c in range(3)],
    }
    out = []
    for category in images.CATEGORIES:
        usable = [(q, truth) for q, truth in candidates[category] if held_out(category, q)]
        yes, no = [q for q, t in usable if t], [q for q, t in usable if not t]
        if yes and no:
            out += [(category, rng.choice(yes), "Yes"), (category, rng.choice(no), "No")]
    return out


def video_pairs(clip: videos.Clip, rng: random.Random) -> list[tuple[str, str, str]] | None:
    """The video task's questions of `clip` when every category's pair is held out (else None: draw another)."""
    asked = [q for q in videos.yes_no_questions(clip, rng) if q[0] != "static"]
    shown = sorted({(clip.mover.shape, clip.mover.colour), (clip.event.shape, clip.event.colour),
                    *[(f.shape, f.colour) for f in clip.flashes]})
    static = [(s, c) for s, c in shown if s in HELD_OUT_WORDS["static"]]
    if not static or not all(held_out(category, question) for category, question, _ in asked):
        return None
    shape, colour = rng.choice(static)
    other = rng.choice([c for c in videos.COLOURS if c != colour])
    return asked + [("static", f"Is there a {colour} {shape}?", "Yes"), ("static", f"Is there a {other} {shape}?", "No")]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def image_task_scenes(image_data: Path) -> set:
    return {images.scene_key([images.Item(**item) for item in row["items"]])
            for split in ("train", "val", "test") for row in read_jsonl(image_data / f"{split}_scenes.jsonl")}


def video_task_scenes(video_data: Path) -> set:
    def clip(row: dict) -> videos.Clip:
        return videos.Clip(videos.Mover(**row["mover"]), videos.Changer(**row["changer"]), videos.Event(**row["event"]),
                           tuple(videos.Flash(**f) for f in row["flashes"]))

    return {clip(row).key() for split in ("train", "val", "test", "test_combos")
            for row in read_jsonl(video_data / f"{split}_scenes.jsonl")}


class Speaker:
    """Writes each question as a wav in a voice drawn from a pool (eSpeak at 22.05 kHz, resampled to 16 kHz)."""

    def __init__(self, out: Path, rng: random.Random) -> None:
        self.out, self.rng, self.espeak = out, rng, Espeak()
        (out / "audio").mkdir(parents=True, exist_ok=True)

    def say(self, text: str, name: str, held_out_voice: bool) -> tuple[str, str]:
        voice = self.rng.choice(voices(held_out=held_out_voice))
        wave, rate = self.espeak.say(spoken_words(text), voice)
        path = f"audio/{name}.wav"
        write_wav(self.out / path, resample(wave, rate, 16000), 16000)
        return path, str(voice)


def question_records(split: str, media_key: str, media: str, blank: str, asked: list[tuple],
                     media_id: str, speaker: Speaker) -> tuple[list[dict], list[dict]]:
    """Typed and spoken records of one scene's questions (same ids, categories and answers): yes/no pairs
    `(category, question, answer)` or open questions `(category, question, answer, wording)`."""
    typed, spoken = [], []
    for category, question, answer, *wording in asked:
        record_id = f"{media_id}-{category}-{answer.lower()}" if not wording else f"{media_id}-{category}-open"
        audio, voice = speaker.say(question, f"{split}_{record_id}", held_out_voice=True)
        common = {"id": record_id, media_key: media, "category": category, "image_id": media_id,
                  "question": spoken_words(question), "blank": blank, **({"wording": wording[0]} if wording else {})}
        typed.append({**common, "conversations": [{"from": "human", "value": f"<{media_key}>\n{question}"},
                                                  {"from": "gpt", "value": answer}]})
        spoken.append({**common, "audio": audio, "voice": voice, "conversations": [
            {"from": "human", "value": f"<{media_key}>\n<audio>"}, {"from": "gpt", "value": answer}]})
    return typed, spoken


def held_out_split(out: Path, split: str, kind: str, count: int, seed: int, exclude: set, speaker: Speaker,
                   sample, write, blank: str) -> set:
    """`count` scenes of `kind` (image or video) that are not in `exclude`, each with held-out question pairs: drawn
    by `sample(rng) -> (scene, key, asked or None)`, written by `write(scene, rng, path)`; `{split}_{kind}_typed.jsonl`
    and `{split}_{kind}_spoken.jsonl` list their questions. Returns the split's scene keys."""
    rng = random.Random(seed)
    open_rng = random.Random(seed * 7919 + 5)  # its own stream: the scenes and yes/no questions stay as they were
    typed, spoken, open_typed, open_spoken, scenes = [], [], [], [], set()
    (out / f"{kind}s").mkdir(parents=True, exist_ok=True)
    while len(scenes) < count:
        scene, key, asked = sample(rng)
        if not asked or key in exclude or key in scenes:
            continue
        scenes.add(key)
        number = len(scenes) - 1
        name = f"{kind}s/{split}_{number:05d}.{'png' if kind == 'image' else 'mp4'}"
        write(scene, rng, out / name)
        rows = question_records(split, kind, name, blank, asked, f"{split}-{kind}-{number}", speaker)
        typed += rows[0]
        spoken += rows[1]
        rows = question_records(split, kind, name, blank, open_questions(kind, scene, open_rng, True),
                                f"{split}-{kind}-{number}", speaker)
        open_typed += rows[0]
        open_spoken += rows[1]
    images.write_jsonl(out / f"{split}_{kind}_typed.jsonl", typed)
    images.write_jsonl(out / f"{split}_{kind}_spoken.jsonl", spoken)
    images.write_jsonl(out / f"{split}_{kind}_open_typed.jsonl", open_typed)
    images.write_jsonl(out / f"{split}_{kind}_open_spoken.jsonl", open_spoken)
    return scenes


def held_out_images(out: Path, split: str, count: int, seed: int, exclude: set, speaker: Speaker) -> set:
    def sample(rng: random.Random):
        items = images.sample_scene(rng)
        return items, images.scene_key(items), image_pairs(items, rng)

    scenes = held_out_split(out, split, "image", count, seed, exclude, speaker, sample,
                            lambda items, rng, path: images.draw_scene(items, rng).save(path), images.BLANK)
    images.draw_scene([], random.Random(0)).save(out / images.BLANK)
    return scenes


def held_out_clips(out: Path, split: str, count: int, seed: int, exclude: set, speaker: Speaker) -> set:
    import numpy as np

    from xllm.demo.video_files import write_video

    def sample(rng: random.Random):
        clip = videos.sample_clip(rng)
        return clip, clip.key(), video_pairs(clip, rng)

    scenes = held_out_split(out, split, "video", count, seed, exclude, speaker, sample,
                            lambda clip, rng, path: write_video(str(path), videos.draw_clip(clip, rng, 160),
                                                                fps=videos.FPS), videos.BLANK)
    write_video(str(out / videos.BLANK), [np.full((160, 160, 3), 235, np.uint8)] * videos.FRAMES, fps=videos.FPS)
    return scenes


def spoken_training(out: Path, task: str, media_key: str, count: int, rng: random.Random, speaker: Speaker,
                    kind: str = "yesno") -> tuple[list[dict], list[dict]]:
    """ASR and question records for `count` of the task's training questions of `kind` (`yesno` or `open`) whose
    sentences are not held out."""
    def kept(record: dict) -> bool:
        question = record["conversations"][0]["value"].split("\n", 1)[1]
        if kind == "open":
            return not held_out_open(record["category"], question, record["wording"])
        return not held_out(record["category"], question)

    questions = [r for r in read_jsonl(out / task / f"train_{kind}.jsonl") if kept(r)]
    infix, name_infix = ("open-", "open_") if kind == "open" else ("", "")  # ids and audio names as before
    asr, asked = [], []
    for number, record in enumerate(rng.sample(questions, min(count, len(questions)))):
        question = record["conversations"][0]["value"].split("\n", 1)[1]
        audio, voice = speaker.say(question, f"train_{media_key}_{name_infix}{number:05d}", held_out_voice=False)
        words = spoken_words(question)
        asr.append({"id": f"train-{media_key}-{infix}{number}-asr", "audio": audio, "voice": voice, "conversations": [
            {"from": "human", "value": f"<audio>\n{TRANSCRIBE}"}, {"from": "gpt", "value": words}]})
        asked.append({"id": f"train-{media_key}-{infix}{number}", "audio": audio, "voice": voice,
                      media_key: f"{task}/{record[media_key]}", "category": record["category"], "conversations": [
                          {"from": "human", "value": f"<{media_key}>\n<audio>", "instruction": words},
                          {"from": "gpt", "value": record["conversations"][1]["value"]}]})
    return asr, asked


def counting_sentences(out: Path, count: int, rng: random.Random, speaker: Speaker) -> list[dict]:
    """Transcripts of "are there two red circles in the image" (numbers two to six, colours, shapes): no task asks
    them, but they put number words in the question's frame. Chosen on val: with the count category's one trained
    sentence ("are there one shapes in the image") alone, the held-out "two" and "three" were heard as "one"."""
    colours, shapes = list(images.COLOURS), sorted(ALL_SHAPES)
    out_rows = []
    for number in range(count):
        words = (f"are there {rng.choice(['two', 'three', 'four', 'five', 'six'])} {rng.choice(colours)} "
                 f"{rng.choice(shapes)}s in the image")
        audio, voice = speaker.say(words, f"train_count_{number:05d}", held_out_voice=False)
        out_rows.append({"id": f"train-count-{number}-asr", "audio": audio, "voice": voice, "conversations": [
            {"from": "human", "value": f"<audio>\n{TRANSCRIBE}"}, {"from": "gpt", "value": words}]})
    return out_rows


def build_joint_task(out: str | Path, image_data: str | Path, video_data: str | Path, train_image: int = 900,
                     train_video: int = 700, val_images: int = 30, test_images: int = 80, val_clips: int = 20,
                     test_clips: int = 50, train_counting: int = 300, train_open_image: int = 900,
                     train_open_video: int = 500, seed: int = 0) -> Path:
    """Write the joint task into `out` (see the module's docstring); cached by a stamp of its settings. The image
    and video tasks' folders are linked into `out` (`image_task/`, `video_task/`) so one media root holds all."""
    out = Path(out)
    settings = {"image_data": str(Path(image_data).resolve()), "video_data": str(Path(video_data).resolve()),
                "train_image": train_image, "train_video": train_video, "val_images": val_images,
                "test_images": test_images, "val_clips": val_clips, "test_clips": test_clips,
                "train_counting": train_counting, "train_open_image": train_open_image,
                "train_open_video": train_open_video, "seed": seed, "version": 5}
    stamp = out / "COMPLETE"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for link, target in (("image_task", settings["image_data"]), ("video_task", settings["video_data"])):
        if os.path.lexists(out / link):
            os.remove(out / link)
        os.symlink(target, out / link)
    rng = random.Random(seed)
    speaker = Speaker(out, rng)
    image_scenes = image_task_scenes(out / "image_task")
    val = held_out_images(out, "val", val_images, seed * 1000 + 11, image_scenes, speaker)
    held_out_images(out, "test", test_images, seed * 1000 + 12, image_scenes | val, speaker)
    clip_scenes = video_task_scenes(out / "video_task")
    val = held_out_clips(out, "val", val_clips, seed * 1000 + 13, clip_scenes, speaker)
    held_out_clips(out, "test", test_clips, seed * 1000 + 14, clip_scenes | val, speaker)
    image_asr, image_asked = spoken_training(out, "image_task", "image", train_image, rng, speaker)
    video_asr, video_asked = spoken_training(out, "video_task", "video", train_video, rng, speaker)
    counting = counting_sentences(out, train_counting, rng, speaker)
    image_open_asr, image_open = spoken_training(out, "image_task", "image", train_open_image, rng, speaker, "open")
    video_open_asr, video_open = spoken_training(out, "video_task", "video", train_open_video, rng, speaker, "open")
    transcripts = image_asr + video_asr + counting + image_open_asr + video_open_asr
    images.write_jsonl(out / "train_spoken_asr.jsonl", transcripts)
    images.write_jsonl(out / "train_spoken_image.jsonl", image_asked + image_open)
    images.write_jsonl(out / "train_spoken_video.jsonl", video_asked + video_open)
    spoken_in_training = {r["conversations"][1]["value"] for r in transcripts}
    for split in ("val", "test"):
        for kind in ("image", "video"):
            for stem in ("spoken", "open_spoken"):
                unseen = {r["question"] for r in read_jsonl(out / f"{split}_{kind}_{stem}.jsonl")}
                assert not unseen & spoken_in_training, \
                    f"{split} {kind}: held-out sentences spoken in training: {sorted(unseen & spoken_in_training)[:5]}"
    stamp.write_text(json.dumps(settings))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".cache/demo_joint/data")
    parser.add_argument("--image_data", default=".cache/demo/data")
    parser.add_argument("--video_data", default=".cache/demo_video/data")
    args = parser.parse_args()
    print(build_joint_task(args.out, args.image_data, args.video_data))


if __name__ == "__main__":
    main()
