"""Checks on code tensors before they reach a decoder: a wrong shape or an out-of-range id fails here,
with a message that says what was expected, instead of deep inside an embedding lookup."""

from __future__ import annotations

import torch


def check_image_codes(codes: torch.Tensor, grid: tuple[int, int], codebook_size: int) -> torch.Tensor:
    """(B, h, w) or (h, w) integer codes -> (B, h, w) int64; raises ValueError naming the problem."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"image codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"image codes must be integers, got dtype {codes.dtype}")
    if codes.ndim == 2:
        codes = codes[None]  # (1, h, w)
    if codes.ndim != 3:
        raise ValueError(f"image codes must be (B, h, w) or (h, w), got shape {tuple(codes.shape)}")
    if tuple(codes.shape[1:]) != tuple(grid):
        raise ValueError(
            f"image codes have grid {tuple(codes.shape[1:])}, but the tokenizer's grid is {tuple(grid)} (h, w)"
        )
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= codebook_size:
            bad = int(((codes < 0) | (codes >= codebook_size)).sum())
            raise ValueError(
                f"image codes out of range: {bad} value(s) outside [0, {codebook_size}) (min {lo}, max {hi})"
            )
    return codes.long()


def check_audio_codes(codes: torch.Tensor, num_codebooks: int, codebook_size: int) -> torch.Tensor:
    """(B, Q, F) or (Q, F) integer codes -> (B, Q, F) int64; raises ValueError naming the problem."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"audio codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"audio codes must be integers, got dtype {codes.dtype}")
    if codes.ndim == 2:
        codes = codes[None]  # (1, Q, F)
    if codes.ndim != 3:
        raise ValueError(f"audio codes must be (B, Q, F) or (Q, F), got shape {tuple(codes.shape)}")
    if codes.shape[1] != num_codebooks:
        raise ValueError(f"audio codes have {codes.shape[1]} codebooks (Q), the codec has {num_codebooks}")
    if codes.shape[2] == 0:
        raise ValueError("audio codes have no frames (F == 0)")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= codebook_size:
        bad = int(((codes < 0) | (codes >= codebook_size)).sum())
        raise ValueError(f"audio codes out of range: {bad} value(s) outside [0, {codebook_size}) (min {lo}, max {hi})")
    return codes.long()
