"""`make demo-joint`: one frozen SmolLM2 that sees, watches and hears at once — X-LLM's joint model, on 2 CPU cores.

    python -m xllm.demo.joint [--seed 0] [--out runs/demo_joint] [--split test]

1. the image, video and speech demos' adapters (`make demo`, `make demo-video`, `make demo-speech` build them);
2. the joint task (`xllm.demo.joint_data`): the image and video questions spoken by eSpeak voices; val and test ask
   about scenes and clips drawn here, in voices and sentences that training never speaks;
3. the joint stage (`configs/demo_joint/joint.yaml`): the three interfaces composed from their adapters
   (`init_adapters`) and tuned together on a weighted mix of typed questions, transcripts and spoken questions;
4. the report: MME-style acc / acc+ per category for typed and spoken questions, the cascade (the speech adapter's
   transcript asked of the image / video adapter), the picture-blind and the untrained rows; and forgetting: the
   image demo's MME score, the video demo's temporal accuracy and the speech demo's CER, joint against single.

A spoken question about a picture: the LLM reads the picture's tokens and the question's speech tokens; the
picture's Q-Former, which reads its question, reads the model's own transcript of it (`XLLM.transcribe`, through
the processor's `spoken_instructions`). Why, and what else was tried: docs/demo_joint.md.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from xllm.demo.pipeline import ROOT, demo_parser, demo_start, feature_caches, fit, localized_config, write_report

CONFIGS = ROOT / "configs" / "demo_joint"
SINGLE = {"image": ("demo", "stage2", "make demo"), "video": ("demo_video", "stage2", "make demo-video"),
          "audio": ("demo_speech", "stage1", "make demo-speech")}
ROWS = ("typed", "spoken", "cascade", "blind", "untrained")
GROUPS = {"image": "pictures", "video": "clips"}  # the report's two tables


def caches() -> dict[str, dict[str, str]]:
    """The three demos' feature caches, by modality (the joint model reads the same cached features)."""
    out = {}
    for demo, _, _ in SINGLE.values():
        out.update(feature_caches(ROOT / "configs" / demo))
    return out


def single_adapters(args) -> dict[str, Path]:
    adapters = {"image": Path(args.image_run) / "stage2" / "adapter", "video": Path(args.video_run) / "stage2" / "adapter",
                "audio": Path(args.speech_run) / "stage1" / "adapter"}
    for modality, path in adapters.items():
        if not (path / "adapter.safetensors").is_file():
            raise SystemExit(f"no {modality} adapter at {path}: run `{SINGLE[modality][2]}` first (make demo-joint "
                             "runs the missing ones)")
    return adapters


def train(out: Path, data: Path, models: Path, adapters: dict[str, Path], args) -> float:
    """The joint stage through LightningCLI (`configs/demo_joint/joint.yaml`, its paths pointed at this run's)."""

    def edit(config: dict) -> None:
        init = config["model"]["init_args"]
        init["init_adapters"] = {m: str(p) for m, p in adapters.items()}
        sources = config["data"]["train_sources"]
        for source in sources:
            for default, given in ((".cache/demo/data", args.image_data), (".cache/demo_video/data", args.video_data),
                                   (".cache/demo_speech/data", args.speech_data)):
                if source["file"].startswith(default + "/"):
                    source["file"] = str(Path(given) / source["file"][len(default) + 1:])

    path = localized_config("joint.yaml", out, data, models, edit, configs=CONFIGS)
    steps = args.steps or json.loads(path.read_text())["trainer"]["max_steps"]
    return fit([path], args.seed, steps)


def load(path: Path, model, limit_scenes: int | None = None) -> list[dict]:
    from xllm.evaluation.mme import load_yes_no

    records = load_yes_no(str(path), model)
    if limit_scenes is not None:
        keep = set(list(dict.fromkeys(r["image_id"] for r in records))[:limit_scenes])
        records = [r for r in records if r["image_id"] in keep]
    return records


def with_instruction(records: list[dict], words: list[str]) -> list[dict]:
    """The records with their user turn's `instruction` set (what the Q-Former reads)."""
    out = []
    for record, text in zip(records, words):
        first = {**record["conversations"][0], "instruction": text}
        out.append({**record, "conversations": [first, *record["conversations"][1:]]})
    return out


def blind(records: list[dict], modality: str, data: Path) -> list[dict]:
    """The same records with a blank picture or clip (what the question alone gives)."""
    return [{**r, "media": {**r["media"], modality: [str(data / r["fields"]["blank"])]}} for r in records]


def cascade(records: list[dict], modality: str, words: list[str]) -> list[dict]:
    """Spoken records as typed ones: the transcript in place of `<audio>` (for the single-modality adapter)."""
    out = []
    for record, text in zip(records, words):
        turn = {"from": "user", "value": f"<{modality}>\n{text}"}
        out.append({**record, "media": {modality: record["media"][modality]},
                    "conversations": [turn, *record["conversations"][1:]]})
    return out


def transcribe(model, records: list[dict], batch_size: int = 32) -> list[str]:
    """The model's own transcripts of each record's audio (greedy, `XLLM.transcribe`)."""
    paths = [r["media"]["audio"][0] for r in records]
    model.processor().prepare_media([{"audio": paths}])
    return [text for start in range(0, len(paths), batch_size)
            for text in model.transcribe("audio", paths[start:start + batch_size])]


def scores(model, records: list[dict], categories=None) -> dict:
    from xllm.evaluation.mme import mme_table, score_yes_no

    results = score_yes_no(model, records)
    table = mme_table(results)
    if categories is not None:
        table["temporal"] = mme_table([r for r in results if r["category"] in categories])["all"]
    return table


def untrained(adapters: dict[str, Path]):
    """The composed architecture with freshly initialised interfaces (the 'before' row)."""
    from xllm.adapters.compose import compose_configs
    from xllm.adapters.load import build_interface
    from xllm.model import XLLM

    config = compose_configs(adapters, interface_overrides=caches())
    interfaces = {m: build_interface(m, spec) for m, spec in config["interfaces"].items()}
    return XLLM.from_paths(config["llm"]["path"], interfaces, template=config["template"],
                           system_prompt=config.get("system_prompt")).eval()


def table_lines(title: str, rows: dict[str, dict], categories: list[str]) -> list[str]:
    names = [r for r in ROWS if r in rows]
    lines = [f"**{title}** (acc / acc+; MME's score = sum over categories of acc×100 + acc+×100)", "",
             "| category | questions | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for category in categories:
        cells = [f"{rows[r][category]['acc']:.3f} / {rows[r][category]['acc_plus']:.3f}" if category in rows[r]
                 else "—" for r in names]
        lines.append(f"| {category} | {rows['spoken'][category]['questions']} | " + " | ".join(cells) + " |")
    summed = [c for c in categories if c not in ("all", "temporal")]
    lines.append("| MME score | | " + " | ".join(f"{sum(rows[r][c]['score'] for c in summed if c in rows[r]):.0f}"
                                                 for r in names) + " |")
    return lines


def open_lines(tables: dict[str, dict]) -> list[str]:
    """Open questions, typed and spoken, per type: answer accuracy / VQAv2 exact match."""
    lines = ["**Open questions** (each a sentence training never speaks; answer accuracy / VQAv2 exact match)", "",
             "| question type | typed | spoken |", "|---|---:|---:|"]
    for group, rows in tables.items():
        for category in rows["spoken"]:
            if category.endswith("wordings"):
                continue
            cells = [f"{rows[w][category]['accuracy']:.3f} / {rows[w][category]['exact_match']:.3f}"
                     if category in rows[w] else "—" for w in ("typed", "spoken")]
            lines.append(f"| {group}: {category} ({rows['spoken'][category]['questions']}) | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = demo_parser("xllm joint demo: one frozen SmolLM2 sees, watches and hears, on a CPU", "demo_joint")
    parser.add_argument("--image_run", default="runs/demo")
    parser.add_argument("--video_run", default="runs/demo_video")
    parser.add_argument("--speech_run", default="runs/demo_speech")
    parser.add_argument("--image_data", default=".cache/demo/data")
    parser.add_argument("--video_data", default=".cache/demo_video/data")
    parser.add_argument("--speech_data", default=".cache/demo_speech/data")
    parser.add_argument("--steps", type=int, default=None, help="joint steps instead of joint.yaml's max_steps")
    parser.add_argument("--split", default="test", choices=["val", "test"],
                        help="report on val while choosing settings; test once, for the report")
    parser.add_argument("--skip_training", action="store_true", help="evaluate the joint adapter already in --out")
    args, out, data, models, started = demo_start(parser, argv)

    from xllm.demo.joint_data import build_joint_task
    from xllm.demo.materialize import materialize_all
    from xllm.demo.synthetic import build_shapes_task
    from xllm.demo.synthetic_video import TEMPORAL
    from xllm.evaluation.metrics import error_rates
    from xllm.model import XLLM

    timings = {}
    step = time.perf_counter()
    adapters = single_adapters(args)
    materialize_all(models, speech=True)
    build_shapes_task(args.image_data, train=1200, val=40, test=60, seed=0)  # the image demo's (+ its scene list)
    build_joint_task(data, args.image_data, args.video_data)
    timings["data"] = time.perf_counter() - step
    if not args.skip_training:
        timings["joint step"] = train(out, data, models, adapters, args)

    step = time.perf_counter()
    split = args.split
    joint = XLLM.from_pretrained(out / "joint" / "adapter", interface_overrides=caches())
    image_cats, video_cats = ["existence", "count", "colour", "position", "all"], [*TEMPORAL, "static", "temporal",
                                                                                    "all"]
    sets = {"image": (image_cats, None), "video": (video_cats, set(TEMPORAL))}
    results: dict = {"pictures": {}, "clips": {}, "instruction_choice": {}}
    spoken, words, typed = {}, {}, {}
    for modality, (_, temporal) in sets.items():
        key = GROUPS[modality]
        typed[modality] = load(data / f"{split}_{modality}_typed.jsonl", joint)
        spoken[modality] = load(data / f"{split}_{modality}_spoken.jsonl", joint)
        results[key]["typed"] = scores(joint, typed[modality], temporal)
        results[key]["spoken"] = scores(joint, spoken[modality], temporal)  # the processor transcribes each question
        words[modality] = transcribe(joint, spoken[modality])
        results[key]["blind"] = scores(joint, with_instruction(blind(spoken[modality], modality, data),
                                                               words[modality]), temporal)
        results[key]["heard"] = error_rates(words[modality], [r["fields"]["question"] for r in spoken[modality]])
        if split == "val":  # what the Q-Former of a spoken question reads: nothing, the transcript, the true words
            results["instruction_choice"][modality] = {
                "none": scores(joint, with_instruction(spoken[modality], [""] * len(words[modality])), temporal),
                "own transcript": results[key]["spoken"],
                "true words (oracle)": scores(joint, with_instruction(
                    spoken[modality], [r["fields"]["question"] for r in spoken[modality]]), temporal)}
    # Open questions, typed and spoken (each a sentence training never speaks), read back with the world's words.
    from xllm.demo import shapes_language, video_language
    from xllm.demo.talk import open_tables, score_open

    parsers = {"image": shapes_language.parse_answer, "video": video_language.parse_answer}
    results["open"] = {GROUPS[m]: {} for m in sets}
    for modality in sets:
        for way in ("typed", "spoken"):
            asked = load(data / f"{split}_{modality}_open_{way}.jsonl", joint)
            results["open"][GROUPS[modality]][way] = open_tables(score_open(joint, asked, parsers[modality]))
    forgetting = {}
    image_test = load(Path(args.image_data) / "test_yesno.jsonl", joint)
    video_test = load(Path(args.video_data) / "test_yesno.jsonl", joint)
    from xllm.data.records import read_records

    speech_test = read_records(Path(args.speech_data) / "test_asr.jsonl", ["audio"])
    references = [r["conversations"][-1]["value"] for r in speech_test]
    forgetting["joint"] = {"image MME score": scores(joint, image_test), "video": scores(joint, video_test, set(TEMPORAL)),
                           "speech": error_rates(transcribe(joint, speech_test), references)}
    del joint

    single = {m: XLLM.from_pretrained(p, interface_overrides={m: caches()[m]}) for m, p in adapters.items()}
    for modality, (_, temporal) in sets.items():
        key = GROUPS[modality]
        heard = transcribe(single["audio"], spoken[modality])
        results[key]["cascade"] = scores(single[modality], cascade(spoken[modality], modality, heard), temporal)
        results[key]["cascade heard"] = error_rates(heard, [r["fields"]["question"] for r in spoken[modality]])
    forgetting["single"] = {"image MME score": scores(single["image"], image_test),
                            "video": scores(single["video"], video_test, set(TEMPORAL)),
                            "speech": error_rates(transcribe(single["audio"], speech_test), references)}
    del single

    fresh = untrained(adapters)
    for modality, (_, temporal) in sets.items():
        key = GROUPS[modality]
        half = len({r["image_id"] for r in spoken[modality]}) // 2
        results[key]["untrained"] = scores(fresh, load(data / f"{split}_{modality}_spoken.jsonl", fresh, half),
                                           temporal)
    del fresh
    timings["evaluate"] = time.perf_counter() - step
    timings["total"] = time.perf_counter() - started

    def total(table: dict) -> float:
        return sum(v["score"] for k, v in table.items() if k not in ("all", "temporal"))

    gaps = {"image MME score": total(forgetting["joint"]["image MME score"]) - total(forgetting["single"]["image MME score"]),
            "image acc": forgetting["joint"]["image MME score"]["all"]["acc"]
            - forgetting["single"]["image MME score"]["all"]["acc"],
            "video temporal acc": forgetting["joint"]["video"]["temporal"]["acc"]
            - forgetting["single"]["video"]["temporal"]["acc"],
            "speech CER": forgetting["joint"]["speech"]["cer"] - forgetting["single"]["speech"]["cer"]}
    from xllm.adapters.card import write_model_card

    write_model_card(out / "joint" / "adapter", metrics={
        f"held-out {split}: spoken questions about pictures, acc": results["pictures"]["spoken"]["all"]["acc"],
        "typed questions about pictures, acc": results["pictures"]["typed"]["all"]["acc"],
        "spoken questions about clips (temporal), acc": results["clips"]["spoken"]["temporal"]["acc"],
        "typed questions about clips (temporal), acc": results["clips"]["typed"]["temporal"]["acc"],
        "spoken open questions about pictures, accuracy": results["open"]["pictures"]["spoken"]["all"]["accuracy"],
        "speech demo CER": forgetting["joint"]["speech"]["cer"]})
    questions = {m: len(spoken[m]) for m in spoken}
    report = [f"# xllm joint demo (seed {args.seed}, {split} split)", "",
              f"Held-out {split}: {questions['image']} questions about {len({r['image_id'] for r in spoken['image']})} "
              f"pictures and {questions['video']} about {len({r['image_id'] for r in spoken['video']})} clips, all "
              "drawn for this demo (no scene of the image or video task), spoken in voices and sentences training "
              "never speaks. Rows: **typed** and **spoken** (the joint model), **cascade** (the speech demo's "
              "adapter transcribes, the image / video demo's adapter answers the transcript), **blind** (the joint "
              "model, the spoken question, a blank picture or clip), **untrained** (fresh interfaces, on the first "
              "half of the scenes). Replies are generated and parsed as MME parses them; chance is 0.5 / 0.25.", "",
              *table_lines("Pictures", results["pictures"], image_cats), "",
              *table_lines("Clips", results["clips"], video_cats), "",
              *open_lines(results["open"]), "",
              "How well the question was heard (WER of the transcripts against its words): joint model "
              f"{results['pictures']['heard']['wer']:.3f} (pictures) / {results['clips']['heard']['wer']:.3f} (clips); "
              f"the speech demo's adapter {results['pictures']['cascade heard']['wer']:.3f} / "
              f"{results['clips']['cascade heard']['wer']:.3f}.", "",
              "**Forgetting** (the single-modality demos' own test sets; joint adapter against the demo's adapter):", "",
              "| measure | single | joint | joint − single |", "|---|---:|---:|---:|",
              f"| image demo MME score (max 800) | {total(forgetting['single']['image MME score']):.0f} | "
              f"{total(forgetting['joint']['image MME score']):.0f} | {gaps['image MME score']:+.0f} |",
              f"| image demo accuracy | {forgetting['single']['image MME score']['all']['acc']:.3f} | "
              f"{forgetting['joint']['image MME score']['all']['acc']:.3f} | {gaps['image acc']:+.3f} |",
              f"| video demo temporal accuracy | {forgetting['single']['video']['temporal']['acc']:.3f} | "
              f"{forgetting['joint']['video']['temporal']['acc']:.3f} | {gaps['video temporal acc']:+.3f} |",
              f"| speech demo CER | {forgetting['single']['speech']['cer']:.3f} | "
              f"{forgetting['joint']['speech']['cer']:.3f} | {gaps['speech CER']:+.3f} |", ""]
    if results["instruction_choice"]:
        report += ["**What the Q-Former of a spoken question reads** (val only; accuracy, all categories):", "",
                   "| instruction | pictures | clips (temporal) |", "|---|---:|---:|"]
        for name in ("none", "own transcript", "true words (oracle)"):
            choice = results["instruction_choice"]
            report.append(f"| {name} | {choice['image'][name]['all']['acc']:.3f} | "
                          f"{choice['video'][name]['temporal']['acc']:.3f} |")
        report.append("")
    report += ["Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    result = {"seed": args.seed, "split": split, **results, "forgetting": forgetting, "forgetting_gaps": gaps,
              "seconds": timings, "transcripts": {m: list(zip([r["fields"]["question"] for r in spoken[m]][:20],
                                                              words[m][:20])) for m in words}}
    from xllm.demo.plots import log_to_wandb

    log_to_wandb(out, "demo_joint_report", {}, [
        {"media": r["media"]["image"][0], "question": r["fields"]["question"], "reply": w, "reference": ""}
        for r, w in list(zip(spoken["image"], words["image"]))[:16]])
    return write_report(out, report, result)


if __name__ == "__main__":
    main()
