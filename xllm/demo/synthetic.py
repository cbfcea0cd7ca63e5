"""The demo's visual task, generated at demo time: coloured shapes on a 3×3 grid.

Each image holds 1-3 shapes of distinct kinds (circle, square, triangle) in distinct cells, in one of four
colours. Every image gets a caption, a multi-turn instruction conversation, and MME-style yes/no questions:
for each of four categories (existence, count, colour, position) one question whose answer is "Yes" and
one whose answer is "No", so that MME's acc+ (both questions of an image right) is defined. The splits share
no scene (`build_shapes_task`).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 230), "yellow": (240, 210, 20)}
SHAPES = ("circle", "square", "triangle")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
CATEGORIES = ("existence", "count", "colour", "position")
BLANK = "images/blank.png"
YES_NO_SUFFIX = ""  # MME adds " Please answer yes or no."; shorter sequences train faster on a CPU


def position_name(row: int, column: int) -> str:
    """`top left`, `top`, ..., `center`, ..., `bottom right`."""
    if row == 1 and column == 1:
        return "center"
    if row == 1:
        return COLUMNS[column]
    if column == 1:
        return ROWS[row]
    return f"{ROWS[row]} {COLUMNS[column]}"


@dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    row: int
    column: int

    @property
    def position(self) -> str:
        return position_name(self.row, self.column)


def sample_scene(rng: random.Random) -> list[Item]:
    count = rng.randint(1, 3)
    shapes = rng.sample(SHAPES, count)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], count)
    return [Item(shape, rng.choice(list(COLOURS)), r, c) for shape, (r, c) in zip(shapes, cells)]


def scene_key(items: list[Item]) -> frozenset[Item]:
    """What a scene is, whatever the drawing's jitter: its shapes, colours and cells."""
    return frozenset(items)


def draw_scene(items: list[Item], rng: random.Random, size: int = 224):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for item in items:
        half = cell * rng.uniform(0.28, 0.4)
        cx = cell * (item.column + 0.5) + rng.uniform(-0.08, 0.08) * cell
        cy = cell * (item.row + 0.5) + rng.uniform(-0.08, 0.08) * cell
        fill = COLOURS[item.colour]
        if item.shape == "circle":
            draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
        elif item.shape == "square":
            draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return image


def caption(items: list[Item]) -> str:
    parts = [f"a {i.colour} {i.shape} at the {i.position}" for i in sorted(items, key=lambda i: (i.row, i.column))]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def yes_no_questions(items: list[Item], rng: random.Random) -> list[tuple[str, str, str]]:
    """(category, question, answer) — one Yes and one No per category."""
    out = []
    present = rng.choice(items)
    absent = rng.choice([(c, s) for c in COLOURS for s in SHAPES
                         if not any(i.colour == c and i.shape == s for i in items)])
    out.append(("existence", f"Is there a {present.colour} {present.shape} in the image?", "Yes"))
    out.append(("existence", f"Is there a {absent[0]} {absent[1]} in the image?", "No"))
    wrong = rng.choice([n for n in COUNT_WORDS if n != len(items)])
    out.append(("count", f"Are there {COUNT_WORDS[len(items)]} shapes in the image?", "Yes"))
    out.append(("count", f"Are there {COUNT_WORDS[wrong]} shapes in the image?", "No"))
    item = rng.choice(items)
    other = rng.choice([c for c in COLOURS if c != item.colour])
    out.append(("colour", f"Is the {item.shape} {item.colour}?", "Yes"))
    out.append(("colour", f"Is the {item.shape} {other}?", "No"))
    item = rng.choice(items)
    elsewhere = rng.choice([position_name(r, c) for r in range(3) for c in range(3) if (r, c) != (item.row, item.column)])
    out.append(("position", f"Is the {item.shape} at the {item.position}?", "Yes"))
    out.append(("position", f"Is the {item.shape} at the {elsewhere}?", "No"))
    return [(c, q + YES_NO_SUFFIX, a) for c, q, a in out]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def talk_records(items: list[Item], name: str, image_id: str, rng: random.Random, held_out: bool | None,
                 ) -> dict[str, list[dict]]:
    """The open questions (one per type), the description request and a follow-up chat about one image, as records
    (`category`, `wording` and `image_id` kept for scoring), and stage 0's record: each question with what the
    Q-Former spells for it (`xllm.demo.shapes_language.evidence`). `held_out`: which wordings (see `draw_question`)."""
    from xllm.demo.shapes_language import OPEN_TYPES, WORDINGS, describe, draw_follow_up, draw_question

    def record(suffix: str, category: str, wording: str, turns: list[tuple[str, str]]) -> dict:
        conversations = [{"from": role, "value": text} for question, reply in turns
                         for role, text in (("human", question), ("gpt", reply))]
        conversations[0]["value"] = f"<image>\n{conversations[0]['value']}"
        return {"id": f"{image_id}-{suffix}", "image": name, "category": category, "wording": wording,
                "image_id": image_id, "conversations": conversations}

    kinds = [kind for kind in OPEN_TYPES if kind != "absent" or len(items) < len(SHAPES)]
    asked = [draw_question(kind, items, rng, held_out) for kind in kinds]
    seen, unseen = WORDINGS["describe"]
    request = rng.choice(seen if held_out is False else seen + unseen)
    first, second = draw_follow_up(items, rng, held_out)
    return {
        "open": [record(q["category"], q["category"], q["wording"], [(q["question"], q["answer"])]) for q in asked],
        # `objects`: what the picture holds, for `evaluate.py --metric describe` (xllm.evaluation.scenes)
        "describe": [{**record("describe", "describe", "held_out" if request in unseen else "seen",
                               [(request, describe(items))]),
                      "objects": [{"kind": i.shape, "colour": i.colour, "place": i.position} for i in items]}],
        "follow_up": [record("follow_up", "follow_up", second["wording"],
                             [(first["question"], first["answer"]), (second["question"], second["answer"])])],
        "stage0": [record("stage0", "stage0", "seen", [(q["question"], q["evidence"]) for q in asked]
                          + [(request, describe(items))])],
    }


def build_split(
    out: Path, split: str, images: int, seed: int, image_size: int = 224, exclude: frozenset = frozenset(),
) -> set[frozenset[Item]]:
    """Writes `images/{split}_*.png` and per image: `{split}_captions.jsonl` (a caption), `{split}_chat.jsonl` (a
    multi-turn chat), `{split}_yesno.jsonl` (MME's pairs), `{split}_open.jsonl` (one open question per type),
    `{split}_describe.jsonl`, `{split}_followup.jsonl` (a turn that refers back), `{split}_scenes.jsonl` (each image's
    items) and, for `train`, `train_stage0.jsonl` (stage 0's records: yes/no pairs and what the Q-Former spells), with
    no scene of `exclude`; returns the split's scenes. Training uses training wordings only; val and test draw from
    all wordings, held-out ones included. The open questions draw from their own random stream, so the images and
    yes/no questions are those of the yes/no-only task (version 4)."""
    rng = random.Random(seed)
    talk_rng = random.Random(seed * 7919 + 17)
    (out / "images").mkdir(parents=True, exist_ok=True)
    captions, chats, questions, truths, scenes = [], [], [], [], set()
    talk: dict[str, list[dict]] = {"open": [], "describe": [], "follow_up": [], "stage0": []}
    for index in range(images):
        items = sample_scene(rng)
        while scene_key(items) in exclude:
            items = sample_scene(rng)
        scenes.add(scene_key(items))
        name = f"images/{split}_{index:05d}.png"
        draw_scene(items, rng, image_size).save(out / name)
        image_id = f"{split}-{index}"
        truths.append({"id": image_id, "image": name, "items": [asdict(item) for item in items]})
        text = caption(items)
        captions.append({"id": image_id, "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."}, {"from": "gpt", "value": text}]})
        asked = yes_no_questions(items, rng)
        for number, (category, question, answer) in enumerate(asked):
            questions.append({"id": f"{image_id}-{category}-{answer.lower()}", "image": name, "category": category,
                              "image_id": image_id, "conversations": [
                                  {"from": "human", "value": f"<image>\n{question}"},
                                  {"from": "gpt", "value": answer}]})
        first, second = rng.sample(asked, 2)
        chats.append({"id": image_id, "image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{first[1]}"}, {"from": "gpt", "value": first[2]},
            {"from": "human", "value": second[1]}, {"from": "gpt", "value": second[2]},
            {"from": "human", "value": "Describe the image briefly."}, {"from": "gpt", "value": text}]})
        for kind, rows in talk_records(items, name, image_id, talk_rng, False if split == "train" else None).items():
            talk[kind] += rows
        talk["stage0"][-1]["conversations"] += [turn for q in asked for turn in (
            {"from": "human", "value": q[1]}, {"from": "gpt", "value": q[2]})]
    for stem, rows in (("captions", captions), ("chat", chats), ("yesno", questions), ("scenes", truths),
                       ("open", talk["open"]), ("describe", talk["describe"]), ("followup", talk["follow_up"])):
        write_jsonl(out / f"{split}_{stem}.jsonl", rows)
    if split == "train":
        write_jsonl(out / "train_stage0.jsonl", talk["stage0"])
    return scenes


def build_shapes_task(
    out: str | Path, train: int = 2000, val: int = 100, test: int = 200, seed: int = 0, image_size: int = 224
) -> Path:
    """Three splits with fixed seeds, disjoint by scene: no test scene (shapes, colours and cells) occurs in val or
    train, and no val scene in train. Test and val are drawn first and train avoids their scenes, so the held-out
    splits keep the generator's own mix (one-shape scenes included: there are only 108 of them, and a train
    split drawn freely holds most)."""
    out = Path(out)
    stamp, blank = out / "COMPLETE", out / BLANK
    wanted = json.dumps({"train": train, "val": val, "test": test, "seed": seed, "version": 6, "size": image_size})
    if stamp.exists() and stamp.read_text() == wanted:
        if not blank.exists():  # a task built before the blank image was part of it
            draw_scene([], random.Random(0), image_size).save(blank)
        return out
    test_scenes = build_split(out, "test", test, seed * 1000 + 2, image_size)
    val_scenes = build_split(out, "val", val, seed * 1000 + 1, image_size, frozenset(test_scenes))
    build_split(out, "train", train, seed * 1000, image_size, frozenset(test_scenes | val_scenes))
    draw_scene([], random.Random(0), image_size).save(blank)  # the image-blind baseline's image: the background alone
    stamp.write_text(wanted)
    return out
