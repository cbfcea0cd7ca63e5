"""Video instruction data -> xllm JSONL for stage 2: VideoChat's `videochat_instruct_11k.json` or Video-ChatGPT's
`VideoInstruct100K.json`, with the clips you downloaded for them. Nothing is downloaded.

- `--format videochat`: a JSON list of `{"video": "<folder>/<name>.mp4", "QA": [{"i": instruction, "q": question,
  "a": answer}, ...]}` (WebVid clips). The QA list becomes one conversation: the instruction and the first
  question make the first user turn (a detailed-description item has only an instruction), each further pair a
  turn more.
- `--format videochatgpt`: a JSON list of `{"video_id": "v_...", "q": question, "a": answer}` (ActivityNet clips,
  `<video_id>.mp4` or `.mkv`); each pair is one record.

    python datasets/video_instruct.py --format videochat --json videochat_instruct_11k.json --videos webvid \
        --out data/videochat.jsonl
    python datasets/video_instruct.py --format videochatgpt --json VideoInstruct100K.json --videos activitynet \
        --out data/videochatgpt.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MissingMedia, media_record, write_jsonl  # noqa: E402

ACTIVITYNET_SUFFIXES = (".mp4", ".mkv", ".webm")


def videochat(items: list, source: Path, videos: Path, out_file: Path, missing: MissingMedia):
    for index, item in enumerate(items):
        where = f"{source} item {index} (video {item.get('video')!r})"
        qa = item.get("QA")
        if not item.get("video") or not isinstance(qa, list) or not qa:
            raise ValueError(f"{where}: expected {{'video': ..., 'QA': [{{'i', 'q', 'a'}}, ...]}}")
        turns = []
        for number, pair in enumerate(qa):
            question = " ".join(part.strip() for part in (pair.get("i", "") if number == 0 else "", pair.get("q", ""))
                                if part.strip())
            answer = pair.get("a", "").strip()
            if not question or not answer:
                raise ValueError(f"{where}: QA {number} has no {'question' if not question else 'answer'}")
            turns += [{"from": "human", "value": f"<video>\n{question}" if number == 0 else question},
                      {"from": "gpt", "value": answer}]
        path = videos / item["video"]
        if missing.ok(path, where):
            yield media_record(f"videochat-{index}", "video", path, out_file, turns)


def videochatgpt(items: list, source: Path, videos: Path, out_file: Path, missing: MissingMedia):
    for index, item in enumerate(items):
        video_id, question, answer = item.get("video_id"), item.get("q", "").strip(), item.get("a", "").strip()
        where = f"{source} item {index} (video_id {video_id!r})"
        if not video_id or not question or not answer:
            raise ValueError(f"{where}: expected {{'video_id', 'q', 'a'}}, all non-empty")
        candidates = [videos / f"{video_id}{suffix}" for suffix in ACTIVITYNET_SUFFIXES]
        path = next((c for c in candidates if c.is_file()), candidates[0])
        if missing.ok(path, where):
            yield media_record(f"{video_id}-{index}", "video", path, out_file, [
                {"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--format", required=True, choices=("videochat", "videochatgpt"))
    parser.add_argument("--json", required=True, type=Path, help="videochat_instruct_11k.json or VideoInstruct100K.json")
    parser.add_argument("--videos", required=True, type=Path, help="folder the clips' paths are relative to")
    parser.add_argument("--out", required=True, type=Path, help="output JSONL")
    parser.add_argument("--skip_missing", action="store_true", help="count and skip items whose clip is missing")
    args = parser.parse_args()
    items = json.loads(args.json.read_text(encoding="utf-8"))
    if not isinstance(items, list):
        raise SystemExit(f"{args.json}: expected a JSON list")
    missing = MissingMedia(args.skip_missing)
    convert = videochat if args.format == "videochat" else videochatgpt
    count = write_jsonl(convert(items, args.json, args.videos, args.out, missing), args.out)
    print(f"{args.out}: {count} records{missing.report()}")


if __name__ == "__main__":
    main()
