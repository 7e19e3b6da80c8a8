"""The contracts every tokenizer kind honours (cf. audiocraft's ``CompressionModel``).

Downstream code (pre-tokenization, generation, evaluation, decoders) is written against these, never
against a concrete class, so a trained world tokenizer and an imported pretrained one are interchangeable.

Axis legend: B batch, C channels (3, RGB), H/W image height/width, h/w code grid, T samples,
Q codebooks (residual levels), F frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from anyloom.progress import progress


class DecoderUnavailableError(RuntimeError):
    """A tokenizer that can encode but has no decoder weights (an imported encoder-only port); the message says
    where the decoder comes from."""


@dataclass
class ImageCodes:
    codes: torch.Tensor  # (B, h, w) int64 in [0, codebook_size)


@dataclass
class AudioCodes:
    codes: torch.Tensor  # (B, Q, F) int64, each level in [0, codebook_size)
    lengths: torch.Tensor | None = None  # (B,) valid frames per item when a batch was padded


@runtime_checkable
class ImageTokenizer(Protocol):
    codebook_size: int
    grid: tuple[int, int]  # (h, w) codes per image
    image_size: tuple[int, int]  # (H, W) pixels the tokenizer expects

    @property
    def tokens_per_image(self) -> int: ...

    def encode(self, images: torch.Tensor) -> ImageCodes:
        """images (B, 3, H, W) float in [-1, 1] -> codes (B, h, w)."""
        ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> images (B, 3, H, W) float in [-1, 1]."""
        ...


@runtime_checkable
class AudioTokenizer(Protocol):
    sample_rate: int  # the codec's own rate; encode resamples other rates to it
    frame_rate: float  # frames per second of audio
    num_codebooks: int  # Q
    codebook_size: int

    def encode(self, wave: torch.Tensor, sample_rate: int) -> AudioCodes:
        """wave (B, T) or (B, channels, T), float in [-1, 1] or int16 -> codes (B, Q, F)."""
        ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, Q, F) -> wave (B, T) float at ``sample_rate``."""
        ...


@dataclass
class Reconstructions:
    images: torch.Tensor  # (N, 3, H, W) float in [-1, 1] on the CPU: decode(encode(x))
    codes: torch.Tensor  # (N, h, w) int64 on the CPU: the codes they were decoded from


@torch.no_grad()
def reconstruct(tokenizer: ImageTokenizer, images: torch.Tensor, batch_size: int = 256, desc: str = ""
                ) -> Reconstructions:
    """decode(encode(x)) of (N, 3, H, W) ``images`` in [-1, 1], ``batch_size`` at a time (a progress bar named
    ``desc``). A torch tokenizer runs in eval mode on its own device (an EMA codebook in training mode would update
    itself on every encode) and is left in the mode it was in."""
    module = tokenizer if isinstance(tokenizer, torch.nn.Module) else None
    was_training = module is not None and module.training
    param = next(module.parameters(), None) if module is not None else None
    device = param.device if param is not None else images.device
    if module is not None:
        module.eval()
    recons, codes = [], []
    try:
        for i in progress(range(0, len(images), batch_size), desc=desc):
            c = tokenizer.encode(images[i : i + batch_size].to(device)).codes
            recons.append(tokenizer.decode(c).float().cpu())
            codes.append(c.cpu())
    finally:
        if module is not None:
            module.train(was_training)
    return Reconstructions(images=torch.cat(recons), codes=torch.cat(codes))
