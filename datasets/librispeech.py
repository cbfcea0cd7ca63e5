"""LibriSpeech -> xllm JSONL for speech stage 0/1 (transcription): one record per utterance.

Reads the corpus in its distributed layout (`LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`,
lines `<utterance-id> <TRANSCRIPT>`, audio `<utterance-id>.flac` beside it); nothing is downloaded.

    python datasets/librispeech.py --root /data/LibriSpeech --split train-clean-100 --out data/ls_train.jsonl

Transcripts are upper case in the corpus; `--lowercase` (default) writes them as a chat LLM would write text.
An utterance whose flac is missing is an error naming it (or counted and skipped with `--skip_missing`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import transcription_record, write_jsonl  # noqa: E402


def records(root: Path, split: str, out_file: Path, lowercase: bool = True, skip_missing: bool = False,
            missing: list[str] | None = None):
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"no split folder {folder} (expected LibriSpeech/<split>/<speaker>/<chapter>/)")
    for transcripts in sorted(folder.glob("*/*/*.trans.txt")):
        for number, line in enumerate(transcripts.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            utterance, _, text = line.strip().partition(" ")
            if not text:
                raise ValueError(f"{transcripts}:{number}: expected '<utterance-id> <TRANSCRIPT>', got {line!r}")
            audio = transcripts.parent / f"{utterance}.flac"
            if not audio.is_file():
                if not skip_missing:
                    raise FileNotFoundError(f"{transcripts}:{number}: audio {audio} is missing")
                if missing is not None:
                    missing.append(utterance)
                continue
            yield transcription_record(utterance, audio, text.lower() if lowercase else text, out_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, type=Path, help="the LibriSpeech folder (holding the split folders)")
    parser.add_argument("--split", required=True, help="e.g. train-clean-100, dev-clean, test-clean")
    parser.add_argument("--out", required=True, type=Path, help="JSONL file to write")
    parser.add_argument("--keep_case", action="store_true", help="keep the corpus's upper-case transcripts")
    parser.add_argument("--skip_missing", action="store_true", help="count and skip utterances without audio")
    args = parser.parse_args(argv)
    missing: list[str] = []
    count = write_jsonl(records(args.root, args.split, args.out, not args.keep_case, args.skip_missing, missing),
                        args.out)
    print(f"{args.out}: {count} utterances" + (f", {len(missing)} skipped without audio" if missing else ""))
    return count


if __name__ == "__main__":
    main()
