"""Descriptions read back into objects with a closed vocabulary, then scored as captioning's hallucination
measures score them: exact scene, per-object precision and recall, CHAIR-i.

A `SceneVocabulary` names the object kinds ("circle") and each attribute's phrases ("top left", "centre" -> "center").
`parse` splits a description into clauses (commas, `and`, `;`, full stops) and reads each clause that names a kind as
one object with the attribute values the clause names (longest phrase first, so "top left" is one place, not "top"
and "left"; an attribute named twice or not at all stays unknown). A kind named twice is two objects, as a
hallucinated duplicate should count.

`scene_scores(described, truths)` over a set of descriptions:
- `exact_scene`: the share of descriptions whose objects, with every attribute, are exactly the picture's;
- `object_precision` / `object_recall`: named objects that match a true one in kind and every attribute / true
  objects so named (each true object matched once);
- `chair_i`: CHAIR-i (Rohrbach et al., 2018), the share of named objects whose kind is not in the picture at all;
  `chair_s` the share of descriptions that name at least one such object.
CIDEr-D and BLEU-4 (`xllm.evaluation.metrics`) score the same descriptions as text, beside these.

The image demo builds its vocabulary from its generator's own words (`xllm.demo.shapes_language`);
`evaluate.py --metric describe` builds one from the `objects` of the records it scores.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

Object = tuple[str, tuple[tuple[str, str], ...]]  # (kind, ((attribute, value), ...)), hashable


def words(text: str) -> str:
    """Lower-cased words separated by single spaces, with a space at each end (so phrases match whole words)."""
    return " " + " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()) + " "


@dataclass
class SceneVocabulary:
    """`kinds`: object nouns (a plural "squares" reads as "square"); `attributes`: attribute -> phrase -> value."""

    kinds: Sequence[str]
    attributes: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    @classmethod
    def from_objects(cls, objects: Sequence[Mapping[str, str]], kind: str = "kind") -> SceneVocabulary:
        """Every kind and attribute value that `objects` (dicts: `kind` + attributes) use, each its own phrase."""
        kinds = sorted({o[kind] for o in objects})
        attributes: dict[str, dict[str, str]] = {}
        for o in objects:
            for name, value in o.items():
                if name != kind:
                    attributes.setdefault(name, {})[str(value)] = str(value)
        return cls(kinds, attributes)

    def find_kinds(self, text: str) -> list[str]:
        return [w if w in self.kinds else w[:-1] for w in words(text).split()
                if w in self.kinds or (w.endswith("s") and w[:-1] in self.kinds)]

    def find(self, attribute: str, text: str) -> list[str]:
        """The values of `attribute` that `text` names, in order, longest phrases first."""
        text, found = words(text), []
        for phrase in sorted(self.attributes[attribute], key=len, reverse=True):
            pattern = f" {' '.join(words(phrase).split())} "
            for match in re.finditer(re.escape(pattern), text):
                found.append((match.start(), self.attributes[attribute][phrase]))
            text = text.replace(pattern, " " + "# " * len(pattern.split()))
        return [value for _, value in sorted(found)]

    def parse(self, description: str) -> list[Object]:
        """The objects a description names (see the module docstring); an unknown attribute's value is ""."""
        objects = []
        for clause in re.split(r",|;|\.|\band\b|\bwhile\b", description.lower()):
            for kind in self.find_kinds(clause)[:1]:
                values = {name: self.find(name, clause) for name in self.attributes}
                objects.append((kind, tuple((name, found[0] if len(set(found)) == 1 else "")
                                            for name, found in sorted(values.items()))))
        return objects

    def truth(self, objects: Sequence[Mapping[str, str]], kind: str = "kind") -> list[Object]:
        """Records' true objects (dicts) in the form `parse` gives."""
        return [(o[kind], tuple((name, str(o.get(name, ""))) for name in sorted(self.attributes))) for o in objects]


def scene_scores(described: Sequence[Sequence[Object]], truths: Sequence[Sequence[Object]]) -> dict[str, float]:
    """Exact scene, object precision / recall and CHAIR over descriptions read back (`SceneVocabulary.parse`) and
    the pictures' true objects (see the module docstring)."""
    exact = named = right = true_total = found = hallucinated = with_hallucination = 0
    for said, true in zip(described, truths):
        exact += Counter(said) == Counter(true)
        matched = sum((Counter(said) & Counter(true)).values())
        named, right, true_total, found = named + len(said), right + matched, true_total + len(true), found + matched
        kinds = {kind for kind, _ in true}
        wrong = sum(kind not in kinds for kind, _ in said)
        hallucinated, with_hallucination = hallucinated + wrong, with_hallucination + (wrong > 0)
    count = max(1, len(truths))
    return {"descriptions": len(truths), "exact_scene": exact / count,
            "object_precision": right / named if named else 0.0, "object_recall": found / true_total if true_total else 0.0,
            "chair_i": hallucinated / named if named else 0.0, "chair_s": with_hallucination / count,
            "objects_named": named, "objects_true": true_total}


def event_scores(told: Sequence[Sequence[tuple]], truths: Sequence[Sequence[tuple]]) -> dict[str, float]:
    """Descriptions of what happens, read back into event lists, against the true lists: `all_events_right` (the same
    events in the same order, nothing more), `event_precision` / `event_recall` (events told that happened / that
    happened and were told, whatever their order), `in_order` (of the descriptions that told every event, the share
    that told them in their order)."""
    exact = told_total = true_total = matched_total = complete = ordered = 0
    for said, true in zip(told, truths):
        said, true = [tuple(e) for e in said], [tuple(e) for e in true]
        exact += said == true
        matched = sum((Counter(said) & Counter(true)).values())
        told_total, true_total, matched_total = told_total + len(said), true_total + len(true), matched_total + matched
        if Counter(said) == Counter(true):
            complete += 1
            ordered += said == true
    count = max(1, len(truths))
    return {"descriptions": len(truths), "all_events_right": exact / count,
            "event_precision": matched_total / told_total if told_total else 0.0,
            "event_recall": matched_total / true_total if true_total else 0.0,
            "in_order": ordered / complete if complete else 0.0}
