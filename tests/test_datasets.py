"""Dataset recipes (`datasets/`) on tiny fixtures written in each source's exact layout; their output reads back
through xllm's own data path, media and all."""

import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from xllm.data.records import read_records
from xllm.encoders.audio import decode_audio

RECIPES = Path(__file__).resolve().parents[1] / "datasets"


def write_wav(path: Path, seconds: float = 0.5, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = (0.3 * np.sin(2 * np.pi * 300 * np.arange(int(seconds * rate)) / rate) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return path


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RECIPES / script), *args], capture_output=True, text=True)


def flac(path: Path) -> Path:
    """LibriSpeech ships flac: re-encode a wav with PyAV."""
    import av

    source = write_wav(path.with_suffix(".wav"))
    with av.open(str(source)) as inp, av.open(str(path), "w") as out:
        stream = out.add_stream("flac", rate=16000, layout="mono")
        for frame in inp.decode(audio=0):
            frame.pts = None
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    source.unlink()
    return path


def test_librispeech_layout_to_jsonl(tmp_path):
    chapter = tmp_path / "LibriSpeech" / "dev-clean" / "1272" / "128104"
    chapter.mkdir(parents=True)
    (chapter / "1272-128104.trans.txt").write_text(
        "1272-128104-0000 MISTER QUILTER IS THE APOSTLE OF THE MIDDLE CLASSES\n"
        "1272-128104-0001 NOR IS MISTER QUILTER'S MANNER LESS INTERESTING\n")
    for utterance in ("1272-128104-0000", "1272-128104-0001"):
        flac(chapter / f"{utterance}.flac")
    out = tmp_path / "data" / "ls_dev.jsonl"
    result = run("librispeech.py", "--root", str(tmp_path / "LibriSpeech"), "--split", "dev-clean", "--out", str(out))
    assert result.returncode == 0, result.stderr
    records = read_records(out, ["audio"], allow_outside_root=True)
    assert [r["id"] for r in records] == ["1272-128104-0000", "1272-128104-0001"]
    assert records[1]["conversations"][1]["value"] == "nor is mister quilter's manner less interesting"
    assert len(decode_audio(records[0]["media"]["audio"][0], 16000)) == 8000

    (chapter / "1272-128104-0001.flac").unlink()
    failed = run("librispeech.py", "--root", str(tmp_path / "LibriSpeech"), "--split", "dev-clean", "--out", str(out))
    assert failed.returncode != 0 and "1272-128104-0001.flac is missing" in failed.stderr
    skipped = run("librispeech.py", "--root", str(tmp_path / "LibriSpeech"), "--split", "dev-clean", "--out", str(out),
                  "--skip_missing")
    assert skipped.returncode == 0 and "1 skipped without audio" in skipped.stdout


def test_aishell_layout_to_jsonl(tmp_path):
    root = tmp_path / "data_aishell"
    (root / "transcript").mkdir(parents=True)
    (root / "transcript" / "aishell_transcript_v0.8.txt").write_text(
        "BAC009S0002W0122 而 对 楼市 成交 抑制 作用 最 大 的 限 购\n"
        "BAC009S0002W0123 也 成为 地方 政府 的 眼中 钉\n", encoding="utf-8")
    write_wav(root / "wav" / "train" / "S0002" / "BAC009S0002W0122.wav")
    write_wav(root / "wav" / "train" / "S0002" / "BAC009S0002W0123.wav")
    write_wav(root / "wav" / "train" / "S0002" / "BAC009S0002W0999.wav")  # audio without a transcript
    out = tmp_path / "aishell_train.jsonl"
    result = run("aishell.py", "--root", str(root), "--split", "train", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "2 utterances, 1 without a transcript left out" in result.stdout
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert lines[0]["conversations"][1]["value"] == "而对楼市成交抑制作用最大的限购"
    assert read_records(out, ["audio"], allow_outside_root=True)[1]["media"]["audio"][0].endswith("BAC009S0002W0123.wav")


def write_image(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return path


def test_llava_pretrain_and_instruct_to_jsonl(tmp_path):
    # LLaVA-Pretrain's blip_laion_cc_sbu_558k.json and images/<shard>/<id>.jpg, as distributed.
    pretrain = [{"id": "004539375", "image": "00453/004539375.jpg", "conversations": [
        {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
        {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"}]},
        {"id": "002239345", "image": "00223/002239345.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWrite a terse but informative summary of the picture."},
            {"from": "gpt", "value": "a grey watch with an army style strap"}]}]
    (tmp_path / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(pretrain))
    write_image(tmp_path / "images" / "00453" / "004539375.jpg")
    out = tmp_path / "out" / "pretrain.jsonl"
    result = run("llava.py", "--json", str(tmp_path / "blip_laion_cc_sbu_558k.json"), "--images",
                 str(tmp_path / "images"), "--out", str(out))
    assert result.returncode != 0 and "record 1 (id '002239345')" in result.stderr and "002239345.jpg" in result.stderr
    result = run("llava.py", "--json", str(tmp_path / "blip_laion_cc_sbu_558k.json"), "--images",
                 str(tmp_path / "images"), "--out", str(out), "--skip_missing")
    assert result.returncode == 0 and "1 records, 1 skipped for missing media" in result.stdout
    (record,) = read_records(out, ["image"], allow_outside_root=True)
    assert Path(record["media"]["image"][0]).resolve() == tmp_path / "images" / "00453" / "004539375.jpg"
    assert record["conversations"][1]["value"].startswith("select luxury")

    # LLaVA-Instruct-150K: multi-turn, images named as in COCO train2017.
    instruct = [{"id": "000000033471", "image": "000000033471.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
        {"from": "gpt", "value": "The bus in the image is white and red."},
        {"from": "human", "value": "What feature can be seen on the back of the bus?"},
        {"from": "gpt", "value": "The back of the bus features an advertisement."}]}]
    (tmp_path / "llava_instruct_150k.json").write_text(json.dumps(instruct))
    write_image(tmp_path / "train2017" / "000000033471.jpg")
    out = tmp_path / "out" / "instruct.jsonl"
    assert run("llava.py", "--json", str(tmp_path / "llava_instruct_150k.json"), "--images",
               str(tmp_path / "train2017"), "--out", str(out)).returncode == 0
    (record,) = read_records(out, ["image"], allow_outside_root=True)
    assert len(record["conversations"]) == 4


def test_coco_karpathy_split_to_jsonl(tmp_path):
    captions = ["A man with a red helmet on a small moped on a dirt road. ", "Man riding a motor bike on a dirt road."]
    karpathy = {"images": [
        {"filepath": "val2014", "sentids": [770337, 771687], "filename": "COCO_val2014_000000391895.jpg", "imgid": 0,
         "split": "test", "sentences": [{"tokens": c.lower().split(), "raw": c, "imgid": 0, "sentid": i}
                                        for i, c in enumerate(captions)], "cocoid": 391895},
        {"filepath": "train2014", "sentids": [1, 2], "filename": "COCO_train2014_000000000009.jpg", "imgid": 1,
         "split": "restval", "sentences": [{"tokens": [], "raw": c, "imgid": 1, "sentid": 9 + i}
                                           for i, c in enumerate(captions)], "cocoid": 9}],
        "dataset": "coco"}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    write_image(tmp_path / "coco" / "val2014" / "COCO_val2014_000000391895.jpg")
    write_image(tmp_path / "coco" / "train2014" / "COCO_train2014_000000000009.jpg")
    args = ["--karpathy", str(tmp_path / "dataset_coco.json"), "--coco", str(tmp_path / "coco")]
    assert run("coco_captions.py", *args, "--split", "train", "--out", str(tmp_path / "train.jsonl")).returncode == 0
    train = read_records(tmp_path / "train.jsonl", ["image"])
    assert [r["id"] for r in train] == ["9-0", "9-1"]  # restval is training data; one record per caption
    assert run("coco_captions.py", *args, "--split", "test", "--out", str(tmp_path / "test.jsonl")).returncode == 0
    (test,) = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert test["references"] == [c.strip() for c in captions] and test["image"].endswith("000000391895.jpg")


def test_mme_folder_to_jsonl(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    # Two layouts, as MME ships them: images/ + questions_answers_YN/, or each image beside its questions.
    write_image(root / "artwork" / "images" / "10002.jpg")
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Does this artwork exist in the form of painting?\tYes\nDoes this artwork exist in the form of glassware?\tNo\n")
    write_image(root / "existence" / "000000006040.jpg")
    (root / "existence" / "000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\n")
    out = tmp_path / "mme.jsonl"
    result = run("mme.py", "--root", str(root), "--out", str(out))
    assert result.returncode == 0 and "4 questions" in result.stdout
    assert len(read_records(out, ["image"])) == 4  # xllm reads it: images found, placeholders match
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["category"] for r in records} == {"existence", "artwork"}
    assert [r["conversations"][1]["value"] for r in records] == ["Yes", "No", "Yes", "No"]
    assert records[0]["image_id"] == records[1]["image_id"] and records[0]["task"] == "perception"

    (root / "existence" / "000000006040.txt").write_text("Is there a train in this image?\tMaybe\n")
    result = run("mme.py", "--root", str(root), "--out", str(out))
    assert result.returncode != 0 and "000000006040.txt:1" in result.stderr


@pytest.mark.parametrize("script, flag", [("librispeech.py", "--root"), ("aishell.py", "--root"),
                                          ("llava.py", "--json"), ("coco_captions.py", "--karpathy"),
                                          ("mme.py", "--root"), ("msrvtt.py", "--annotations"),
                                          ("video_instruct.py", "--format")])
def test_recipes_explain_themselves(script, flag):
    result = run(script, "--help")
    assert result.returncode == 0 and flag in result.stdout


def write_clip(path: Path) -> Path:
    from xllm.demo.video_files import write_video

    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(str(path), [np.full((32, 32, 3), 40 * i, np.uint8) for i in range(3)], fps=5)
    return path


def test_msrvtt_annotations_to_jsonl(tmp_path):
    from xllm.encoders.video_frames import read_frames

    # MSR-VTT's train_val_videodatainfo.json and TrainValVideo/<video_id>.mp4, as released.
    info = {"info": {"year": "2016"}, "videos": [
        {"category": 9, "url": "https://www.youtube.com/watch?v=9lZi22qLlEo", "video_id": "video0",
         "start time": 137.72, "end time": 149.44, "split": "train", "id": 0},
        {"category": 16, "url": "https://www.youtube.com/watch?v=w4JM08PDEng", "video_id": "video1",
         "start time": 184.33, "end time": 206.89, "split": "validate", "id": 1}],
        "sentences": [{"caption": "a car is shown", "video_id": "video0", "sen_id": 1},
                      {"caption": "a cartoon animals runs through an ice cave in a video game", "video_id": "video0",
                       "sen_id": 0},
                      {"caption": "a person is singing", "video_id": "video1", "sen_id": 2},
                      {"caption": "a woman sings on stage", "video_id": "video1", "sen_id": 3}]}
    (tmp_path / "train_val_videodatainfo.json").write_text(json.dumps(info))
    write_clip(tmp_path / "TrainValVideo" / "video0.mp4")
    args = ["--annotations", str(tmp_path / "train_val_videodatainfo.json"), "--videos", str(tmp_path / "TrainValVideo")]
    out = tmp_path / "out" / "train.jsonl"
    assert run("msrvtt.py", *args, "--split", "train", "--out", str(out)).returncode == 0
    records = read_records(out, ["video"], allow_outside_root=True)
    assert [r["conversations"][1]["value"] for r in records] == [
        "a cartoon animals runs through an ice cave in a video game", "a car is shown"]  # in sen_id order
    assert records[0]["conversations"][0]["value"] == "<video>\nDescribe the video briefly."
    assert len(read_frames(records[0]["media"]["video"][0], num_frames=2).frames) == 2

    result = run("msrvtt.py", *args, "--split", "validate", "--out", str(tmp_path / "out" / "val.jsonl"))
    assert result.returncode != 0 and "video video1" in result.stderr and "video1.mp4" in result.stderr
    write_clip(tmp_path / "TrainValVideo" / "video1.mp4")
    assert run("msrvtt.py", *args, "--split", "validate", "--out", str(tmp_path / "out" / "val.jsonl")).returncode == 0
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "val.jsonl").read_text().splitlines()]
    assert record["references"] == ["a person is singing", "a woman sings on stage"]


def test_videochat_and_videochatgpt_instructions_to_jsonl(tmp_path):
    # VideoChat's videochat_instruct_11k.json (WebVid clips in <shard>/<id>.mp4), as released.
    videochat = [
        {"video": "029551_029600/1036385494.mp4", "QA": [
            {"i": "Describe the following video in detail.", "q": "",
             "a": "In the video, a man is seen cutting wood with a saw on a workbench."}]},
        {"video": "017851_017900/5475386.mp4", "QA": [
            {"i": "Answer the questions about the video.", "q": "What is the man doing?", "a": "He is fishing."},
            {"i": "", "q": "Where is he?", "a": "On a boat on a lake."}]}]
    (tmp_path / "videochat_instruct_11k.json").write_text(json.dumps(videochat))
    write_clip(tmp_path / "webvid" / "029551_029600" / "1036385494.mp4")
    write_clip(tmp_path / "webvid" / "017851_017900" / "5475386.mp4")
    out = tmp_path / "out" / "videochat.jsonl"
    assert run("video_instruct.py", "--format", "videochat", "--json", str(tmp_path / "videochat_instruct_11k.json"),
               "--videos", str(tmp_path / "webvid"), "--out", str(out)).returncode == 0
    first, second = read_records(out, ["video"], allow_outside_root=True)
    assert first["conversations"][0]["value"] == "<video>\nDescribe the following video in detail."
    assert [t["value"] for t in second["conversations"]] == [
        "<video>\nAnswer the questions about the video. What is the man doing?", "He is fishing.",
        "Where is he?", "On a boat on a lake."]

    # Video-ChatGPT's VideoInstruct100K.json (ActivityNet clips named by video_id).
    videochatgpt = [{"video_id": "v_k_ZXmr8pmrs", "q": "What is happening in the video?",
                     "a": "A man is playing the drums."},
                    {"video_id": "v_missing", "q": "What colour is the car?", "a": "Red."}]
    (tmp_path / "VideoInstruct100K.json").write_text(json.dumps(videochatgpt))
    write_clip(tmp_path / "activitynet" / "v_k_ZXmr8pmrs.mkv")
    out = tmp_path / "out" / "videochatgpt.jsonl"
    args = ["video_instruct.py", "--format", "videochatgpt", "--json", str(tmp_path / "VideoInstruct100K.json"),
            "--videos", str(tmp_path / "activitynet"), "--out", str(out)]
    result = run(*args)
    assert result.returncode != 0 and "item 1 (video_id 'v_missing')" in result.stderr
    result = run(*args, "--skip_missing")
    assert result.returncode == 0 and "1 records, 1 skipped for missing media" in result.stdout
    (record,) = read_records(out, ["video"], allow_outside_root=True)
    assert record["media"]["video"][0].endswith("v_k_ZXmr8pmrs.mkv")
