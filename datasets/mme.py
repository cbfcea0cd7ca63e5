"""The MME benchmark folder -> xllm JSONL for `evaluate.py` / MME scoring (yes/no, acc and acc+ per subtask).

MME_Benchmark_release_version holds one folder per subtask. Most keep images in `<subtask>/images/` and the
questions in `<subtask>/questions_answers_YN/<image stem>.txt`; the others keep each image beside its `.txt`.
Each `.txt` has two lines, `question<TAB>Yes|No`: one yes and one no question per image. Nothing is downloaded.

    python datasets/mme.py --root /data/MME_Benchmark_release_version --out data/mme.jsonl

Records carry `category` (the subtask), `task` (perception or cognition) and `image_id` (pairing the two
questions of an image for acc+).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MissingMedia, media_record, write_jsonl  # noqa: E402

PERCEPTION = ["existence", "count", "position", "color", "OCR", "posters", "celebrity", "scene", "landmark", "artwork"]
COGNITION = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


def question_files(folder: Path) -> tuple[list[Path], Path]:
    """The subtask's question files and the folder its images are in."""
    if (folder / "questions_answers_YN").is_dir():
        return sorted((folder / "questions_answers_YN").glob("*.txt")), folder / "images"
    return sorted(folder.glob("*.txt")), folder


def records(root: Path, out_file: Path, missing: MissingMedia):
    subtasks = [s for s in PERCEPTION + COGNITION if (root / s).is_dir()]
    if not subtasks:
        raise FileNotFoundError(f"{root}: none of MME's subtask folders ({', '.join(PERCEPTION + COGNITION)})")
    for subtask in subtasks:
        texts, image_folder = question_files(root / subtask)
        for text in texts:
            candidates = [image_folder / (text.stem + suffix) for suffix in IMAGE_SUFFIXES]
            image = next((c for c in candidates if c.is_file()), candidates[0])
            if not missing.ok(image, f"{text}"):
                continue
            lines = [line for line in text.read_text(encoding="utf-8").splitlines() if line.strip()]
            for number, line in enumerate(lines, start=1):
                question, tab, answer = line.rpartition("\t")
                if not tab or answer.strip() not in ("Yes", "No"):
                    raise ValueError(f"{text}:{number}: expected 'question<TAB>Yes|No', got {line!r}")
                yield media_record(
                    f"{subtask}/{text.stem}/{number}", "image", image, out_file,
                    [{"from": "human", "value": f"<image>\n{question.strip()}"}, {"from": "gpt", "value": answer.strip()}],
                    category=subtask, task="perception" if subtask in PERCEPTION else "cognition",
                    image_id=f"{subtask}/{text.stem}",
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, type=Path, help="MME_Benchmark_release_version")
    parser.add_argument("--out", required=True, type=Path, help="output JSONL")
    parser.add_argument("--skip_missing", action="store_true", help="count and skip questions whose image is missing")
    args = parser.parse_args()
    missing = MissingMedia(args.skip_missing)
    count = write_jsonl(records(args.root, args.out, missing), args.out)
    print(f"{args.out}: {count} questions{missing.report()}")


if __name__ == "__main__":
    main()
