"""Writing video files with PyAV (for the video demo's generated clips and the decoding tests).

Any container PyAV's bundled FFmpeg writes: mp4/mov/mkv with H.264, webm with VP9, avi with MPEG-4 Part 2.
Frames carry explicit presentation times, so a clip can have a variable frame rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np

CODECS = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9", ".avi": "mpeg4"}


def write_video(
    path: str, frames: Sequence[np.ndarray], fps: float = 25.0, times: Sequence[float] | None = None,
    gop: int = 12, codec: str | None = None,
) -> None:
    """Write RGB `frames` (`[height, width, 3]` uint8, even sizes) to `path`, at `fps` or at explicit `times`
    (seconds, ascending: a variable frame rate); a keyframe every `gop` frames."""
    if not frames:
        raise ValueError("a video needs at least one frame (see write_empty_video for a file with none)")
    suffix = path[path.rfind("."):].lower()
    codec = codec or CODECS.get(suffix)
    if codec is None:
        raise ValueError(f"no default codec for {suffix!r}; pass codec=")
    times = list(times) if times is not None else [i / fps for i in range(len(frames))]
    height, width = frames[0].shape[:2]
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)  # millisecond timestamps carry any frame rate
        stream.codec_context.gop_size = gop
        for image, seconds in zip(frames, times):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base = round(seconds * 1000), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def write_empty_video(path: str, width: int = 64, height: int = 64) -> None:
    """A container with a video stream and no frames (a broken recording)."""
    with av.open(path, "w") as container:
        stream = container.add_stream(CODECS.get(path[path.rfind("."):].lower(), "libx264"), rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        container.start_encoding()  # the header is written, no frame ever follows
