"""Speech of captions with espeak-ng, in process (PyPI ``espeakng-loader`` + ctypes), at 16 kHz.

espeak-ng is GPL-3 and is used here as a tool that generates data; it is loaded from the installed
package, never vendored. The library keeps global state (one voice, one callback), so one process owns
one ``Espeak`` (``get_espeak()``), and each call sets voice, rate and pitch before synthesising.

Determinism: besides its random noise (seeded per call), espeak-ng carries hidden state from one utterance
to the next (oscillator phases and the like) that ``espeak_Terminate`` does not clear. ``reset()`` unloads
and reloads the shared library, which restores every static; the world resets at the start of each fixed
block of items, so the bytes depend only on the seed and the item's place, never on earlier runs.
"""

from __future__ import annotations

import ctypes
import io
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import firwin, resample_poly

SAMPLE_RATE = 16000  # every waveform the world writes
ESPEAK_RATE = 22050  # what espeak-ng produces

# espeak_lib.h constants (stable C ABI).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH = 1, 2, 3
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

TARGET_RMS = 0.1  # -20 dBFS: every utterance gets the same loudness
PEAK_LIMIT = 0.99


@dataclass(frozen=True)
class Voice:
    name: str  # espeak-ng voice, e.g. "en-us" or "en-us+f2" (variant after '+')
    rate: int  # words per minute (espeak default 175)
    pitch: int  # 0..100 (espeak default 50)


class Espeak:
    """espeak-ng loaded in this process; ``synthesize`` returns float32 mono at 22,050 Hz."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as e:  # a clear message instead of a traceback deep inside the world builder
            raise RuntimeError("speech needs the PyPI package 'espeakng-loader' (pip install espeakng-loader)") from e
        self._path = str(espeakng_loader.get_library_path())
        self._data = str(espeakng_loader.get_data_path()).encode()
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # keep a reference: ctypes does not
        self._load()

    def _load(self) -> None:
        self._lib = ctypes.CDLL(self._path)
        data = self._data
        rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, ctypes.c_char_p(data), 0)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (returned {rate}) with data path {data.decode()}")
        if rate != ESPEAK_RATE:
            raise RuntimeError(f"espeak-ng produces {rate} Hz, expected {ESPEAK_RATE}")
        self._lib.espeak_SetSynthCallback(self._callback)
        self._lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]

    def reset(self) -> None:
        """Unload and reload libespeak-ng so that the next utterance starts from a fresh library state."""
        import _ctypes

        self._lib.espeak_Terminate()
        _ctypes.dlclose(self._lib._handle)
        maps = Path("/proc/self/maps")
        if maps.is_file() and os.path.realpath(self._path) in maps.read_text():
            # Someone else in this process holds the library open, so its statics survive the reload.
            raise RuntimeError(f"cannot reset espeak-ng: {self._path} is still loaded by another user in this "
                               "process; speech would not be reproducible")
        self._load()

    def _collect(self, wav: ctypes._Pointer, n: int, events: int) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue synthesis

    def synthesize(self, text: str, voice: Voice, seed: int = 0) -> np.ndarray:
        if self._lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice.name!r}")
        self._lib.espeak_SetParameter(_PARAM_RATE, int(voice.rate), 0)
        self._lib.espeak_SetParameter(_PARAM_PITCH, int(voice.pitch), 0)
        self._lib.espeak_SetParameter(_PARAM_VOLUME, 100, 0)
        self._chunks = []
        # espeak-ng adds random noise (breath, frication): a fixed seed per call makes the bytes reproducible.
        self._lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
        blob = text.encode("utf-8") + b"\0"
        err = self._lib.espeak_Synth(blob, len(blob), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed with error {err} for {text!r}")
        self._lib.espeak_Synchronize()
        if not self._chunks:
            raise RuntimeError(f"espeak-ng produced no audio for {text!r} with {voice}")
        return np.concatenate(self._chunks).astype(np.float32) / 32768.0


_ESPEAK: Espeak | None = None


def get_espeak() -> Espeak:
    global _ESPEAK
    if _ESPEAK is None:
        _ESPEAK = Espeak()
    return _ESPEAK


def normalize_level(wave: np.ndarray) -> np.ndarray:
    """Scale to TARGET_RMS over the voiced part (|x| above 1% of peak), then limit the peak."""
    peak = float(np.max(np.abs(wave))) if wave.size else 0.0
    if peak == 0.0:
        raise ValueError("cannot level-normalise silence")
    voiced = wave[np.abs(wave) > 0.01 * peak]
    gain = TARGET_RMS / float(np.sqrt(np.mean(voiced.astype(np.float64) ** 2)))
    gain = min(gain, PEAK_LIMIT / peak)
    return (wave * gain).astype(np.float32)


@lru_cache(maxsize=1)
def _resample_filter() -> np.ndarray:
    """resample_poly's own default low-pass for 320/441 (Kaiser, beta 5), designed once instead of per call."""
    return firwin(2 * 10 * 441 + 1, 1.0 / 441, window=("kaiser", 5.0))


def postprocess(wave: np.ndarray) -> np.ndarray:
    """espeak-ng output (22,050 Hz) -> float32 at SAMPLE_RATE, level-normalised."""
    wave = resample_poly(wave, 320, 441, window=_resample_filter()).astype(np.float32)  # 22,050 -> 16,000 Hz
    return normalize_level(wave)


def wav_bytes(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """int16 PCM WAV, encoded in memory (soundfile's per-file flush to disk costs more than the synthesis)."""
    buf = io.BytesIO()
    sf.write(buf, wave, sample_rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def speak(text: str, voice: Voice, seed: int = 0) -> np.ndarray:
    """The caption spoken by ``voice``: float32 mono at SAMPLE_RATE, level-normalised.

    Reproducible only right after ``get_espeak().reset()`` (see the module docstring).
    """
    return postprocess(get_espeak().synthesize(text, voice, seed))


__all__ = ["SAMPLE_RATE", "Voice", "Espeak", "get_espeak", "speak", "postprocess", "normalize_level", "wav_bytes"]
