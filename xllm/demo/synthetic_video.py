"""The video demo's task, generated at demo time: shapes on a 3×3 grid that move, change colour, appear, disappear
and flash.

Every clip (16 frames, 8 fps, H.264 through PyAV; the interface samples the odd frames 1, 3, ..., 15) holds five
shapes of distinct kinds, each with one role: a *mover* crosses a row or a column, a *changer* turns from one colour
to another, an *event* shape appears or disappears and stays so, and two *flashes* each show for a moment (two
sampled frames) and go, one after the other. Each clip gets one "Yes" and one "No" question per category, as MME
pairs them:

- temporal: `direction` ("Does the circle move to the left?"), `colour_change` ("Does the square turn blue?"),
  `order` ("Does the triangle appear before the cross?"), `start_end` ("Is the diamond there at the end?");
- `static`, the control ("Is there a red circle?").

Every temporal "No" is the "Yes" of the same clip played backwards (`Clip.reversed`: the reverse direction, the
colour before the change for the one after, the two flashes swapped, start for end), and the clips are drawn so
that a clip and its reversal are equally likely in every split (moments from ranges symmetric in time, held-out
combinations closed under reversal). So a model that sees the sampled frames as a set, without their order (the
no-time ablation), cannot do better than chance on any temporal category, while the static control stays
answerable. Order asks about two *flashes* because two events that happen once and stay (appear, disappear) leave
their order in single frames: the frames between them show both shapes, or neither, and which one depends on the
order (measured: README).

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

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
DIRECTION_WORDS = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
EVENTS = ("appear", "disappear")
BACKWARDS = {"appear": "disappear", "disappear": "appear"}  # an event played backwards
TEMPORAL = ("direction", "colour_change", "order", "start_end")
CATEGORIES = (*TEMPORAL, "static")
FRAMES, FPS = 16, 8
BLANK = "videos/blank.mp4"
# Time reversal maps sampled frame f to 16 - f (1 <-> 15), so a state that starts at frame `at` starts at 17 - at
# backwards: moments are drawn from ranges closed under that map.
FIRST_MOMENT, LAST_MOMENT = 3, 14  # a change happens with at least one sampled frame on each side
FLASH, FLASH_GAP = 4, 1  # a flash lasts 4 frames (2 sampled ones); the second starts >= 1 frame after the first ends
FLASH_PAIRS = [(a, b) for a in range(1, 13) for b in range(a + FLASH + FLASH_GAP, 13)]  # (a, b) <-> (13-b, 13-a)


def _both_ways(role: str, combos: list[tuple]) -> set[tuple]:
    """A held-out combination together with its time reversal, so reversing a clip never enters or leaves them."""
    reverse = {"mover": lambda s, c, d: (s, c, OPPOSITE[d]), "changer": lambda s, a, b: (s, b, a),
               "event": lambda s, c, k: (s, c, BACKWARDS[k]), "flash": lambda s, c, k: (s, c, k)}
    return {combo for c in combos for combo in (c, reverse[role](*c))}


# Combinations no training clip contains (the `test_combos` split uses only these): one (shape, colour) per shape and
# role, in both directions of time, so every colour, direction and event still occurs in training with other shapes.
HELD_OUT = {
    "mover": _both_ways("mover", [("circle", "red", "left"), ("square", "green", "up"), ("triangle", "blue", "right"),
                                  ("diamond", "yellow", "down"), ("cross", "red", "up")]),
    "changer": _both_ways("changer", [("circle", "blue", "yellow"), ("square", "yellow", "red"),
                                      ("triangle", "red", "green"), ("diamond", "green", "blue"),
                                      ("cross", "blue", "red")]),
    "event": _both_ways("event", [("circle", "green", "appear"), ("square", "blue", "appear"),
                                  ("triangle", "yellow", "appear"), ("diamond", "red", "appear"),
                                  ("cross", "green", "appear")]),
    "flash": _both_ways("flash", [("circle", "yellow", "flash"), ("square", "red", "flash"),
                                  ("triangle", "green", "flash"), ("diamond", "blue", "flash"),
                                  ("cross", "yellow", "flash")]),
}


@dataclass(frozen=True)
class Mover:
    shape: str
    colour: str
    direction: str
    line: int  # the row (left/right) or column (up/down) it crosses

    def cell(self, frame: int) -> tuple[float, float]:
        """(row, column) in cell units at `frame`: the first sampled frame (1) at one end cell, the last (15) at
        the other."""
        progress = (frame - 1) / (FRAMES - 2)
        dr, dc = DIRECTIONS[self.direction]
        along = progress * 2 if dr + dc > 0 else 2 - progress * 2
        return (along, self.line) if dr else (self.line, along)

    def reversed(self) -> Mover:
        return Mover(self.shape, self.colour, OPPOSITE[self.direction], self.line)


@dataclass(frozen=True)
class Changer:
    shape: str
    before: str
    after: str
    row: int
    column: int
    at: int  # first frame in the new colour

    def reversed(self) -> Changer:
        return Changer(self.shape, self.after, self.before, self.row, self.column, 17 - self.at)


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

    def reversed(self) -> Event:
        return Event(self.shape, self.colour, BACKWARDS[self.kind], self.row, self.column, 17 - self.at)


@dataclass(frozen=True)
class Flash:
    shape: str
    colour: str
    row: int
    column: int
    at: int  # first frame shown; shown for FLASH frames

    def visible(self, frame: int) -> bool:
        return self.at <= frame < self.at + FLASH

    def reversed(self) -> Flash:
        return Flash(self.shape, self.colour, self.row, self.column, 17 - FLASH - self.at)


@dataclass(frozen=True)
class Clip:
    mover: Mover
    changer: Changer
    event: Event
    flashes: tuple[Flash, Flash]  # in the order they show

    def key(self) -> tuple:
        """What a scene is, whatever the drawing's jitter."""
        return astuple(self)

    def reversed(self) -> Clip:
        """The same clip played backwards (its sampled frames in reverse order: `draw_clip`'s frame f becomes 16 - f):
        what the frames as a set cannot tell from this clip."""
        first, second = self.flashes
        return Clip(self.mover.reversed(), self.changer.reversed(), self.event.reversed(),
                    (second.reversed(), first.reversed()))

    def combos(self) -> list[tuple[str, tuple]]:
        m, c, e = self.mover, self.changer, self.event
        return [("mover", (m.shape, m.colour, m.direction)), ("changer", (c.shape, c.before, c.after)),
                ("event", (e.shape, e.colour, e.kind)),
                *[("flash", (f.shape, f.colour, "flash")) for f in self.flashes]]

    def held_out_combos(self) -> int:
        return sum(combo in HELD_OUT[role] for role, combo in self.combos())


def sample_clip(rng: random.Random) -> Clip:
    """A clip drawn so that it and its reversal are equally likely: directions, colour pairs, event kinds and every
    moment come from sets that time reversal maps onto themselves."""
    shapes = rng.sample(SHAPES, 5)
    direction = rng.choice(list(DIRECTIONS))
    line = rng.randrange(3)
    horizontal = DIRECTIONS[direction][0] == 0
    free = [(r, c) for r in range(3) for c in range(3) if (r if horizontal else c) != line]
    cells = rng.sample(free, 4)
    before, after = rng.sample(list(COLOURS), 2)
    first, second = rng.choice(FLASH_PAIRS)
    return Clip(Mover(shapes[0], rng.choice(list(COLOURS)), direction, line),
                Changer(shapes[1], before, after, *cells[0], rng.randint(FIRST_MOMENT, LAST_MOMENT)),
                Event(shapes[2], rng.choice(list(COLOURS)), rng.choice(EVENTS), *cells[1],
                      rng.randint(FIRST_MOMENT, LAST_MOMENT)),
                tuple(Flash(shape, rng.choice(list(COLOURS)), *cell, at)
                      for shape, cell, at in zip(shapes[3:], cells[2:], (first, second))))


def sample_held_out_clip(rng: random.Random) -> Clip:
    """A clip whose every shape uses a held-out combination of its role."""
    roles = ("mover", "changer", "event", "flash", "flash")
    shapes = rng.sample(SHAPES, 5)
    combos = [rng.choice(sorted(c for c in HELD_OUT[role] if c[0] == shape)) for role, shape in zip(roles, shapes)]
    (mover, changer, event, *flashes) = combos
    while True:  # cells, lines and moments as any clip's whose mover crosses the same way (the others avoid its line)
        clip = sample_clip(rng)
        if DIRECTIONS[clip.mover.direction][0] == DIRECTIONS[mover[2]][0]:
            break
    return Clip(Mover(*mover, clip.mover.line), Changer(*changer, *astuple(clip.changer)[3:]),
                Event(*event, *astuple(clip.event)[3:]),
                tuple(Flash(*combo[:2], *astuple(f)[2:]) for combo, f in zip(flashes, clip.flashes)))


def draw_shape(draw, shape: str, cx: float, cy: float, half: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - half * 0.9, cy - half * 0.9, cx + half * 0.9, cy + half * 0.9), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=fill)
    else:  # a plus-shaped cross, bars a third of its width
        bar = half / 3
        draw.rectangle((cx - half, cy - bar, cx + half, cy + bar), fill=fill)
        draw.rectangle((cx - bar, cy - half, cx + bar, cy + half), fill=fill)


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
        for shown in (clip.event, *clip.flashes):
            if shown.visible(frame):
                draw_shape(draw, shown.shape, *centre(shown.shape, shown.row, shown.column), half[shown.shape],
                           COLOURS[shown.colour])
        draw_shape(draw, m.shape, *centre(m.shape, *m.cell(frame)), half[m.shape], COLOURS[m.colour])
        frames.append(np.asarray(image))
    return frames


def yes_no_questions(clip: Clip, rng: random.Random) -> list[tuple[str, str, str]]:
    """(category, question, answer): one Yes and one No per category; each temporal No is the Yes of
    `clip.reversed()` (tested), the static No names a colour the shape never has."""
    m, c, e = clip.mover, clip.changer, clip.event
    first, second = clip.flashes
    out = []
    yes, no = DIRECTION_WORDS[m.direction], DIRECTION_WORDS[OPPOSITE[m.direction]]
    out += [("direction", f"Does the {m.shape} move {yes}?", "Yes"), ("direction", f"Does the {m.shape} move {no}?", "No")]
    out += [("colour_change", f"Does the {c.shape} turn {c.after}?", "Yes"),
            ("colour_change", f"Does the {c.shape} turn {c.before}?", "No")]
    out += [("order", f"Does the {first.shape} appear before the {second.shape}?", "Yes"),
            ("order", f"Does the {second.shape} appear before the {first.shape}?", "No")]
    there, absent = ("end", "start") if e.kind == "appear" else ("start", "end")
    out += [("start_end", f"Is the {e.shape} there at the {there}?", "Yes"),
            ("start_end", f"Is the {e.shape} there at the {absent}?", "No")]
    # Sorted, so the clip played backwards (its flashes swapped) asks the same static questions.
    shown = rng.choice(sorted([(m.shape, m.colour), (e.shape, e.colour), *[(f.shape, f.colour) for f in clip.flashes]]))
    other = rng.choice([colour for colour in COLOURS if colour != shown[1]])
    out += [("static", f"Is there a {shown[1]} {shown[0]}?", "Yes"), ("static", f"Is there a {other} {shown[0]}?", "No")]
    return out


def caption(clip: Clip) -> str:
    m, c, e = clip.mover, clip.changer, clip.event
    first, second = clip.flashes
    return (f"A {m.colour} {m.shape} moves {DIRECTION_WORDS[m.direction]}, the {c.shape} turns from {c.before} to "
            f"{c.after}, the {e.colour} {e.shape} {e.kind}s, and a {first.colour} {first.shape} flashes before a "
            f"{second.colour} {second.shape}.")


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


def talk_records(clip: Clip, name: str, video_id: str, rng: random.Random, held_out: bool | None) -> dict[str, list]:
    """One open question of each type (`xllm.demo.video_language`) and a description request about one clip, as
    records (`category`, `wording`, `image_id` kept for scoring; a description lists its `events`), and stage 0's
    record of all of them (the Q-Former spells each answer)."""
    from xllm.demo.video_language import OPEN_TYPES, WORDINGS, describe, draw_question, events

    def record(suffix: str, category: str, wording: str, turns: list[tuple[str, str]], **extra) -> dict:
        conversations = [{"from": role, "value": text} for question, reply in turns
                         for role, text in (("human", question), ("gpt", reply))]
        conversations[0]["value"] = f"<video>\n{conversations[0]['value']}"
        return {"id": f"{video_id}-{suffix}", "video": name, "category": category, "wording": wording,
                "image_id": video_id, "conversations": conversations, **extra}

    asked = [draw_question(kind, clip, rng, held_out) for kind in OPEN_TYPES]
    seen, unseen = WORDINGS["describe"]
    request = rng.choice(seen if held_out is False else seen + unseen)
    return {
        "open": [record(q["category"], q["category"], q["wording"], [(q["question"], q["answer"])]) for q in asked],
        "describe": [record("describe", "describe", "held_out" if request in unseen else "seen",
                            [(request, describe(clip))], events=[list(e) for e in events(clip)])],
        "stage0": [(q["question"], q["answer"]) for q in asked] + [(request, describe(clip))],
    }


def build_split(
    out: Path, split: str, clips: int, seed: int, exclude: frozenset = frozenset(), held_out: bool = False,
    size: int = 160,
) -> set[tuple]:
    """Writes `videos/{split}_*.mp4`, `{split}_yesno.jsonl`, `{split}_captions.jsonl`, `{split}_open.jsonl` (one
    open question per type), `{split}_describe.jsonl` and `{split}_scenes.jsonl` (what each clip holds: roles,
    shapes, colours, cells, moments), with no scene of `exclude`; for `train` also `train_pairs.jsonl` (stage 0's
    records: per clip and category its yes/no pair, then its open questions and description); clips use held-out
    combinations only (`held_out`) or none of them; returns the split's scenes. The open questions draw from their
    own random stream, so clips and yes/no questions are those of the yes/no-only task (version 7)."""
    rng = random.Random(seed)
    talk_rng = random.Random(seed * 7919 + 17)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    questions, captions, truths, scenes = [], [], [], set()
    talk: dict[str, list] = {"open": [], "describe": [], "stage0": []}
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
        for kind, rows in talk_records(clip, name, video_id, talk_rng, False if split == "train" else None).items():
            talk[kind].append(rows) if kind == "stage0" else talk[kind].extend(rows)
    write_jsonl(out / f"{split}_yesno.jsonl", questions)
    if split == "train":
        pairs = pair_records(questions, seed)
        for number, turns in enumerate(talk["stage0"]):  # each clip's open questions: one record after its pairs
            pairs.append({"id": f"{split}-{number}-open", "video": f"videos/{split}_{number:05d}.mp4",
                          "category": "open", "image_id": f"{split}-{number}", "conversations": [
                              {"from": role, "value": (f"<video>\n{text}" if i == 0 else text)}
                              for i, (role, text) in enumerate((r, t) for q, a in turns
                                                               for r, t in (("human", q), ("gpt", a)))]})
        write_jsonl(out / "train_pairs.jsonl", pairs)
    write_jsonl(out / f"{split}_captions.jsonl", captions)
    write_jsonl(out / f"{split}_open.jsonl", talk["open"])
    write_jsonl(out / f"{split}_describe.jsonl", talk["describe"])
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
                         "size": size, "version": 8})
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
