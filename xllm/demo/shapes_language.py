"""What is said about a shapes scene (`xllm.demo.synthetic`), and reading replies back with the world's own words.

Open questions of six types — `count` ("How many shapes are there?"), `colour` ("What colour is the triangle?"),
`position` ("Where is the square?"), `absent` (the colour or place of a shape that is not there: the right answer
says so), `cell` ("What is in the center?", "Nothing." included) and `which` ("Which shapes are red?", "None."
included) — a description that names every shape with its colour and place, and follow-up turns
that refer back ("And what colour is it?" after "Where is the triangle?").

Every question type has wordings used in training and wordings held out: those occur only in val and test, where
each question records which kind it got (`wording`), so a report shows phrasings the model never saw as a row of
their own.

Reading back (`parse_answer`, `parse_description`): a reply is scored by what it says, in the generator's
vocabulary, not by its wording — "Three.", "There are three shapes." and "3" are the same answer; a description
becomes its objects (`xllm.evaluation.scenes`).

What the Q-Former spells in stage 0 (`evidence`): the answer itself, except for a question about one shape's colour
or place, where it is that shape's whole phrase ("A red triangle at the bottom right."): the image's tokens are
computed once, from the turn that holds the image, so a follow-up about the same shape can only be answered if
they already carry its other attribute.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from xllm.demo.synthetic import COLOURS, COUNT_WORDS, SHAPES, Item, position_name
from xllm.evaluation.scenes import Object, SceneVocabulary, words

OPEN_TYPES = ("count", "colour", "position", "absent", "cell", "which")
FOLLOW_UPS = ("colour", "position")  # what a follow-up turn asks about the shape of the first turn

# question type -> (wordings used in training, wordings held out: val and test only)
WORDINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "count": (("How many shapes are there?", "How many shapes can you see?", "How many shapes are in the image?",
               "How many shapes does the picture show?", "Can you count the shapes?",
               "Tell me how many shapes there are.", "What is the count of shapes?"),
              ("What is the number of shapes in the picture?", "Count the shapes in the image.")),
    "colour": (("What colour is the {shape}?", "Which colour does the {shape} have?", "What is the colour of the {shape}?",
                "Which color is the {shape}?", "What colour has the {shape} got?",
                "Can you tell me the colour of the {shape}?", "Tell me which colour the {shape} is."),
               ("What color is the {shape}?", "Tell me the colour of the {shape}.")),
    "position": (("Where is the {shape}?", "Where is the {shape} located?", "In which part of the image is the {shape}?",
                  "Where in the picture is the {shape}?", "Can you tell me where the {shape} is?",
                  "Tell me where the {shape} is.", "Where does the {shape} sit?"),
                 ("Where can I find the {shape}?", "What is the position of the {shape}?")),
    "cell": (("What is {at_place}?", "What can you see {at_place}?", "Which shape is {at_place}?",
              "What is there {at_place}?", "Is there anything {at_place}?", "Tell me what you see {at_place}.",
              "What shape sits {at_place}?"),
             ("What do you see {at_place}?", "Tell me what is {at_place}.")),
    "which": (("Which shapes are {colour}?", "What is {colour} in the image?", "Which shapes have the colour {colour}?",
               "Which of the shapes is {colour}?", "What shapes are {colour}?", "Tell me which shapes are {colour}.",
               "Can you name the {colour} shapes?"),
              ("Name the {colour} shapes.", "What are the {colour} shapes?")),
    "describe": (("Describe the image.", "Describe the image briefly.", "What do you see in the image?",
                  "What is in this picture?", "Can you describe the picture?", "Tell me what is in the image.",
                  "What does the image show?"),
                 ("Describe this picture.", "Tell me what the image shows.")),
    "follow_colour": (("And what colour is it?", "What colour does it have?", "Which colour is it?",
                       "What is its colour?"), ("And its colour?", "What color is it then?")),
    "follow_position": (("And where is it?", "Where is it located?", "Where is it?", "Where can I see it?"),
                        ("And where can I find it?", "What is its position?")),
}


def at_place(row: int, column: int) -> str:
    """`at the top left`, `at the top`, `on the left`, `in the center`, ... (a place with its preposition)."""
    place = position_name(row, column)
    return f"{'in' if place == 'center' else 'on' if place in ('left', 'right') else 'at'} the {place}"


def sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def listing(parts: Sequence[str]) -> str:
    """`a`, `a and b`, `a, b and c`."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def shape_order(items: Sequence[Item]) -> list[Item]:
    """Circle, square, triangle: the order descriptions name the shapes in (the Q-Former that spells a description
    then needs to know which kinds are there, not to rank places)."""
    return sorted(items, key=lambda i: SHAPES.index(i.shape))


def object_phrase(item: Item) -> str:
    return f"a {item.colour} {item.shape} {at_place(item.row, item.column)}"


def describe(items: Sequence[Item]) -> str:
    """Every shape with its colour and place (`shape_order`): "A red circle at the top left, a blue square in the
    center and a green triangle at the bottom right." """
    return sentence(listing([object_phrase(i) for i in shape_order(items)]))


def _shape(items: Sequence[Item], shape: str) -> Item | None:
    return next((i for i in items if i.shape == shape), None)


def answer(kind: str, items: Sequence[Item], shape: str = "", place: tuple[int, int] = (0, 0), colour: str = "") -> str:
    """The reply to a question of `kind` about `shape` / the cell `place` / `colour`."""
    item = _shape(items, shape)
    if kind == "count":
        return sentence(COUNT_WORDS[len(items)])
    if kind in ("colour", "position", "absent") and item is None:
        return f"There is no {shape}."
    if kind == "colour":
        return sentence(item.colour)
    if kind == "position":
        return sentence(at_place(item.row, item.column))
    if kind == "cell":
        there = next((i for i in items if (i.row, i.column) == place), None)
        return sentence(f"a {there.colour} {there.shape}") if there else "Nothing."
    if kind == "which":
        shapes = [f"the {i.shape}" for i in sorted(items, key=lambda i: SHAPES.index(i.shape)) if i.colour == colour]
        return sentence(listing(shapes)) if shapes else "None."
    if kind == "describe":
        return describe(items)
    raise ValueError(f"unknown question kind {kind!r}")


def evidence(kind: str, items: Sequence[Item], **about) -> str:
    """What the Q-Former spells for a question (stage 0's target; see the module docstring)."""
    item = _shape(items, about.get("shape", ""))
    if kind in ("colour", "position") and item is not None:
        return sentence(object_phrase(item))
    return answer(kind, items, **about)


def question(kind: str, wording: str, shape: str = "", place: tuple[int, int] = (0, 0), colour: str = "") -> str:
    return wording.format(shape=shape, at_place=at_place(*place), colour=colour)


def draw_question(kind: str, items: Sequence[Item], rng: random.Random, held_out: bool | None = False,
                  ) -> dict[str, str]:
    """One question of `kind` about the scene: `{"category", "question", "answer", "evidence", "wording", "shape"}`.

    `held_out`: False draws a training wording, True a held-out one, None either (each wording equally likely)."""
    seen, unseen = WORDINGS["colour" if kind == "absent" and rng.random() < 0.5 else
                            "position" if kind == "absent" else kind]
    pool = seen if held_out is False else unseen if held_out else seen + unseen
    wording = rng.choice(pool)
    about: dict = {}
    if kind in ("colour", "position"):
        about["shape"] = rng.choice(items).shape
    elif kind == "absent":
        about["shape"] = rng.choice([s for s in SHAPES if _shape(items, s) is None] or [items[0].shape])
    elif kind == "cell":
        filled = [(i.row, i.column) for i in items]
        empty = [(r, c) for r in range(3) for c in range(3) if (r, c) not in filled]
        about["place"] = rng.choice(filled if rng.random() < 0.6 or not empty else empty)
    elif kind == "which":
        present = sorted({i.colour for i in items})
        absent = [c for c in COLOURS if c not in present]
        about["colour"] = rng.choice(present if rng.random() < 0.7 or not absent else absent)
    if kind == "absent" and _shape(items, about["shape"]) is not None:
        raise ValueError("an `absent` question needs a scene without every shape kind")
    return {"category": kind, "question": question(kind, wording, **about),
            "answer": answer("colour" if kind == "absent" else kind, items, **about),
            "evidence": evidence(kind, items, **about), "wording": "held_out" if wording in unseen else "seen",
            "shape": about.get("shape", "")}


def draw_follow_up(items: Sequence[Item], rng: random.Random, held_out: bool | None = False) -> list[dict[str, str]]:
    """Two turns about one shape: its place then its colour, or its colour then its place; the second refers back
    ("And what colour is it?"). Returns the two turns as `draw_question` does (the second's `evidence` is empty: its
    image tokens are the first turn's)."""
    shape = rng.choice(items).shape
    first_kind = rng.choice(FOLLOW_UPS)
    second_kind = "colour" if first_kind == "position" else "position"
    first = draw_question(first_kind, items, rng, held_out)
    while first["shape"] != shape:  # the same shape, whichever wording was drawn
        first = draw_question(first_kind, items, rng, held_out)
    seen, unseen = WORDINGS[f"follow_{second_kind}"]
    pool = seen if held_out is False else unseen if held_out else seen + unseen
    wording = rng.choice(pool)
    second = {"category": "follow_up", "question": wording, "answer": answer(second_kind, items, shape=shape),
              "evidence": "", "wording": "held_out" if wording in unseen else "seen", "shape": shape}
    return [first, second]


# --- reading replies back ------------------------------------------------------------------------------------------
NUMBERS = {"zero": 0, "none": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
PLACE_SYNONYMS = {"centre": "center", "middle": "center", "top middle": "top", "bottom middle": "bottom",
                  "middle left": "left", "middle right": "right", "top center": "top", "bottom center": "bottom",
                  "center left": "left", "center right": "right", "upper left": "top left", "upper right": "top right",
                  "lower left": "bottom left", "lower right": "bottom right"}
PLACES = {position_name(r, c): position_name(r, c) for r in range(3) for c in range(3)} | PLACE_SYNONYMS
# The world's words, for reading descriptions back (`xllm.evaluation.scenes`).
VOCABULARY = SceneVocabulary(SHAPES, {"colour": {c: c for c in COLOURS}, "place": PLACES})
NOTHING = re.compile(r" (nothing|none|no shapes?|empty|not there|there is no|there s no|isn t|is not|no \w+) ")


def scene_objects(items: Sequence[Item]) -> list[Object]:
    """A scene's shapes as `xllm.evaluation.scenes` objects (what `parse_description` gives for its description)."""
    return VOCABULARY.truth([{"kind": i.shape, "colour": i.colour, "place": i.position} for i in items])


def parse_description(text: str) -> list[Object]:
    """The shapes a description names, each with the colour and place it names (`SceneVocabulary.parse`)."""
    return VOCABULARY.parse(text)


def parse_answer(kind: str, text: str) -> str:
    """A reply reduced to what it says for a question of `kind`, in the world's words: `count` -> `3`, `colour` ->
    `red`, `position` -> `top left`, `absent` -> `no`, `cell` -> `red circle` / `nothing`, `which` -> `circle square`
    / `none`, `follow_up` -> a colour or a place. `?` when it says none, several, or something else."""
    said = words(text)
    if kind == "count":
        numbers = {NUMBERS[w] for w in said.split() if w in NUMBERS} | {int(w) for w in said.split() if w.isdigit()}
        return str(numbers.pop()) if len(numbers) == 1 else "?"
    colours, places = VOCABULARY.find("colour", text), VOCABULARY.find("place", text)
    shapes, nothing = VOCABULARY.find_kinds(text), bool(NOTHING.search(said))
    if kind == "absent":
        return "no" if nothing and not colours and not places else "?"
    if kind == "colour" or (kind == "follow_up" and colours and not places):
        return colours[0] if len(set(colours)) == 1 and not nothing else "?"
    if kind == "position" or (kind == "follow_up" and places and not colours):
        return places[0] if len(set(places)) == 1 and not nothing else "?"
    if kind == "cell":
        if not colours and not shapes and nothing:
            return "nothing"
        return f"{colours[0]} {shapes[0]}" if len(colours) == 1 and len(shapes) == 1 else "?"
    if kind == "which":
        if not shapes:
            return "none" if nothing else "?"
        return " ".join(sorted(set(shapes), key=SHAPES.index))
    return "?"
