"""Audio decoding: any file PyAV reads -> float32 mono at the encoder's rate -> Whisper log-mel features.

PyAV's bundled FFmpeg reads wav, flac, mp3, ogg/opus, m4a/aac and the audio track of a video; every channel is
averaged to mono and resampled by FFmpeg's resampler, so a stereo 48 kHz file and a mono 8 kHz file both reach the
encoder as what it was trained on (SALMONN reads channel 0 and never resamples).
"""

from __future__ import annotations

import numpy as np
import torch

from xllm.encoders.whisper import log_mel

MEL = "mel"


def decode_audio(path: str, sample_rate: int, min_peak: float = 1e-4) -> np.ndarray:
    """One file's first audio track as float32 mono at `sample_rate`; `ValueError` naming the file if it has no
    audio track, cannot be decoded, is cut short of its declared duration, is empty or is silent."""
    import av

    try:
        container = av.open(path)
    except av.error.FFmpegError as err:
        raise ValueError(f"cannot open audio {path}: {err}") from err
    chunks = []
    with container:
        if not container.streams.audio:
            kinds = ", ".join(s.type for s in container.streams) or "no streams"
            raise ValueError(f"{path} has no audio track ({kinds})")
        stream = container.streams.audio[0]
        rate_in = stream.rate
        # Keep the channels through resampling (planar float), then average them: a plain mean is the downmix
        # (FFmpeg's own stereo->mono matrix scales by 1/sqrt(2) instead).
        resampler = av.AudioResampler(format="fltp", rate=sample_rate)
        try:
            for frame in container.decode(stream):
                chunks += [out.to_ndarray() for out in resampler.resample(frame)]
            chunks += [out.to_ndarray() for out in resampler.resample(None)]
        except av.error.FFmpegError as err:
            raise ValueError(f"cannot decode audio {path}: {err}") from err
        declared = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        if container.format.name == "wav":
            declared = _wav_header_seconds(path)  # FFmpeg clamps a WAV's duration to what the file holds
    wave = np.concatenate(chunks, axis=1).mean(axis=0).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if wave.size == 0:
        raise ValueError(f"{path}: no audio samples (zero-length audio)")
    decoded = wave.size / sample_rate
    if declared is not None and decoded < 0.9 * declared - 0.05:
        raise ValueError(f"{path}: truncated audio: the file declares {declared:.2f} s, only {decoded:.2f} s decode")
    peak = float(np.abs(wave).max())
    if peak < min_peak:
        raise ValueError(f"{path}: silent audio (peak {peak:.1e} < {min_peak:.0e}, decoded from {rate_in} Hz)")
    return wave


def _wav_header_seconds(path: str) -> float | None:
    """The duration a PCM WAV header declares (None for WAV variants the `wave` module does not read)."""
    import wave

    try:
        with wave.open(path, "rb") as header:
            return header.getnframes() / header.getframerate()
    except (wave.Error, EOFError):
        return None


class AudioLoader:
    """Decodes one file and computes its log-mel features: `path -> {"mel": [frames, mel_bins]}` (picklable)."""

    def __init__(self, feature_extractor, min_peak: float = 1e-4) -> None:
        self.feature_extractor, self.min_peak = feature_extractor, min_peak

    def __call__(self, path: str) -> dict[str, torch.Tensor]:
        wave = decode_audio(path, self.feature_extractor.sampling_rate, self.min_peak)
        return {MEL: log_mel(self.feature_extractor, wave)}
