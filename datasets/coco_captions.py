"""COCO Captions in the Karpathy split -> xllm JSONL: stage-0/1 caption pairs (train) and caption test sets.

Reads Karpathy's `dataset_coco.json` (`{"images": [{"filepath": "val2014", "filename": ..., "split":
"train"|"restval"|"val"|"test", "sentences": [{"raw": ...}, ...], "cocoid": ...}]}`) and the COCO 2014 image
folders (`<coco>/train2014`, `<coco>/val2014`). Nothing is downloaded.

    python datasets/coco_captions.py --karpathy dataset_coco.json --coco /data/coco --split train --out data/coco_train.jsonl
    python datasets/coco_captions.py --karpathy dataset_coco.json --coco /data/coco --split test --out data/coco_test.jsonl

`train` (Karpathy's train + restval, 113k images) writes one record per caption (~5 per image); `val` and `test`
(5k images each) write one record per image whose reply is the first caption and whose `references` hold all of
them, for caption metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MissingMedia, media_record, write_jsonl  # noqa: E402

PROMPT = "Describe the image briefly."
SPLITS = {"train": {"train", "restval"}, "val": {"val"}, "test": {"test"}}


def turns(caption: str, prompt: str) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": caption}]


def records(karpathy: Path, coco: Path, split: str, out_file: Path, missing: MissingMedia, prompt: str = PROMPT):
    images = json.loads(karpathy.read_text(encoding="utf-8")).get("images")
    if not isinstance(images, list):
        raise ValueError(f"{karpathy}: expected Karpathy's format, {{'images': [...]}}")
    for image in images:
        if image.get("split") not in SPLITS[split]:
            continue
        where = f"{karpathy} image {image.get('cocoid')}"
        captions = [s["raw"].strip() for s in image.get("sentences", []) if s.get("raw", "").strip()]
        if not captions:
            raise ValueError(f"{where}: no captions")
        path = coco / image["filepath"] / image["filename"]
        if not missing.ok(path, where):
            continue
        if split == "train":
            for number, caption in enumerate(captions):
                yield media_record(f"{image['cocoid']}-{number}", "image", path, out_file, turns(caption, prompt))
        else:
            yield media_record(str(image["cocoid"]), "image", path, out_file, turns(captions[0], prompt),
                               references=captions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--karpathy", required=True, type=Path, help="Karpathy's dataset_coco.json")
    parser.add_argument("--coco", required=True, type=Path, help="folder holding train2014/ and val2014/")
    parser.add_argument("--split", required=True, choices=sorted(SPLITS))
    parser.add_argument("--out", required=True, type=Path, help="output JSONL")
    parser.add_argument("--prompt", default=PROMPT, help="the user turn after <image>")
    parser.add_argument("--skip_missing", action="store_true", help="count and skip images that are missing")
    args = parser.parse_args()
    missing = MissingMedia(args.skip_missing)
    count = write_jsonl(records(args.karpathy, args.coco, args.split, args.out, missing, args.prompt), args.out)
    print(f"{args.out}: {count} records{missing.report()}")


if __name__ == "__main__":
    main()
