"""Image codes -> PIL images: through the tokenizer's own VQ decoder, or through the diffusion decoder.

Both have the signature ``(tokenizer, codes) -> list[PIL.Image]`` (:class:`ImageCodeDecoder`), so generation
and evaluation pick one without knowing which: ``decode_image_codes`` is the plain VQ path, and a
:class:`DiffusionImageDecoder` instance (holding its trained model, DDIM steps and seed) is the other.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from anyloom.decoders.codes import check_image_codes
from anyloom.decoders.diffusion import DiffusionDecoder
from anyloom.tokenizers.base import ImageCodes, ImageTokenizer


class ImageCodeDecoder(Protocol):
    def __call__(self, tokenizer: ImageTokenizer, codes: torch.Tensor | ImageCodes) -> list[Image.Image]: ...


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) float in [-1, 1] -> RGB PIL images (values outside [-1, 1] are clipped)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = rearrange(pixels, "b c h w -> b h w c").numpy()
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


def _checked(tokenizer: ImageTokenizer, codes: torch.Tensor | ImageCodes) -> torch.Tensor:
    if isinstance(codes, ImageCodes):
        codes = codes.codes
    return check_image_codes(codes, tuple(tokenizer.grid), int(tokenizer.codebook_size))


@torch.no_grad()
def decode_image_codes(tokenizer: ImageTokenizer, codes: torch.Tensor | ImageCodes) -> list[Image.Image]:
    """The tokenizer's VQ decoder. codes (B, h, w) or (h, w) -> B RGB images of tokenizer.image_size."""
    return to_pil(tokenizer.decode(_checked(tokenizer, codes)))


class DiffusionImageDecoder:
    """``(tokenizer, codes) -> images`` through a trained :class:`DiffusionDecoder` (DDIM, fixed seed).

    The same codes and seed give the same images; pass a different ``seed`` for another sample.
    """

    def __init__(self, model: DiffusionDecoder, steps: int | None = None, seed: int = 0):
        self.model = model.eval()
        self.steps = steps
        self.seed = seed

    @torch.no_grad()
    def decode_tensor(self, tokenizer: ImageTokenizer, codes: torch.Tensor | ImageCodes) -> torch.Tensor:
        """Like ``__call__`` but returns (B, 3, H, W) floats in [-1, 1] (for metrics)."""
        codes = _checked(tokenizer, codes)
        if tuple(tokenizer.image_size) != tuple(self.model.cfg.image_size):
            raise ValueError(
                f"the tokenizer makes {tuple(tokenizer.image_size)} images but the diffusion decoder was built "
                f"for {tuple(self.model.cfg.image_size)}"
            )
        device = next(self.model.parameters()).device
        cond = tokenizer.decode(codes).to(device=device, dtype=torch.float32)  # (B, 3, H, W)
        generator = torch.Generator().manual_seed(self.seed)
        return self.model.sample(cond, steps=self.steps, generator=generator)

    def __call__(self, tokenizer: ImageTokenizer, codes: torch.Tensor | ImageCodes) -> list[Image.Image]:
        return to_pil(self.decode_tensor(tokenizer, codes))


__all__ = ["ImageCodeDecoder", "decode_image_codes", "DiffusionImageDecoder", "to_pil"]
