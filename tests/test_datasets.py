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
from xllm.interfaces.speech import decode_audio

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
    records = read_records(out, ["audio"])
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
    assert read_records(out, ["audio"])[1]["media"]["audio"][0].endswith("BAC009S0002W0123.wav")


@pytest.mark.parametrize("script", ["librispeech.py", "aishell.py"])
def test_recipes_explain_themselves(script):
    result = run(script, "--help")
    assert result.returncode == 0 and "--root" in result.stdout
