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


def build_split(
    out: Path, split: str, images: int, seed: int, image_size: int = 224, exclude: frozenset = frozenset(),
) -> set[frozenset[Item]]:
    """Writes `images/{split}_*.png` and `{split}_captions.jsonl`, `{split}_chat.jsonl`, `{split}_yesno.jsonl`,
    `{split}_scenes.jsonl` (each image's items), with no scene of `exclude`; returns the split's scenes."""
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    captions, chats, questions, truths, scenes = [], [], [], [], set()
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
    for stem, rows in (("captions", captions), ("chat", chats), ("yesno", questions), ("scenes", truths)):
        write_jsonl(out / f"{split}_{stem}.jsonl", rows)
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
    wanted = json.dumps({"train": train, "val": val, "test": test, "seed": seed, "version": 4, "size": image_size})
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
