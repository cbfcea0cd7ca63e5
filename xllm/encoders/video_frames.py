"""Sampled video frames, decoded with PyAV (FFmpeg bundled in its wheel: no decord, no OpenCV, no system ffmpeg).

`sample_times` picks N moments of a clip — `uniform` (the centre of each of N equal segments: evaluation),
`fps` (every 1/fps seconds, at most N), or `headtail` (Video-LLaMA's training sampling: N/2 random moments in
each half, sorted) — and `read_frames` decodes the frame shown at each moment: the last frame whose
presentation timestamp is at or before it, so a variable frame rate is handled by the timestamps themselves.
It seeks to the keyframe before a moment that is far ahead instead of decoding the clip front to back
(`SampledFrames.decoded` counts what the decoder produced), and scales each frame to the target size as it is
converted, so a huge video never becomes a full-size array.

A clip with fewer distinct frames than asked gives fewer frames (each distinct frame once, in time order); the
batch pads them and its `lengths` mask the padding (`xllm.interfaces.video`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

import av
import numpy as np
import torch

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".webm", ".mkv", ".avi", ".mov")
SamplingMode = Literal["uniform", "fps", "headtail"]
# Seek when the next moment is this far past the last decoded frame; nearer ones are decoded onwards (a seek
# restarts at a keyframe, which usually lies within a second or two before the moment).
SEEK_AHEAD_SECONDS = 0.5


@dataclass
class SampledFrames:
    """`frames [n, height, width, 3]` uint8 RGB (n <= the number asked: distinct frames only), their
    presentation `times` in seconds from the clip's start, and how many frames the decoder produced for them."""

    frames: np.ndarray
    times: list[float]
    decoded: int


def sample_times(
    duration: float, num_frames: int, mode: SamplingMode = "uniform", fps: float | None = None,
    rng: random.Random | None = None,
) -> list[float]:
    """Moments (seconds from the start, ascending) at which to take frames of a clip `duration` seconds long."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if mode == "uniform":
        return [(k + 0.5) * duration / num_frames for k in range(num_frames)]
    if mode == "fps":
        if not fps or fps <= 0:
            raise ValueError("sampling mode 'fps' needs fps > 0")
        count = max(1, min(num_frames, int(duration * fps)))
        return [(k + 0.5) / fps for k in range(count)]
    if mode == "headtail":
        rng = rng or random.Random()
        head = sorted(rng.uniform(0, duration / 2) for _ in range(num_frames // 2))
        tail = sorted(rng.uniform(duration / 2, duration) for _ in range(num_frames - num_frames // 2))
        return head + tail
    raise ValueError(f"sampling mode must be uniform, fps or headtail, got {mode!r}")


def _scaled_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    if short_side is None:
        return width, height
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def read_frames(
    path: str, num_frames: int = 8, mode: SamplingMode = "uniform", fps: float | None = None,
    short_side: int | None = 256, rng: random.Random | None = None,
) -> SampledFrames:
    """Decode the frames of `path` at `sample_times(...)`, scaled so their shorter side is `short_side`.

    Raises `ValueError` naming the file for a wrong extension, a file FFmpeg cannot read, no video stream
    (an audio-only file) or no decodable frame; `FileNotFoundError` for a missing file."""
    if not path.lower().endswith(VIDEO_EXTENSIONS):
        raise ValueError(f"{path}: not a video file name (expected one of {', '.join(VIDEO_EXTENSIONS)})")
    try:
        container = av.open(path)
    except FileNotFoundError:
        raise
    except (av.error.FFmpegError, OSError) as err:
        raise ValueError(f"cannot read video {path}: {err}") from err
    with container:
        if not container.streams.video:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise ValueError(f"{path}: no video stream (streams: {kinds})")
        if container.format.name in ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "gif"):
            raise ValueError(f"{path}: an image ({container.format.name}), not a video")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            return _read(container, stream, path, num_frames, mode, fps, short_side, rng)
        except av.error.FFmpegError as err:
            raise ValueError(f"cannot decode video {path}: {err}") from err


def _duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _read(container, stream, path, num_frames, mode, fps, short_side, rng) -> SampledFrames:
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    duration = _duration(container, stream)
    decoded = 0
    kept: list[tuple[int, float, np.ndarray]] = []  # (pts, seconds, scaled RGB) of each distinct chosen frame

    def frames_from(seconds: float | None):
        """Frames in presentation order from the keyframe at or before `seconds` (None: from the start)."""
        nonlocal decoded
        if seconds is not None:
            container.seek(int(seconds / stream.time_base), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.time is None:
                continue  # no timestamp: cannot be placed in time (FFmpeg gives one to every displayable frame)
            decoded += 1
            yield frame

    def keep(frame) -> None:
        """Scale a chosen frame at once (a full-size frame is never held beyond this), each frame once."""
        if kept and kept[-1][0] == frame.pts:
            return
        width, height = _scaled_size(frame.width, frame.height, short_side)
        kept.append((frame.pts, frame.time - start, frame.reformat(width=width, height=height,
                                                                   format="rgb24").to_ndarray()))

    if duration is None or duration <= 0:  # no duration in the headers: one pass, keeping only timestamps
        times = [frame.time for frame in frames_from(None)]
        if not times:
            raise ValueError(f"{path}: no decodable video frames")
        duration = max(times) - start + 1e-3
    moments = [start + t for t in sample_times(duration, num_frames, mode, fps, rng)]
    frames, shown, ahead = None, None, None
    for moment in moments:
        if frames is None or (shown is not None and moment - shown.time > SEEK_AHEAD_SECONDS):
            if frames is not None:
                frames.close()
            frames, shown, ahead = frames_from(moment), None, None
        while True:
            frame = ahead if ahead is not None else next(frames, None)
            ahead = None
            if frame is None:
                break  # past the last frame: the last one shown stays on screen
            if frame.time <= moment + 1e-6:
                shown = frame
                continue
            ahead = frame  # the first frame after this moment: the next moment may need it
            shown = shown if shown is not None else frame  # a moment before the first frame
            break
        if shown is not None:
            keep(shown)
    if frames is not None:
        frames.close()
    if not kept:
        raise ValueError(f"{path}: no decodable video frames")
    return SampledFrames(np.stack([array for _, _, array in kept]), [t for _, t, _ in kept], decoded)


class VideoLoader:
    """`path -> {"pixel_values": [frames, 3, H, W]}`: sampled frames through the encoder's image processor
    (small, so data workers get a cheap copy)."""

    def __init__(self, processor, num_frames: int, sampling: SamplingMode, fps: float | None, short_side: int | None,
                 seed: int | None = None) -> None:
        self.processor, self.num_frames, self.sampling, self.fps, self.short_side = (
            processor, num_frames, sampling, fps, short_side)
        self.rng = random.Random(seed)

    def __call__(self, path: str) -> dict[str, torch.Tensor]:
        sampled = read_frames(path, self.num_frames, self.sampling, self.fps, self.short_side, self.rng)
        pixels = self.processor(images=list(sampled.frames), return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels}
