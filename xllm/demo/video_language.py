"""What is said about a clip (`xllm.demo.synthetic_video`), and reading replies back with the world's own words.

Open questions that need time — `direction` ("Which way does the circle move?"), `colour_change` ("What colour does
the square turn?"), `order` ("Which shape flashes first?"), `event` ("What appears?" / "What disappears?", "Nothing."
when the clip's event is the other one) — and the `static` control asked openly ("What colour is the diamond?", of a
shape whose colour never changes); a description of what happens, in order: the mover first (it moves all along),
then the colour change, the appearance or disappearance and the two flashes in the order they happen.

Every temporal answer of a clip is the other answer of the clip played backwards (the reverse direction, the colour
before the change, the other flash, "Nothing." for the other event), as the yes/no questions' "No" is, so the frames
without their order cannot answer them. Wordings: training ones and held-out ones (val and test only), as for pictures
(`xllm.demo.shapes_language`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from xllm.demo.synthetic import COLOURS
from xllm.demo.synthetic_video import DIRECTION_WORDS, SHAPES, Clip
from xllm.evaluation.scenes import words

OPEN_TYPES = ("direction", "colour_change", "order", "event", "static")

WORDINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "direction": (("Which way does the {shape} move?", "In which direction does the {shape} move?",
                   "Where does the {shape} go?"),
                  ("What direction is the {shape} moving in?", "Which way is the {shape} going?")),
    "colour_change": (("What colour does the {shape} turn?", "What colour does the {shape} become?",
                       "Which colour does the {shape} change to?"),
                      ("What color does the {shape} turn into?", "What colour is the {shape} at the end?")),
    "order": (("Which shape flashes first?", "What flashes first?", "Which flashes first, the {a} or the {b}?"),
              ("Which of the two flashes comes first?", "Which shape flashes before the other?")),
    "appear": (("What appears?", "Which shape appears?", "What appears in the video?"),
               ("Which shape shows up?", "Does anything appear, and what?")),
    "disappear": (("What disappears?", "Which shape disappears?", "What disappears in the video?"),
                  ("Which shape vanishes?", "Does anything disappear, and what?")),
    "static": (("What colour is the {shape}?", "Which colour does the {shape} have?"),
               ("What color is the {shape}?", "Tell me the colour of the {shape}.")),
    "describe": (("What happens in the video?", "Describe the video.", "Describe what happens."),
                 ("Tell me what happens in this clip.", "What goes on in the video?")),
}
MOVES = {"left": "left", "right": "right", "up": "up", "down": "down"}


def sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def events(clip: Clip) -> list[tuple[str, ...]]:
    """What happens, in order: `("moves", shape, colour, direction)` first (all along), then `("turns", shape,
    colour)`, `("appears" | "disappears", shape)`, `("flashes", shape)` by the frame they happen at (the colour
    change before an event at the same frame)."""
    m, c, e = clip.mover, clip.changer, clip.event
    timed = [(c.at, 0, ("turns", c.shape, c.after)), (e.at, 1, (f"{e.kind}s", e.shape)),
             *[(f.at, 2 + i, ("flashes", f.shape)) for i, f in enumerate(clip.flashes)]]
    return [("moves", m.shape, m.colour, m.direction)] + [event for *_, event in sorted(timed)]


def phrase(event: tuple[str, ...]) -> str:
    if event[0] == "moves":
        return f"a {event[2]} {event[1]} moves {MOVES[event[3]]}"
    if event[0] == "turns":
        return f"the {event[1]} turns {event[2]}"
    return f"the {event[1]} {event[0]}"


def describe(clip: Clip) -> str:
    """"A red circle moves left, then the square turns blue, the diamond appears, the triangle flashes and the cross
    flashes." — the events in the order they happen."""
    first, *rest = [phrase(event) for event in events(clip)]
    return sentence(first + ", then " + ", ".join(rest[:-1]) + " and " + rest[-1])


def answer(kind: str, clip: Clip, shape: str = "") -> str:
    m, c, e = clip.mover, clip.changer, clip.event
    if kind == "direction":
        return sentence(DIRECTION_WORDS[m.direction])
    if kind == "colour_change":
        return sentence(c.after)
    if kind == "order":
        return sentence(f"the {clip.flashes[0].shape}")
    if kind in ("appear", "disappear"):
        return sentence(f"the {e.colour} {e.shape}") if e.kind == kind else "Nothing."
    if kind == "static":
        colour = {m.shape: m.colour, e.shape: e.colour, **{f.shape: f.colour for f in clip.flashes}}[shape]
        return sentence(colour)
    if kind == "describe":
        return describe(clip)
    raise ValueError(f"unknown question kind {kind!r}")


def draw_question(kind: str, clip: Clip, rng: random.Random, held_out: bool | None = False) -> dict[str, str]:
    """One question of `kind` (`event` asks what appears or what disappears, either one): `{"category", "question",
    "answer", "wording"}`; `held_out` as `xllm.demo.shapes_language.draw_question` takes it."""
    asked = rng.choice(("appear", "disappear")) if kind == "event" else kind
    seen, unseen = WORDINGS[asked]
    wording = rng.choice(seen if held_out is False else unseen if held_out else seen + unseen)
    first, second = sorted(f.shape for f in clip.flashes)  # alphabetical: the question does not tell the order
    shape = {"direction": clip.mover.shape, "colour_change": clip.changer.shape,
             "static": rng.choice(sorted([clip.mover.shape, clip.event.shape, *[f.shape for f in clip.flashes]]))
             }.get(kind, "")
    return {"category": kind, "question": wording.format(shape=shape, a=first, b=second),
            "answer": answer(asked, clip, shape), "wording": "held_out" if wording in unseen else "seen"}


# --- reading replies back ------------------------------------------------------------------------------------------
DIRECTION_NAMES = {"left": "left", "right": "right", "up": "up", "down": "down", "upward": "up", "upwards": "up",
                   "downward": "down", "downwards": "down"}
NOTHING = re.compile(r" (nothing|none|no shape|no) ")


def find(text: str, vocabulary: Sequence[str]) -> list[str]:
    return [w if w in vocabulary else w[:-1] for w in words(text).split()
            if w in vocabulary or (w.endswith("s") and w[:-1] in vocabulary)]


def parse_answer(kind: str, text: str) -> str:
    """A reply reduced to what it says for `kind`: a direction, a colour, a shape (`order`: the first one named),
    `nothing`, or `?`."""
    said = words(text)
    if kind == "direction":
        found = [DIRECTION_NAMES[w] for w in said.split() if w in DIRECTION_NAMES]
        return found[0] if len(set(found)) == 1 else "?"
    if kind in ("colour_change", "static"):
        found = find(text, list(COLOURS))
        return found[0] if len(set(found)) == 1 else "?"
    shapes = find(text, SHAPES)
    if kind == "order":
        return shapes[0] if shapes else "?"
    if kind == "event":
        if not shapes:
            return "nothing" if NOTHING.search(said) else "?"
        return shapes[0] if len(set(shapes)) == 1 else "?"
    return "?"


def parse_description(text: str) -> list[tuple[str, ...]]:
    """The events a description tells, in its order (`events`' form; a colour or direction not said is "")."""
    told = []
    for clause in re.split(r",|;|\.|\band\b|\bthen\b", text.lower()):
        shapes, said = find(clause, SHAPES), words(clause)
        if not shapes:
            continue
        colours, directions = find(clause, list(COLOURS)), [DIRECTION_NAMES[w] for w in said.split() if w in DIRECTION_NAMES]
        one = lambda found: found[0] if len(set(found)) == 1 else ""  # noqa: E731
        if " moves " in said or " move " in said:
            told.append(("moves", shapes[0], one(colours), one(directions)))
        elif " turns " in said or " turn " in said:
            told.append(("turns", shapes[0], one(colours)))
        elif " appears " in said or " disappears " in said:
            told.append(("disappears" if " disappears " in said else "appears", shapes[0]))
        elif " flashes " in said or " flash " in said:
            told.append(("flashes", shapes[0]))
    return told
