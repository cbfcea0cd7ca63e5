"""Offline speech synthesis for the speech demo: eSpeak NG through the `espeakng-loader` wheel (pip only).

The wheel bundles `libespeak-ng` and its voice data but no Python API, so the few C calls are made with
ctypes here (the `espeakng`/`phonemizer` packages either shell out to a system binary or only phonemize).
Synthesis is synchronous: the library calls back with 16-bit PCM chunks at its own rate (22.05 kHz).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

AUDIO_OUTPUT_SYNCHRONOUS = 2
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1
RATE, VOLUME, PITCH, RANGE = 1, 2, 3, 4

_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@dataclass(frozen=True)
class Voice:
    """An eSpeak voice setting: `name` (e.g. `en-us`, `en-gb-x-rp`, with a variant such as `+f2`), words per
    minute, pitch and pitch range (0-100)."""

    name: str = "en-us"
    rate: int = 170
    pitch: int = 50
    range: int = 50

    def __str__(self) -> str:
        return f"{self.name}@{self.rate}wpm/p{self.pitch}/r{self.range}"


class Espeak:
    """`Espeak().say(text, voice) -> (float32 mono waveform in [-1, 1], sample rate)`. One library per process."""

    _lock = threading.Lock()

    def __init__(self) -> None:
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        data_parent = str(Path(espeakng_loader.get_data_path()).parent).encode()
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.sample_rate = self.lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_parent, 0)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate}) with data in {data_parent.decode()}")
        self.chunks: list[np.ndarray] = []

        def collect(wav, count, events):  # noqa: ARG001 - the C signature
            if count > 0:
                self.chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
            return 0

        self._callback = _SynthCallback(collect)  # kept alive: the library holds the pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def say(self, text: str, voice: Voice = Voice()) -> tuple[np.ndarray, int]:
        with self._lock:
            if self.lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
                raise ValueError(f"eSpeak has no voice {voice.name!r}")
            for parameter, value in ((RATE, voice.rate), (PITCH, voice.pitch), (RANGE, voice.range), (VOLUME, 100)):
                self.lib.espeak_SetParameter(parameter, value, 0)
            self.chunks = []
            encoded = text.encode()
            status = self.lib.espeak_Synth(encoded, len(encoded) + 1, 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8, None, None)
            self.lib.espeak_Synchronize()
            if status != 0 or not self.chunks:
                raise RuntimeError(f"eSpeak could not say {text!r} with {voice} (status {status})")
            pcm = np.concatenate(self.chunks)
        return pcm.astype(np.float32) / 32768.0, self.sample_rate
