"""Open answers, scored as VQAv2 scores them: the answer normalisation and exact match per question type.

`vqa_normalize` is VQAv2's answer processing as EvalAI runs it and lmms-eval's VQAv2 task applies it
(`EvalAIAnswerProcessor.process_punctuation` then `process_digit_article`): punctuation dropped (or spaced where it
joins words), a full stop that is not a decimal point dropped, number words up to ten as digits ("three" -> "3",
"none" -> "0"), articles dropped, a few contractions restored. It is written here because the package that keeps
it, lmms-eval, is no core dependency (its pins would downgrade av and wandb); `tests/test_open_answers.py` checks
that it gives lmms-eval's output on every reference and reply of the image demo's test questions.

With one reference per question, VQAv2's accuracy (min(1, matching humans / 3), averaged over leave-one-out
subsets of its ten answers) is exact match of the normalised strings: the score of a question whose ten
answers are all the reference.

Free phrasing ("There are three shapes." for "Three.") is not an exact match; a task that can read its answers
back (the demos read them with their world's words: `xllm.demo.shapes_language.parse_answer`) adds `parsed` and
`parsed_reference` to each result, and `open_answer_table` then reports that accuracy beside exact match.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

# VQA evaluation's contraction table (the tokens people type without an apostrophe), as EvalAI has it.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def vqa_normalize(answer: str) -> str:
    """VQAv2's normalisation of an answer (see the module docstring): "Three." -> "3", "A red circle." -> "red
    circle"."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for mark in PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = PERIOD_STRIP.sub("", out)
    words = [NUMBERS.get(word, word) for word in out.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_match(reply: str, reference: str) -> bool:
    """VQAv2's accuracy for a question whose ten human answers are all `reference`: exact match after
    normalisation."""
    return vqa_normalize(reply) == vqa_normalize(reference)


def open_answer_table(results: list[dict], by: str = "category") -> dict[str, dict[str, float]]:
    """`results[i]`: `{"reply", "reference", by: ...}` (+ `parsed`, `parsed_reference` when the task reads answers
    back). Per value of `by` and `all`: `{"questions", "exact_match"}` (VQAv2's), and `accuracy` (the reply says
    the reference's answer) when results are parsed."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for result in results:
        groups[str(result.get(by, "all"))].append(result)
        if by != "all":
            groups["all"].append(result)
    table = {}
    for name, rows in groups.items():
        entry = {"questions": len(rows), "exact_match": sum(vqa_match(r["reply"], r["reference"]) for r in rows) / len(rows)}
        if all("parsed" in r for r in rows):
            entry["accuracy"] = sum(r["parsed"] == r["parsed_reference"] and r["parsed"] != "?" for r in rows) / len(rows)
        table[name] = entry
    return table


@torch.no_grad()
def generate_turns(model: Any, records: list[dict], own_history: bool = True, batch_size: int = 32,
                   max_new_tokens: int = 32) -> list[list[str]]:
    """Every assistant turn of every record, generated greedily turn by turn (records from `read_records`, with
    `media`): with `own_history`, a later turn's prompt holds the model's own earlier replies (a chat, as a user has
    it); otherwise the references. Returns each record's replies in order."""
    processor = model.processor()
    processor.prepare_media([r["media"] for r in records])  # e.g. cache every file's features once, in batches
    turns = [[i for i, t in enumerate(r["conversations"]) if t["from"] == "assistant"] for r in records]
    replies: list[list[str]] = [[] for _ in records]
    for round_ in range(max(map(len, turns), default=0)):
        asked = [i for i, t in enumerate(turns) if len(t) > round_]
        for start in range(0, len(asked), batch_size):
            chunk = asked[start:start + batch_size]
            prompts = []
            for i in chunk:
                history = [dict(t) for t in records[i]["conversations"][:turns[i][round_]]]
                if own_history:
                    for earlier, reply in zip(turns[i], replies[i]):
                        history[earlier] = {**history[earlier], "value": reply}
                prompts.append(history)
            for i, reply in zip(chunk, model.reply(prompts, [records[i]["media"] for i in chunk], max_new_tokens)):
                replies[i].append(reply)
    return replies


def last_turn_results(records: list[dict], replies: list[list[str]], parse: Callable[[str, str], str] | None = None,
                      ) -> list[dict]:
    """One result per record for its last assistant turn: `{"id", "category", "wording", "question", "reply",
    "reference", "earlier"}` (+ `parsed`, `parsed_reference` with `parse(category, text)`)."""
    results = []
    for record, said in zip(records, replies):
        turns = record["conversations"]
        last = max(i for i, t in enumerate(turns) if t["from"] == "assistant")
        fields = record.get("fields", {})
        category = str(fields.get("category", record.get("category", "all")))
        result = {"id": record["id"], "category": category, "wording": str(fields.get("wording", "seen")),
                  "question": turns[last - 1]["value"], "reply": said[-1], "reference": turns[last]["value"],
                  "earlier": said[:-1]}
        if parse is not None:
            result["parsed"], result["parsed_reference"] = parse(category, said[-1]), parse(category, turns[last]["value"])
        results.append(result)
    return results
