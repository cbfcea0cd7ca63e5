"""The video demo's task, generated at demo time: shapes on a 3×3 grid that move, change colour, appear and disappear.

Every clip (16 frames, 8 fps, H.264 through PyAV) holds four shapes of distinct kinds, each with one role:
a *mover* crosses a row or a column, a *changer* turns from one colour to another, and two *events* appear or
disappear at different moments. Each clip gets one "Yes" and one "No" question per category, as MME pairs them:

- temporal: `direction` ("Does the circle move to the left?"), `colour_change` ("Does the square turn blue?"),
  `order` ("Does the triangle appear before the diamond disappears?"), `start_end` ("Is the diamond there at the
  end?");
- `static`, the control ("Is there a red circle?").

Every temporal "No" differs from its "Yes" only in time — the reverse direction, the colour before the change for
the one after, "after" for "before", start for end — so a model that sees the frames as a set without their order
(the no-time ablation) cannot tell them apart, while the static control stays answerable (facts measured for this
design: DESIGN.md).

Splits (`build_video_task`): `test` and `val` clips are drawn first and `train` avoids their scenes, so no held-out
scene (shapes, colours, paths, cells, moments) occurs in training; `test_combos` holds clips whose every shape
uses a (shape, colour, direction/event) combination that no training clip contains (`HELD_OUT`).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, astuple, dataclass
from pathlib import Path

import numpy as np

from xllm.demo.synthetic import COLOURS, write_jsonl
from xllm.demo.video_files import write_video

SHAPES = ("circle", "square", "triangle", "diamond")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
DIRECTION_WORDS = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
EVENTS = ("appear", "disappear")
TEMPORAL = ("direction", "colour_change", "order", "start_end")
CATEGORIES = (*TEMPORAL, "static")
FRAMES, FPS = 16, 8
BLANK = "videos/blank.mp4"
FIRST_MOMENT, LAST_MOMENT, MIN_GAP = 3, 13, 3  # events happen between sampled frames, far enough apart to order

# Combinations no training clip contains (the `test_combos` split uses only these), one per shape and role, so
# every colour, direction and event still occurs in training with other shapes.
HELD_OUT = {
    "mover": {("circle", "red", "left"), ("square", "green", "up"), ("triangle", "blue", "right"),
              ("diamond", "yellow", "down")},
    "changer": {("circle", "blue", "yellow"), ("square", "yellow", "red"), ("triangle", "red", "green"),
                ("diamond", "green", "blue")},
    "event": {("circle", "green", "appear"), ("square", "blue", "disappear"), ("triangle", "yellow", "appear"),
              ("diamond", "red", "disappear"), ("circle", "yellow", "disappear"), ("square", "red", "appear"),
              ("triangle", "green", "disappear"), ("diamond", "blue", "appear")},
}


@dataclass(frozen=True)
class Mover:
    shape: str
    colour: str
    direction: str
    line: int  # the row (left/right) or column (up/down) it crosses

    def cell(self, progress: float) -> tuple[float, float]:
        """(row, column) in cell units at `progress` 0..1 along its path, end cell to end cell."""
        dr, dc = DIRECTIONS[self.direction]
        along = progress * 2 if dr + dc > 0 else 2 - progress * 2
        return (along, self.line) if dr else (self.line, along)


@dataclass(frozen=True)
class Changer:
    shape: str
    before: str
    after: str
    row: int
    column: int
    at: int  # first frame in the new colour


@dataclass(frozen=True)
class Event:
    shape: str
    colour: str
    kind: str  # appear | disappear
    row: int
    column: int
    at: int  # first frame of the new state

    def visible(self, frame: int) -> bool:
        return (frame >= self.at) == (self.kind == "appear")


@dataclass(frozen=True)
class Clip:
    mover: Mover
    changer: Changer
    events: tuple[Event, Event]  # ordered by moment

    def key(self) -> tuple:
        """What a scene is, whatever the drawing's jitter."""
        return astuple(self)

    def combos(self) -> list[tuple[str, tuple]]:
        m, c = self.mover, self.changer
        return [("mover", (m.shape, m.colour, m.direction)), ("changer", (c.shape, c.before, c.after)),
                *[("event", (e.shape, e.colour, e.kind)) for e in self.events]]

    def held_out_combos(self) -> int:
        return sum(combo in HELD_OUT[role] for role, combo in self.combos())


def sample_clip(rng: random.Random) -> Clip:
    shapes = rng.sample(SHAPES, 4)
    direction = rng.choice(list(DIRECTIONS))
    line = rng.randrange(3)
    horizontal = DIRECTIONS[direction][0] == 0
    free = [(r, c) for r in range(3) for c in range(3) if (r if horizontal else c) != line]
    cells = rng.sample(free, 3)
    before, after = rng.sample(list(COLOURS), 2)
    first = rng.randint(FIRST_MOMENT, LAST_MOMENT - MIN_GAP)
    second = rng.randint(first + MIN_GAP, LAST_MOMENT)
    events = tuple(Event(shape, rng.choice(list(COLOURS)), rng.choice(EVENTS), *cell, at)
                   for shape, cell, at in zip(shapes[2:], cells[1:], (first, second)))
    return Clip(Mover(shapes[0], rng.choice(list(COLOURS)), direction, line),
                Changer(shapes[1], before, after, *cells[0], rng.randint(FIRST_MOMENT, LAST_MOMENT)), events)


def sample_held_out_clip(rng: random.Random) -> Clip:
    """A clip whose every shape uses a held-out combination of its role."""
    while True:
        mover = rng.choice(sorted(HELD_OUT["mover"]))
        changer = rng.choice([c for c in sorted(HELD_OUT["changer"]) if c[0] != mover[0]])
        events = rng.sample([e for e in sorted(HELD_OUT["event"]) if e[0] not in (mover[0], changer[0])], 2)
        if events[0][0] != events[1][0]:
            break
    clip = sample_clip(rng)  # cells, lines and moments as any clip's
    return Clip(Mover(*mover, clip.mover.line), Changer(*changer, *astuple(clip.changer)[3:]),
                tuple(Event(*combo, *astuple(e)[3:]) for combo, e in zip(events, clip.events)))


def draw_shape(draw, shape: str, cx: float, cy: float, half: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - half * 0.9, cy - half * 0.9, cx + half * 0.9, cy + half * 0.9), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=fill)


def draw_clip(clip: Clip, rng: random.Random, size: int = 160) -> list[np.ndarray]:
    """The clip's frames, `[size, size, 3]` uint8 each (sizes and offsets jittered once per clip)."""
    from PIL import Image, ImageDraw

    cell = size / 3
    half = {shape: cell * rng.uniform(0.28, 0.38) for shape in SHAPES}
    jitter = {shape: (rng.uniform(-0.06, 0.06) * cell, rng.uniform(-0.06, 0.06) * cell) for shape in SHAPES}

    def centre(shape: str, row: float, column: float) -> tuple[float, float]:
        return cell * (column + 0.5) + jitter[shape][0], cell * (row + 0.5) + jitter[shape][1]

    frames = []
    for frame in range(FRAMES):
        image = Image.new("RGB", (size, size), (235, 235, 235))
        draw = ImageDraw.Draw(image)
        m, c = clip.mover, clip.changer
        draw_shape(draw, c.shape, *centre(c.shape, c.row, c.column), half[c.shape],
                   COLOURS[c.after if frame >= c.at else c.before])
        for e in clip.events:
            if e.visible(frame):
                draw_shape(draw, e.shape, *centre(e.shape, e.row, e.column), half[e.shape], COLOURS[e.colour])
        draw_shape(draw, m.shape, *centre(m.shape, *m.cell(frame / (FRAMES - 1))), half[m.shape], COLOURS[m.colour])
        frames.append(np.asarray(image))
    return frames


def yes_no_questions(clip: Clip, rng: random.Random) -> list[tuple[str, str, str]]:
    """(category, question, answer): one Yes and one No per category; each temporal No differs only in time."""
    m, c = clip.mover, clip.changer
    first, second = clip.events
    out = []
    yes, no = DIRECTION_WORDS[m.direction], DIRECTION_WORDS[OPPOSITE[m.direction]]
    out += [("direction", f"Does the {m.shape} move {yes}?", "Yes"), ("direction", f"Does the {m.shape} move {no}?", "No")]
    out += [("colour_change", f"Does the {c.shape} turn {c.after}?", "Yes"),
            ("colour_change", f"Does the {c.shape} turn {c.before}?", "No")]
    # One word tells each pair apart ("before"/"after"), so a pair differs in time alone, not also in which clause
    # comes first (as swapped clauses did); either event may lead the sentence so that neither word goes with one
    # answer (tested).
    a, b, yes, no = (first, second, "before", "after") if rng.random() < 0.5 else (second, first, "after", "before")
    out += [("order", f"Does the {a.shape} {a.kind} {yes} the {b.shape} {b.kind}s?", "Yes"),
            ("order", f"Does the {a.shape} {a.kind} {no} the {b.shape} {b.kind}s?", "No")]
    event = rng.choice(clip.events)
    there, absent = ("end", "start") if event.kind == "appear" else ("start", "end")
    out += [("start_end", f"Is the {event.shape} there at the {there}?", "Yes"),
            ("start_end", f"Is the {event.shape} there at the {absent}?", "No")]
    shown = rng.choice([(m.shape, m.colour), *[(e.shape, e.colour) for e in clip.events]])
    other = rng.choice([colour for colour in COLOURS if colour != shown[1]])
    out += [("static", f"Is there a {shown[1]} {shown[0]}?", "Yes"), ("static", f"Is there a {other} {shown[0]}?", "No")]
    return out


def caption(clip: Clip) -> str:
    m, c = clip.mover, clip.changer
    events = " and ".join(f"the {e.colour} {e.shape} {e.kind}s" for e in clip.events)
    return (f"A {m.colour} {m.shape} moves {DIRECTION_WORDS[m.direction]}, the {c.shape} turns from {c.before} to "
            f"{c.after}, then {events}.")


def pair_records(questions: list[dict], seed: int) -> list[dict]:
    """Stage 0's records: one per clip and category, its Yes and No questions as two turns (in a random order, so
    a record read as a conversation does not teach "the second answer is No"); with `batch_by_record` both
    answers about the same frames share every batch."""
    order = random.Random(seed)  # its own stream: the clips drawn do not depend on it
    records = []
    for yes, no in zip(questions[::2], questions[1::2]):
        assert yes["image_id"] == no["image_id"] and yes["category"] == no["category"], (yes["id"], no["id"])
        turns = [yes["conversations"], no["conversations"]]
        order.shuffle(turns)
        (question, answer), (second, second_answer) = turns
        second = {**second, "value": second["value"].removeprefix("<video>\n")}  # one clip, one placeholder
        records.append({"id": f"{yes['image_id']}-{yes['category']}", "video": yes["video"],
                        "category": yes["category"], "image_id": yes["image_id"],
                        "conversations": [question, answer, second, second_answer]})
    return records


def build_split(
    out: Path, split: str, clips: int, seed: int, exclude: frozenset = frozenset(), held_out: bool = False,
    size: int = 160,
) -> set[tuple]:
    """Writes `videos/{split}_*.mp4`, `{split}_yesno.jsonl`, `{split}_captions.jsonl` and `{split}_scenes.jsonl`
    (what each clip holds: roles, shapes, colours, cells, moments), with no scene of
    `exclude`; clips use held-out combinations only (`held_out`) or none of them; returns the split's scenes."""
    rng = random.Random(seed)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    questions, captions, truths, scenes = [], [], [], set()
    for index in range(clips):
        while True:
            clip = sample_held_out_clip(rng) if held_out else sample_clip(rng)
            if clip.key() not in exclude and clip.key() not in scenes and (held_out or not clip.held_out_combos()):
                break
        scenes.add(clip.key())
        name = f"videos/{split}_{index:05d}.mp4"
        write_video(str(out / name), draw_clip(clip, rng, size), fps=FPS)
        video_id = f"{split}-{index}"
        truths.append({"id": video_id, "video": name, **asdict(clip)})
        captions.append({"id": video_id, "video": name, "conversations": [
            {"from": "human", "value": "<video>\nDescribe the video briefly."}, {"from": "gpt", "value": caption(clip)}]})
        for category, question, answer in yes_no_questions(clip, rng):
            questions.append({"id": f"{video_id}-{category}-{answer.lower()}", "video": name, "category": category,
                              "image_id": video_id, "conversations": [
                                  {"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}]})
    write_jsonl(out / f"{split}_yesno.jsonl", questions)
    if split == "train":
        write_jsonl(out / "train_pairs.jsonl", pair_records(questions, seed))
    write_jsonl(out / f"{split}_captions.jsonl", captions)
    write_jsonl(out / f"{split}_scenes.jsonl", truths)
    return scenes


def build_video_task(
    out: str | Path, train: int = 1000, val: int = 40, test: int = 40, test_combos: int = 40, seed: int = 0,
    size: int = 160,
) -> Path:
    """Four splits with fixed seeds: `test` and `val` first, then `train` avoiding their scenes and every held-out
    combination, then `test_combos` (held-out combinations only, so none of its scenes can occur in training)."""
    out = Path(out)
    stamp = out / "COMPLETE"
    wanted = json.dumps({"train": train, "val": val, "test": test, "test_combos": test_combos, "seed": seed,
                         "size": size, "version": 5})
    if stamp.exists() and stamp.read_text() == wanted:
        return out
    test_scenes = build_split(out, "test", test, seed * 1000 + 2, size=size)
    val_scenes = build_split(out, "val", val, seed * 1000 + 1, frozenset(test_scenes), size=size)
    build_split(out, "train", train, seed * 1000, frozenset(test_scenes | val_scenes), size=size)
    build_split(out, "test_combos", test_combos, seed * 1000 + 3, held_out=True, size=size)
    blank = np.full((size, size, 3), 235, np.uint8)  # the video-blind baseline's clip: the background alone
    write_video(str(out / BLANK), [blank] * FRAMES, fps=FPS)
    stamp.write_text(wanted)
    return out
