"""`make demo-speech`: a frozen SmolLM2 learns to hear, offline, on 2 CPU cores, through a C-Former.

    python -m xllm.demo.speech [--seed 0] [--out runs/demo_speech] [--step_scale 1.0]

1. materialise SmolLM2-135M-Instruct and Whisper tiny.en (from pip packages);
2. synthesise the task (`xllm.demo.speech_data`): closed-grammar sentences, eSpeak voices; val and test
   sentences never occur in training and are spoken by voice settings no training clip uses;
3. stage 0: the C-Former learns LLM-free to fire one vector per transcript token (CIF + token cross-entropy
   through SmolLM2's output embeddings), frozen Whisper features cached once;
4. stage 1: the frozen SmolLM2 reads the C-Former's tokens and writes the transcript;
5. report held-out CER and WER: untrained, the C-Former alone (greedy, LLM-free) and the LLM, and answer one
   spoken question.

Stages stop on step budgets (the same seed gives the same numbers on a slower machine; times are reported).
Every stage is the ordinary `train.py fit --config configs/demo_speech/common.yaml --config
configs/demo_speech/stageN.yaml` run, in this process; everything lands in `--out`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "demo_speech"


def run_stage(stage: int, out: Path, seed: int, step_scale: float, data: Path, models: Path) -> float:
    """One `fit` through LightningCLI (common + stage config); returns its seconds."""
    from xllm.demo.pipeline import fit, localized_config

    common = localized_config("common.yaml", out, data, models, configs=CONFIGS)
    path = localized_config(f"stage{stage}.yaml", out, data, models, configs=CONFIGS)
    return fit([common, path], seed, max(1, round(json.loads(path.read_text())["trainer"]["max_steps"] * step_scale)))


def cformer_alone(adapter: Path, llm: Path, records: list[dict]) -> list[str]:
    """Greedy transcripts of the stage-0 C-Former on its own: each fired token's nearest LLM output embedding."""
    from torch import nn

    from xllm.adapters.format import apply_overrides, load_weights, read_config
    from xllm.adapters.load import build_interface
    from xllm.demo.pipeline import feature_caches
    from xllm.objectives.cformer import CIFObjective

    config = apply_overrides(read_config(adapter), interface_overrides=feature_caches(CONFIGS))
    (name, spec), = config["interfaces"].items()
    interface = build_interface(name, spec)
    objective = CIFObjective(str(llm))
    objective.bind(interface)
    holder = nn.Module()
    holder.interfaces = nn.ModuleDict({name: interface})
    load_weights(holder, adapter)
    holder.eval()
    paths = [r["media"]["audio"][0] for r in records]
    interface.prepare_media(paths)
    load = interface.media_loader()
    out = []
    for start in range(0, len(paths), 32):
        batch = interface.collate([load(p) for p in paths[start:start + 32]])
        out += objective.transcribe(interface, batch)
    return out


def transcribe(model, records: list[dict], batch_size: int = 32) -> list[str]:
    """The LLM's transcripts through the library's one inference path (`XLLM.reply`)."""
    processor = model.processor()
    processor.prepare_media([r["media"] for r in records])
    out = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = [r["conversations"][:1] for r in chunk]
        out += model.reply(prompts, processor.load_media([r["media"] for r in chunk]), max_new_tokens=24)
    return out


def spoken_question(model, out: Path) -> tuple[str, str, str]:
    """Synthesise one question in a held-out voice and let the trained model answer it (and transcribe it)."""
    from xllm.demo.espeak import Espeak
    from xllm.demo.speech_data import resample, voices, write_wav

    question = "is the red circle left of the blue square"
    wave, rate = Espeak().say(question, voices(held_out=True)[0])
    path = out / "spoken_question.wav"
    write_wav(path, resample(wave, rate, 16000), 16000)
    heard = model.chat([{"from": "user", "value": "<audio>\nTranscribe the audio."}], {"audio": str(path)},
                       max_new_tokens=24)
    answer = model.chat([{"from": "user", "value": "<audio>\nAnswer the question in the audio with yes or no, "
                                                   "then say why."}], {"audio": str(path)}, max_new_tokens=30)
    return question, heard, answer


def main(argv: list[str] | None = None) -> dict:
    from xllm.demo.pipeline import demo_parser, demo_start, write_report

    parser = demo_parser("xllm speech demo: a frozen SmolLM2 learns to hear, on a CPU", "demo_speech")
    parser.add_argument("--step_scale", type=float, default=1.0, help="scale every stage's step budget")
    parser.add_argument("--train_clips", type=int, default=2000)
    parser.add_argument("--split", default="test", choices=["val", "test"],
                        help="report on val while choosing settings; test once, for the report")
    parser.add_argument("--from_stage", type=int, default=0, help="reuse the adapters of earlier stages in --out")
    args, out, data, models, started = demo_start(parser, argv)

    from xllm.data.records import read_records
    from xllm.demo.materialize import materialize_all
    from xllm.demo.pipeline import trained_model, untrained_model
    from xllm.demo.speech_data import build_speech_task
    from xllm.evaluation.metrics import error_rates

    timings = {}
    step = time.perf_counter()
    paths = materialize_all(models, speech=True)
    files = build_speech_task(data, train=args.train_clips)
    timings["setup"] = time.perf_counter() - step
    for stage in range(args.from_stage, 2):
        timings[f"stage{stage}"] = run_stage(stage, out, args.seed, args.step_scale, data, models)

    step = time.perf_counter()
    records = read_records(files[args.split], ["audio"])
    references = [r["conversations"][-1]["value"] for r in records]
    rows = {"C-Former alone (stage 0, greedy, no LLM)": cformer_alone(
        out / "stage0" / "adapter", paths["smollm2-135m-instruct"], records)}
    trained = trained_model(out / "stage1" / "adapter", CONFIGS)
    rows["trained (stage 0 + 1, through the LLM)"] = transcribe(trained, records)
    question = spoken_question(trained, out)
    del trained
    rows = {"untrained (fresh C-Former, through the LLM)": transcribe(
        untrained_model(out / "stage1" / "adapter", CONFIGS), records), **rows}
    timings["evaluate"] = time.perf_counter() - step
    timings["total"] = time.perf_counter() - started

    scores = {name: error_rates(predictions, references) for name, predictions in rows.items()}
    from xllm.adapters.card import write_model_card

    trained_scores = scores["trained (stage 0 + 1, through the LLM)"]
    write_model_card(out / "stage1" / "adapter", metrics={
        f"held-out {args.split} clips": len(records), "CER": trained_scores["cer"], "WER": trained_scores["wer"]})
    lines = ["| model | CER | WER |", "|---|---:|---:|"]
    lines += [f"| {name} | {s['cer']:.3f} | {s['wer']:.3f} |" for name, s in scores.items()]
    examples = [f"- reference: `{references[i]}`  \n  heard: `{rows['trained (stage 0 + 1, through the LLM)'][i]}`"
                for i in range(3)]
    report = [f"# xllm speech demo (seed {args.seed})", "",
              f"Held-out {args.split} split: {len(records)} clips of sentences never heard in training, spoken by "
              "voice settings no training clip uses (a closed vocabulary and synthetic eSpeak voices):", "",
              *lines, "", "Examples:", "", *examples, "",
              "A spoken question, in a held-out voice:", "",
              f"> **audio:** \"{question[0]}\"  \n> **transcribed:** {question[1]}  \n> **answered:** {question[2]}",
              "", "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    result = {"seed": args.seed, "split": args.split, "scores": scores, "question": question, "seconds": timings,
              "predictions": {name: p[:20] for name, p in rows.items()}}
    return write_report(out, report, result)


if __name__ == "__main__":
    main()
