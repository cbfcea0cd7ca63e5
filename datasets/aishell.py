"""AISHELL-1 (Mandarin, X-LLM's speech set) -> xllm JSONL for speech stage 0/1 (transcription).

Reads the corpus in its distributed layout: `data_aishell/transcript/aishell_transcript_v0.8.txt` (lines
`<utterance-id> <words separated by spaces>`) and `data_aishell/wav/<train|dev|test>/<speaker>/<utterance-id>.wav`
(the per-speaker tarballs unpacked); nothing is downloaded.

    python datasets/aishell.py --root /data/data_aishell --split train --out data/aishell_train.jsonl

The corpus segments words with spaces; Chinese text is written without them (`--keep_spaces` keeps them).
Utterances with audio but no transcript (the corpus has a few) are counted and left out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import transcription_record, write_jsonl  # noqa: E402

TRANSCRIPT = Path("transcript") / "aishell_transcript_v0.8.txt"


def read_transcripts(root: Path) -> dict[str, str]:
    path = root / TRANSCRIPT
    if not path.is_file():
        raise FileNotFoundError(f"no transcript file {path} (expected data_aishell/{TRANSCRIPT})")
    out = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        utterance, _, text = line.strip().partition(" ")
        if not text.strip():
            raise ValueError(f"{path}:{number}: expected '<utterance-id> <words>', got {line!r}")
        out[utterance] = text.strip()
    return out


def records(root: Path, split: str, out_file: Path, keep_spaces: bool = False, untranscribed: list[str] | None = None):
    folder = root / "wav" / split
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder} (unpack the per-speaker tarballs of wav/{split}/)")
    transcripts = read_transcripts(root)
    for audio in sorted(folder.glob("*/*.wav")):
        text = transcripts.get(audio.stem)
        if text is None:
            if untranscribed is not None:
                untranscribed.append(audio.stem)
            continue
        yield transcription_record(audio.stem, audio, text if keep_spaces else text.replace(" ", ""), out_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, type=Path, help="the data_aishell folder")
    parser.add_argument("--split", required=True, choices=["train", "dev", "test"])
    parser.add_argument("--out", required=True, type=Path, help="JSONL file to write")
    parser.add_argument("--keep_spaces", action="store_true", help="keep the corpus's word segmentation")
    args = parser.parse_args(argv)
    untranscribed: list[str] = []
    count = write_jsonl(records(args.root, args.split, args.out, args.keep_spaces, untranscribed), args.out)
    print(f"{args.out}: {count} utterances, {len(untranscribed)} without a transcript left out")
    return count


if __name__ == "__main__":
    main()
