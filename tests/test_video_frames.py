"""PyAV decoding: the right frames at the requested moments (constant and variable frame rate), seeking instead
of a full pass (counted), every container the README names, and each kind of bad file."""

from __future__ import annotations

import random

import av
import numpy as np
import pytest

from xllm.demo.video_files import write_empty_video, write_video
from xllm.encoders.video_frames import read_frames, sample_times

BANDS, BAND = 8, 20  # frame i shows bit b of i as a white (1) or black (0) vertical band b


def indexed_frame(index: int, width: int = BANDS * BAND, height: int = 96) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    for bit in range(BANDS):
        if index >> bit & 1:
            image[:, bit * BAND * width // (BANDS * BAND):(bit + 1) * BAND * width // (BANDS * BAND)] = 255
    return image


def frame_index(image: np.ndarray) -> int:
    """The index a decoded frame shows (read from the middle of each band, any width)."""
    width = image.shape[1]
    return sum(int(image[:, (2 * bit + 1) * width // (2 * BANDS)].mean() > 128) << bit for bit in range(BANDS))


def shown_at(times: list[float], moment: float) -> int:
    """The index of the frame on screen at `moment`: the last one presented at or before it."""
    return max(i for i, t in enumerate(times) if t <= moment + 1e-6)


def test_uniform_moments_give_the_frames_shown_then_at_a_constant_frame_rate(tmp_path):
    path = str(tmp_path / "cfr.mp4")
    write_video(path, [indexed_frame(i) for i in range(100)], fps=25)  # 4 s
    sampled = read_frames(path, num_frames=8, short_side=None)
    moments = sample_times(4.0, 8)
    assert moments == pytest.approx([0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.25, 3.75])
    assert [frame_index(f) for f in sampled.frames] == [int(m * 25) for m in moments] == [6, 18, 31, 43, 56, 68, 81, 93]
    assert sampled.times == pytest.approx([i / 25 for i in [6, 18, 31, 43, 56, 68, 81, 93]])


def test_a_variable_frame_rate_is_followed_by_presentation_timestamps(tmp_path):
    rng = random.Random(0)
    times = [0.0]
    for _ in range(99):
        times.append(times[-1] + rng.choice([0.02, 0.04, 0.08, 0.12]))
    path = str(tmp_path / "vfr.mkv")
    write_video(path, [indexed_frame(i) for i in range(100)], times=times)
    sampled = read_frames(path, num_frames=8, mode="fps", fps=2.0, short_side=None)
    expected = [shown_at(times, (k + 0.5) / 2.0) for k in range(8)]
    assert [frame_index(f) for f in sampled.frames] == expected
    assert expected != [int((k + 0.5) / 2.0 * 25) for k in range(8)]  # a constant-rate guess would be wrong here
    uniform = read_frames(path, num_frames=6, short_side=None)
    assert [frame_index(f) for f in uniform.frames] == sorted({frame_index(f) for f in uniform.frames})


def test_seeking_decodes_far_fewer_frames_than_a_full_pass(tmp_path):
    path = str(tmp_path / "long.mp4")
    write_video(path, [indexed_frame(i % 256) for i in range(300)], fps=25, gop=12)  # 12 s
    sampled = read_frames(path, num_frames=8, short_side=None)
    assert [frame_index(f) for f in sampled.frames] == [int((k + 0.5) * 12 / 8 * 25) % 256 for k in range(8)]
    with av.open(path) as container:
        full_pass = sum(1 for _ in container.decode(video=0))
    assert full_pass == 300
    assert sampled.decoded < full_pass / 3, sampled.decoded


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mkv", ".avi", ".mov"])
def test_every_named_container_decodes(tmp_path, suffix):
    path = str(tmp_path / f"clip{suffix}")
    write_video(path, [indexed_frame(i) for i in range(40)], fps=10)
    sampled = read_frames(path, num_frames=4, short_side=None)
    assert [frame_index(f) for f in sampled.frames] == [5, 15, 25, 35]


def test_headtail_sampling_draws_half_from_each_half_in_order():
    moments = sample_times(10.0, 8, "headtail", rng=random.Random(3))
    assert moments == sorted(moments) and len(moments) == 8
    assert all(t < 5 for t in moments[:4]) and all(t >= 5 for t in moments[4:])
    assert moments != sample_times(10.0, 8, "headtail", rng=random.Random(4))


def test_short_clips_give_each_frame_once_and_a_one_frame_clip_works(tmp_path):
    three = str(tmp_path / "three.mp4")
    write_video(three, [indexed_frame(i) for i in range(3)], fps=25)
    assert [frame_index(f) for f in read_frames(three, num_frames=8, short_side=None).frames] == [0, 1, 2]
    one = str(tmp_path / "one.mp4")
    write_video(one, [indexed_frame(5)], fps=25)
    sampled = read_frames(one, num_frames=8, short_side=None)
    assert sampled.frames.shape[0] == 1 and frame_index(sampled.frames[0]) == 5


def test_a_huge_frame_is_scaled_to_the_target_size(tmp_path):
    path = str(tmp_path / "huge.mkv")
    write_video(path, [indexed_frame(i, 3840, 2160) for i in range(2)], fps=2)
    sampled = read_frames(path, num_frames=2, short_side=224)
    assert sampled.frames.shape == (2, 224, 398, 3)
    assert [frame_index(f) for f in sampled.frames] == [0, 1]


def test_bad_files_raise_errors_that_name_them(tmp_path):
    for name in ("empty.mp4", "empty.mkv"):  # 0 frames (mp4 then lists no stream at all)
        write_empty_video(str(tmp_path / name))
        with pytest.raises(ValueError, match=name):
            read_frames(str(tmp_path / name))

    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
    with pytest.raises(ValueError, match="cannot read video .*corrupt.mp4"):
        read_frames(str(corrupt))

    whole = tmp_path / "whole.mp4"
    write_video(str(whole), [indexed_frame(i) for i in range(50)], fps=25)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.mp4"):
        read_frames(str(truncated))

    audio = str(tmp_path / "speech.mp4")
    with av.open(audio, "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(ValueError, match="speech.mp4: no video stream"):
        read_frames(audio)

    with pytest.raises(ValueError, match="notes.txt: not a video file name"):
        read_frames(str(tmp_path / "notes.txt"))
    picture = tmp_path / "picture.mp4"
    from PIL import Image

    Image.fromarray(indexed_frame(3)).save(picture, format="PNG")
    with pytest.raises(ValueError, match="picture.mp4: an image"):
        read_frames(str(picture))
    with pytest.raises(FileNotFoundError):
        read_frames(str(tmp_path / "missing.mp4"))
