"""Shared by the dataset recipes: one transcription record in xllm's conversation format, and JSONL writing."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

TRANSCRIBE = "Transcribe the audio."


def transcription_record(record_id: str, audio: Path, transcript: str, out_file: Path, prompt: str = TRANSCRIBE) -> dict:
    """`{"id", "audio", "conversations"}` with the audio path relative to the output file's folder (the media root
    xllm uses by default), so the JSONL and the corpus can move together."""
    return {"id": record_id, "audio": os.path.relpath(audio, out_file.parent),
            "conversations": [{"from": "human", "value": f"<audio>\n{prompt}"},
                              {"from": "gpt", "value": transcript}]}


def write_jsonl(records: Iterable[dict], out_file: Path) -> int:
    out_file.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with out_file.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count
