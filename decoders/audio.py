"""Audio codes -> waveforms through the codec's decoder, and WAV files.

Batched codes may be padded: with ``lengths`` (valid frames per item, as in :class:`AudioCodes`) each wave is
cut to the samples those frames cover, so padding never ends up in a file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf
import torch

from anyloom.decoders.codes import check_audio_codes
from anyloom.tokenizers.base import AudioCodes, AudioTokenizer


class DecodedAudio(NamedTuple):
    """Named, and also unpackable as ``waves, sample_rate = decode_audio_codes(...)``."""

    waves: list[np.ndarray]  # B arrays (T_i,) float32 mono
    sample_rate: int


@torch.no_grad()
def decode_audio_codes(
    tokenizer: AudioTokenizer, codes: torch.Tensor | AudioCodes, lengths: torch.Tensor | None = None
) -> DecodedAudio:
    """codes (B, Q, F) or (Q, F) -> one float32 wave per item at ``tokenizer.sample_rate``.

    ``lengths`` (B,) are valid frames per item; when ``codes`` is an :class:`AudioCodes` its own lengths are
    used unless ``lengths`` is given.
    """
    if isinstance(codes, AudioCodes):
        lengths = codes.lengths if lengths is None else lengths
        codes = codes.codes
    codes = check_audio_codes(codes, int(tokenizer.num_codebooks), int(tokenizer.codebook_size))
    b, _, f = codes.shape
    if lengths is not None:
        lengths = torch.as_tensor(lengths).reshape(-1)
        if lengths.numel() != b:
            raise ValueError(f"lengths has {lengths.numel()} entries for a batch of {b}")
        if int(lengths.min()) < 1 or int(lengths.max()) > f:
            raise ValueError(f"lengths must be in [1, {f}] frames, got {lengths.tolist()}")
    wave = tokenizer.decode(codes)  # (B, T)
    if wave.ndim == 3 and wave.shape[1] == 1:
        wave = wave[:, 0]  # (B, T): a codec that keeps a channel axis
    if wave.ndim != 2 or wave.shape[0] != b:
        raise ValueError(f"{type(tokenizer).__name__}.decode returned shape {tuple(wave.shape)}, expected ({b}, T)")
    wave = wave.detach().float().cpu().numpy()
    samples_per_frame = wave.shape[1] / f
    waves = []
    for i in range(b):
        n = wave.shape[1] if lengths is None else min(wave.shape[1], math.ceil(int(lengths[i]) * samples_per_frame))
        waves.append(np.ascontiguousarray(wave[i, :n], dtype=np.float32))
    return DecodedAudio(waves=waves, sample_rate=int(tokenizer.sample_rate))


def write_wav(path: str | Path, wave: np.ndarray | torch.Tensor, sample_rate: int) -> Path:
    """Write a mono wave (T,) float in [-1, 1] as 16-bit PCM WAV; values outside [-1, 1] are clipped."""
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().float().cpu().numpy()
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"{path}: expected a mono wave (T,), got shape {wave.shape}")
    if not np.isfinite(wave).all():
        raise ValueError(f"{path}: the wave contains NaN or inf")
    if sample_rate <= 0:
        raise ValueError(f"{path}: sample_rate must be > 0, got {sample_rate}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(wave, -1.0, 1.0), int(sample_rate), subtype="PCM_16")
    return path


__all__ = ["DecodedAudio", "decode_audio_codes", "write_wav"]
