"""Shared by the dataset recipes: records in xllm's conversation format, media checks, and JSONL writing."""

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


class MissingMedia:
    """A missing media file is an error naming the record, or (with `skip`) counted and skipped."""

    def __init__(self, skip: bool) -> None:
        self.skip, self.skipped = skip, []

    def ok(self, path: Path, where: str) -> bool:
        if path.is_file():
            return True
        if not self.skip:
            raise FileNotFoundError(f"{where}: media file {path} is missing (pass --skip_missing to skip such records)")
        self.skipped.append(where)
        return False

    def report(self) -> str:
        return f", {len(self.skipped)} skipped for missing media" if self.skipped else ""


def media_record(record_id: str, modality: str, path: Path, out_file: Path, conversations: list[dict], **extra) -> dict:
    """`{"id", <modality>: path relative to the output file's folder, "conversations", ...extra}`."""
    return {"id": record_id, modality: os.path.relpath(path, out_file.parent), "conversations": conversations,
            **extra}
