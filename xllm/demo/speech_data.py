"""The speech demo's data: sentences of a closed grammar spoken by eSpeak voices, written as xllm JSONL + wav.

Sentences talk about the image demo's shapes world and a little beyond it (people moving things between
places). Held-out means unseen twice over: the val and test sentences never occur in training (nor in each
other), and they are spoken by voice settings — eSpeak voice variants, speaking rates and pitches — that no
training clip uses. Settings are chosen on val; test is read once, for the report.

    python -m xllm.demo.speech_data --out .cache/demo_speech/data
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

import numpy as np

from xllm.demo.espeak import Espeak, Voice

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star", "heart", "ring"]
RELATIONS = ["left of", "right of", "above", "below", "next to", "behind"]
NUMBERS = ["one", "two", "three", "four", "five", "six"]
NAMES = ["anna", "ben", "carla", "david", "emma", "frank"]
PLACES = ["box", "kitchen", "garden", "corner", "basket", "drawer"]
VERBS = ["put", "moved", "painted", "found", "dropped", "hid"]

# Voice settings: training and held-out ones share no (variant, rate, pitch) and no variant at all.
VOICE_NAMES = ["en-us", "en-gb-x-rp", "en-029", "en"]
TRAIN_VARIANTS, HELD_OUT_VARIANTS = ["", "+m1", "+m3", "+f2", "+f3"], ["+m5", "+f4"]
TRAIN_RATES, HELD_OUT_RATES = [140, 170, 200], [155, 185]
TRAIN_PITCHES, HELD_OUT_PITCHES = [35, 55, 75], [45, 65]
TRANSCRIBE = "Transcribe the audio."


def all_sentences() -> list[str]:
    """Every sentence of the grammar (~30k), in a fixed order."""
    out = []
    for colour, shape, relation, colour2, shape2 in itertools.product(COLOURS, SHAPES, RELATIONS, COLOURS, SHAPES):
        if (colour, shape) != (colour2, shape2):
            out.append(f"the {colour} {shape} is {relation} the {colour2} {shape2}")
    out += [f"there are {n} {c} {s}s" for n, c, s in itertools.product(NUMBERS[1:], COLOURS, SHAPES)]
    out += [f"{name} {verb} the {colour} {shape} in the {place}"
            for name, verb, colour, shape, place in itertools.product(NAMES, VERBS, COLOURS, SHAPES, PLACES)]
    out += [f"is there a {c} {s} {r} the {s2}" for c, s, r, s2 in itertools.product(COLOURS, SHAPES, RELATIONS, SHAPES)
            if s != s2]
    return out


def voices(held_out: bool) -> list[Voice]:
    variants = HELD_OUT_VARIANTS if held_out else TRAIN_VARIANTS
    rates = HELD_OUT_RATES if held_out else TRAIN_RATES
    pitches = HELD_OUT_PITCHES if held_out else TRAIN_PITCHES
    return [Voice(name + variant, rate, pitch) for name, variant, rate, pitch
            in itertools.product(VOICE_NAMES, variants, rates, pitches)]


def write_wav(path: Path, wave: np.ndarray, rate: int) -> None:
    """16-bit mono PCM wav through PyAV (the library's own audio I/O)."""
    import av

    pcm = (np.clip(wave, -1, 1) * 32767).astype(np.int16)[None]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


def resample(wave: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Linear-interpolation resampling for synthesis output only (the loader resamples real input with FFmpeg)."""
    positions = np.arange(int(len(wave) * rate_out / rate_in)) * rate_in / rate_out
    return np.interp(positions, np.arange(len(wave)), wave).astype(np.float32)


def build_speech_task(out: str | Path, train: int = 2000, val: int = 100, test: int = 150, seed: int = 0,
                      sample_rate: int = 16000) -> dict[str, Path]:
    """Write `{train,val,test}_asr.jsonl` and the wav files they name; returns the JSONL paths (cached by a stamp)."""
    out = Path(out)
    settings = {"train": train, "val": val, "test": test, "seed": seed, "rate": sample_rate, "version": 1}
    files = {split: out / f"{split}_asr.jsonl" for split in ("train", "val", "test")}
    stamp = out / "task.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings and all(f.is_file() for f in files.values()):
        return files
    rng = random.Random(seed)
    sentences = all_sentences()
    rng.shuffle(sentences)
    # Disjoint sentence pools; training sees each of its sentences several times, by different voices.
    held_out_pool = {"val": sentences[:val], "test": sentences[val:val + test]}
    train_pool = sentences[val + test: val + test + max(1, train // 3)]
    assert not set(train_pool) & (set(held_out_pool["val"]) | set(held_out_pool["test"]))
    speaker = Espeak()
    (out / "audio").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("val", val), ("test", test)):
        pool = train_pool if split == "train" else held_out_pool[split]
        voice_pool = voices(held_out=split != "train")
        lines = []
        for index in range(count):
            sentence = pool[index % len(pool)]
            voice = rng.choice(voice_pool)
            wave, rate = speaker.say(sentence, voice)
            name = f"audio/{split}_{index:05d}.wav"
            write_wav(out / name, resample(wave, rate, sample_rate), sample_rate)
            lines.append(json.dumps({
                "id": f"{split}_{index:05d}", "audio": name, "voice": str(voice),
                "conversations": [{"from": "human", "value": f"<audio>\n{TRANSCRIBE}"},
                                  {"from": "gpt", "value": sentence}],
            }))
        files[split].write_text("\n".join(lines) + "\n")
    stamp.write_text(json.dumps(settings))
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".cache/demo_speech/data")
    parser.add_argument("--train", type=int, default=2000)
    args = parser.parse_args()
    print(build_speech_task(args.out, train=args.train))


if __name__ == "__main__":
    main()
