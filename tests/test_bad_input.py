"""Bad input: a clear error naming file/line/record and the problem; with `skip`, a counted skip."""

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoImageProcessor

from xllm.data.collator import ConversationCollator
from xllm.data.dataset import ConversationDataset, build_tokenized_dataset
from xllm.data.processor import ConversationProcessor
from xllm.data.records import BadSampleError, BadSamples, read_records
from xllm.encoders.vision import ImageLoader
from xllm.interfaces.base import collate_items
from xllm.llm import load_tokenizer


def good(rid, image="images/train_00000.png"):
    return {"id": rid, "image": image, "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "A red square."}]}


@pytest.fixture
def media(tiny, tmp_path):
    root = tmp_path / "media"
    shutil.copytree(tiny / "data" / "images", root / "images")
    (root / "images" / "corrupt.png").write_bytes(b"not a png at all")
    return root


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


BAD_CASES = [
    (good("missing", image="images/nope.png"), "missing_media", r"image file not found: .*nope\.png"),
    ({**good("count"), "image": ["images/train_00000.png", "images/train_00001.png"]}, "placeholder_mismatch",
     r"1 <image> placeholder\(s\) but 2 image file\(s\)"),
    ('{"id": "broken", "conversations": [', "malformed_json", "malformed JSON line"),
    ({"id": "empty", "image": "images/train_0000.png", "conversations": []}, "empty_conversation",
     "empty or missing 'conversations'"),
    ({"id": "noreply", "conversations": [{"from": "human", "value": "hi"}]}, "empty_conversation",
     "no non-empty assistant"),
    ({"id": "audio", "audio": "a.wav", "conversations": [
        {"from": "human", "value": "<audio>"}, {"from": "gpt", "value": "x"}]}, "unknown_modality", "no audio interface"),
    (good("absolute", image="/etc/passwd"), "media_outside_root", r"'/etc/passwd' leads outside the media root"),
    (good("climbs", image="images/../../escape.png"), "media_outside_root",
     r"'images/../../escape.png' leads outside the media root"),
]


@pytest.mark.parametrize("bad,reason,message", BAD_CASES, ids=[c[1] + "-" + str(i) for i, c in enumerate(BAD_CASES)])
def test_bad_record_is_named_or_counted(media, tmp_path, bad, reason, message):
    path = write_jsonl(tmp_path / "data.jsonl", [good("ok1"), bad, good("ok2")])
    with pytest.raises(BadSampleError, match=message) as info:
        read_records(path, ["image"], str(media))
    assert "data.jsonl:2" in str(info.value)
    assert info.value.reason == reason

    skipped = BadSamples("skip")
    records = read_records(path, ["image"], str(media), skipped)
    assert [r["id"] for r in records] == ["ok1", "ok2"]
    assert skipped.counts == {reason: 1}


def test_media_outside_the_root_is_read_only_when_allowed(media, tmp_path):
    shutil.copy(media / "images" / "train_00000.png", tmp_path / "escape.png")
    path = write_jsonl(tmp_path / "data.jsonl", [good("inside"), good("climbs", image="../escape.png"),
                                                 good("absolute", image=str(tmp_path / "escape.png"))])
    with pytest.raises(BadSampleError, match="escape.png' leads outside"):
        read_records(path, ["image"], str(media))
    records = read_records(path, ["image"], str(media), allow_outside_root=True)
    assert [Path(r["media"]["image"][0]).resolve() for r in records[1:]] == [(tmp_path / "escape.png").resolve()] * 2


def test_text_longer_than_max_length(tiny, media, tmp_path):
    long = good("long")
    long["conversations"][0]["value"] = "<image>\n" + "Describe the image. " * 80
    path = write_jsonl(tmp_path / "data.jsonl", [good("ok1"), long])
    processor = ConversationProcessor(load_tokenizer(str(tiny / "llama")), "vicuna_v1", {"image": -200}, {"image": 4}, 128)
    with pytest.raises(BadSampleError, match=r"data.jsonl:2 \(id long\).*exceed max_length=128"):
        build_tokenized_dataset(str(path), processor, str(media))
    skipped = BadSamples("skip")
    rows = build_tokenized_dataset(str(path), processor, str(media), skipped)
    assert len(rows) == 1 and skipped.counts == {"too_long": 1}


def test_corrupt_image_is_named_at_load_time_or_skipped(tiny, media, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [good("ok1"), good("bad", image="images/corrupt.png")])
    processor = ConversationProcessor(load_tokenizer(str(tiny / "llama")), "vicuna_v1", {"image": -200}, {"image": 4}, 128)
    rows = build_tokenized_dataset(str(path), processor, str(media))
    loaders = {"image": ImageLoader(AutoImageProcessor.from_pretrained(str(tiny / "vit")))}

    strict = ConversationDataset(rows, loaders, BadSamples("error"))
    assert strict[0]["media"]["image"][0]["pixel_values"].shape == (3, 32, 32)
    with pytest.raises(BadSampleError, match=r"data.jsonl:2 \(id bad\): cannot load image .*corrupt\.png"):
        strict[1]

    lenient = ConversationDataset(rows, loaders, BadSamples("skip"))
    collate = ConversationCollator(pad_token_id=0, collate_media={"image": collate_items})
    batch = collate([lenient[0], lenient[1]])
    assert batch["ids"] == ["ok1"] and len(batch["skipped"]) == 1 and len(batch["media"]["image"]) == 1
    assert collate([lenient[1]]) is None


def test_json_list_file_and_media_root_default(tiny):
    records = read_records(tiny / "data" / "train_captions.jsonl", ["image"])
    assert len(records) == 32 and records[0]["media"]["image"][0].startswith(str(tiny / "data"))


def test_missing_data_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_records(tmp_path / "nope.jsonl", ["image"])
