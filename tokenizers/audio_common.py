"""Input handling shared by every audio tokenizer: dtype, channels, sample rate and sanity checks.

Every ``encode`` funnels its input through :func:`prepare_wave`, so a trained mel tokenizer and an imported
EnCodec accept the same things and refuse the same things with the same messages:

- int16 (scaled by 1/32768) or floating point; other dtypes are refused;
- (T,), (B, T) or (B, C, T); several channels are averaged (downmix);
- any positive integer sample rate; resampled to the codec rate with a polyphase filter (scipy);
- empty input, audio shorter than ``min_samples`` after resampling, NaN or inf -> :class:`AudioInputError`;
- float samples beyond [-1, 1] (clipping upstream, or int audio passed as float) are refused unless they
  are only slightly over (<= ``clip_tolerance``), in which case they are clamped.

Axis legend: B batch, C channels, T samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

import numpy as np
import torch


class AudioInputError(ValueError):
    """Audio that an audio tokenizer cannot encode; the message says what was expected."""


@dataclass
class PreparedWave:
    wave: torch.Tensor  # (B, T) float32 in [-1, 1] at the codec's sample rate
    clamped_samples: int  # how many samples were slightly over full scale and clamped


def resample(wave: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """(..., T) float -> (..., T * new_rate / orig_rate) with scipy's polyphase filter (Kaiser window)."""
    if orig_rate == new_rate:
        return wave
    from scipy.signal import resample_poly

    g = gcd(int(orig_rate), int(new_rate))
    up, down = new_rate // g, orig_rate // g
    out = resample_poly(wave.detach().cpu().double().numpy(), up, down, axis=-1)
    return torch.from_numpy(np.ascontiguousarray(out)).to(device=wave.device, dtype=torch.float32)


def prepare_wave(
    wave: torch.Tensor | np.ndarray,
    sample_rate: int,
    target_rate: int,
    min_samples: int = 1,
    clip_tolerance: float = 1.05,
) -> PreparedWave:
    """Validate and normalise audio for a codec running at ``target_rate`` (see the module docstring)."""
    if isinstance(wave, np.ndarray):
        wave = torch.from_numpy(np.ascontiguousarray(wave))
    if not isinstance(wave, torch.Tensor):
        raise AudioInputError(f"audio must be a torch.Tensor or numpy array, got {type(wave).__name__}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise AudioInputError(f"sample_rate must be a positive integer (Hz), got {sample_rate!r}")
    sample_rate = int(sample_rate)
    if wave.dtype == torch.int16:
        wave = wave.float() / 32768.0
    elif wave.is_floating_point():
        wave = wave.float()
    else:
        raise AudioInputError(f"audio dtype {wave.dtype} is not supported: pass int16 PCM or float in [-1, 1]")
    if wave.ndim == 1:
        wave = wave[None]  # (1, T)
    elif wave.ndim == 3:
        if wave.shape[1] == 0:
            raise AudioInputError(f"audio of shape {tuple(wave.shape)} has no channels")
        wave = wave.mean(dim=1)  # (B, C, T) -> (B, T): downmix
    elif wave.ndim != 2:
        raise AudioInputError(f"audio must be (T,), (B, T) or (B, channels, T); got shape {tuple(wave.shape)}")
    if wave.shape[0] == 0 or wave.shape[-1] == 0:
        raise AudioInputError(f"audio is empty (shape {tuple(wave.shape)})")
    finite = torch.isfinite(wave)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise AudioInputError(
            f"audio contains NaN or inf ({int((~finite).sum())} samples; first at batch {bad[0]}, sample {bad[1]})"
        )
    peak = float(wave.abs().max())
    clamped = 0
    if peak > 1.0:
        if peak > clip_tolerance:
            raise AudioInputError(
                f"float audio peaks at {peak:.3f}, beyond [-1, 1] (tolerance {clip_tolerance}): "
                "normalise it, or pass int16 PCM as int16 rather than float"
            )
        clamped = int((wave.abs() > 1.0).sum())
        wave = wave.clamp(-1.0, 1.0)
    wave = resample(wave, sample_rate, target_rate)
    if wave.shape[-1] < min_samples:
        raise AudioInputError(
            f"audio is too short: {wave.shape[-1]} samples at {target_rate} Hz, the codec needs at least "
            f"{min_samples} ({1000 * min_samples / target_rate:.1f} ms)"
        )
    return PreparedWave(wave=wave.clamp(-1.0, 1.0), clamped_samples=clamped)


def pad_to_multiple(wave: torch.Tensor, multiple: int) -> torch.Tensor:
    """(B, T) -> (B, T') zero-padded at the end so that T' is a multiple of ``multiple``."""
    rem = wave.shape[-1] % multiple
    if rem == 0:
        return wave
    return torch.nn.functional.pad(wave, (0, multiple - rem))


__all__ = ["AudioInputError", "PreparedWave", "resample", "prepare_wave", "pad_to_multiple"]
