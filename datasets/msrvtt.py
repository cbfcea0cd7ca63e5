"""MSR-VTT captions -> xllm JSONL: video caption pairs for stage 1 (train) and caption test sets (val/test).

Reads the official annotation files as released — `train_val_videodatainfo.json` (splits `train`, `validate`) and
`test_videodatainfo.json` (`test`): `{"videos": [{"video_id": "video0", "split": "train", ...}], "sentences":
[{"video_id": "video0", "caption": "...", "sen_id": 0}]}` — and the clips beside them (`TrainValVideo/video0.mp4`,
`TestVideo/video7010.mp4`). Nothing is downloaded.

    python datasets/msrvtt.py --annotations train_val_videodatainfo.json --videos TrainValVideo --split train \
        --out data/msrvtt_train.jsonl
    python datasets/msrvtt.py --annotations test_videodatainfo.json --videos TestVideo --split test \
        --out data/msrvtt_test.jsonl

`train` writes one record per caption (20 per clip); `validate` and `test` write one record per clip whose reply is
its first caption and whose `references` hold all of them, for caption metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MissingMedia, media_record, write_jsonl  # noqa: E402

PROMPT = "Describe the video briefly."
SPLITS = ("train", "validate", "test")


def records(annotations: Path, videos: Path, split: str, out_file: Path, missing: MissingMedia, prompt: str = PROMPT):
    info = json.loads(annotations.read_text(encoding="utf-8"))
    if not isinstance(info, dict) or not isinstance(info.get("videos"), list) or not isinstance(info.get("sentences"), list):
        raise ValueError(f"{annotations}: expected MSR-VTT's format, {{'videos': [...], 'sentences': [...]}}")
    captions = defaultdict(list)
    for sentence in sorted(info["sentences"], key=lambda s: (s["video_id"], s.get("sen_id", 0))):
        text = sentence.get("caption", "").strip()
        if text:
            captions[sentence["video_id"]].append(text)
    for video in info["videos"]:
        if video.get("split") != split:
            continue
        video_id = video["video_id"]
        where = f"{annotations} video {video_id}"
        if not captions[video_id]:
            raise ValueError(f"{where}: no captions")
        path = videos / f"{video_id}.mp4"
        if not missing.ok(path, where):
            continue
        turns = lambda caption: [{"from": "human", "value": f"<video>\n{prompt}"},  # noqa: E731
                                 {"from": "gpt", "value": caption}]
        if split == "train":
            for number, caption in enumerate(captions[video_id]):
                yield media_record(f"{video_id}-{number}", "video", path, out_file, turns(caption))
        else:
            yield media_record(video_id, "video", path, out_file, turns(captions[video_id][0]),
                               references=captions[video_id])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--annotations", required=True, type=Path,
                        help="train_val_videodatainfo.json or test_videodatainfo.json")
    parser.add_argument("--videos", required=True, type=Path, help="folder of <video_id>.mp4 (TrainValVideo, TestVideo)")
    parser.add_argument("--split", required=True, choices=SPLITS)
    parser.add_argument("--out", required=True, type=Path, help="output JSONL")
    parser.add_argument("--prompt", default=PROMPT, help="the user turn after <video>")
    parser.add_argument("--skip_missing", action="store_true", help="count and skip clips that are missing")
    args = parser.parse_args()
    missing = MissingMedia(args.skip_missing)
    count = write_jsonl(records(args.annotations, args.videos, args.split, args.out, missing, args.prompt), args.out)
    print(f"{args.out}: {count} records{missing.report()}")


if __name__ == "__main__":
    main()
