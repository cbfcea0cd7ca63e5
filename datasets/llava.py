"""LLaVA's public training sets -> xllm JSONL: LLaVA-Pretrain (stage 1 captions) and LLaVA-Instruct-150K (stage 2).

Both are JSON lists already in the conversation format xllm reads (`{"id", "image", "conversations"}` with
`human`/`gpt` turns and an `<image>` in the first human turn); the recipe checks every record, points each image
path at the folder you unpacked the images into (relative to the output file, so they move together) and writes
JSONL. Nothing is downloaded.

    # LLaVA-Pretrain: blip_laion_cc_sbu_558k.json + images.zip unpacked (00453/004539375.jpg ...)
    python datasets/llava.py --json blip_laion_cc_sbu_558k.json --images /data/llava_pretrain/images --out data/llava_pretrain.jsonl
    # LLaVA-Instruct-150K: llava_instruct_150k.json + COCO train2017 (000000033471.jpg ...)
    python datasets/llava.py --json llava_instruct_150k.json --images /data/coco/train2017 --out data/llava_instruct.jsonl

A record without an image (LLaVA-Instruct mixes in none, LLaVA-1.5's mix does) is written text-only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MissingMedia, media_record, write_jsonl  # noqa: E402

ROLES = {"human": "human", "gpt": "gpt"}


def records(source: Path, images: Path, out_file: Path, missing: MissingMedia):
    data = json.loads(source.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{source}: expected a JSON list of records (LLaVA's format)")
    for index, item in enumerate(data):
        where = f"{source} record {index} (id {item.get('id')!r})"
        turns = item.get("conversations")
        if not turns or any(t.get("from") not in ROLES or not isinstance(t.get("value"), str) for t in turns):
            raise ValueError(f"{where}: conversations must be a list of {{'from': 'human'|'gpt', 'value': str}}")
        placeholders = sum(t["value"].count("<image>") for t in turns)
        if "image" not in item:
            if placeholders:
                raise ValueError(f"{where}: {placeholders} <image> placeholder(s) but no image")
            yield {"id": str(item.get("id", index)), "conversations": turns}
            continue
        if placeholders != 1:
            raise ValueError(f"{where}: one image but {placeholders} <image> placeholders")
        path = images / item["image"]
        if missing.ok(path, where):
            yield media_record(str(item.get("id", index)), "image", path, out_file, turns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, type=Path, help="blip_laion_cc_sbu_558k.json or llava_instruct_150k.json")
    parser.add_argument("--images", required=True, type=Path, help="the folder the image paths are relative to")
    parser.add_argument("--out", required=True, type=Path, help="output JSONL")
    parser.add_argument("--skip_missing", action="store_true", help="count and skip records whose image is missing")
    args = parser.parse_args()
    missing = MissingMedia(args.skip_missing)
    count = write_jsonl(records(args.json, args.images, args.out, missing), args.out)
    print(f"{args.out}: {count} records{missing.report()}")


if __name__ == "__main__":
    main()
