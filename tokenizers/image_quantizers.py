"""One small typed interface over vector-quantize-pytorch's VectorQuantize, FSQ and LFQ for image latents.

The image tokenizer only ever needs three things from a quantizer: quantize a latent map and say which codes
it picked (plus an auxiliary loss), turn codes back into the latent the decoder reads, and the codebook size.
Each library class has its own return convention (``(q, idx, loss)``, ``(q, idx)``, a named tuple); this file
hides that behind :class:`ImageQuantizer` so the model file never branches on the quantizer kind.

Axis legend: B batch, D latent channels, h/w code grid, N = h*w positions, K codebook size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange
from torch import nn


@dataclass(frozen=True)
class QuantizerConfig:
    kind: Literal["vq", "fsq", "lfq"] = "vq"
    codebook_size: int = 1024  # vq and lfq (a power of two for lfq); fsq derives it from fsq_levels
    # vq: ViT-VQGAN-style factorized lookup: project the latent to this many dims (l2-normalised when
    # cosine) before the nearest-neighbour search; low dims keep every code in use.
    codebook_dim: int = 8
    cosine: bool = True  # vq: l2-normalised codes and inputs (cosine similarity lookup)
    ema: bool = True  # vq: codebook follows an exponential moving average of its assignments; False: learned
    decay: float = 0.8  # vq: EMA decay
    kmeans_init: bool = True  # vq: initialise the codebook with k-means on the first batch
    dead_code_threshold: float = 2.0  # vq: codes whose EMA cluster size drops below this are re-seeded; 0: off
    commitment_weight: float = 0.25  # vq and lfq: pulls encoder outputs towards their codes
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)  # fsq: levels per latent dim; codebook = product
    lfq_entropy_weight: float = 0.1  # lfq: entropy aux loss (per-sample confident, batch diverse)

    def __post_init__(self) -> None:
        if self.kind in ("vq", "lfq") and self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.kind == "lfq" and self.codebook_size & (self.codebook_size - 1):
            raise ValueError(f"lfq needs a power-of-two codebook_size, got {self.codebook_size}")
        if self.kind == "fsq" and (not self.fsq_levels or min(self.fsq_levels) < 2):
            raise ValueError(f"fsq_levels must be a non-empty list of ints >= 2, got {list(self.fsq_levels)}")
        if self.codebook_dim <= 0:
            raise ValueError(f"codebook_dim must be > 0, got {self.codebook_dim}")
        if not 0 < self.decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {self.decay}")

    @property
    def size(self) -> int:
        """The number of distinct codes K."""
        return math.prod(self.fsq_levels) if self.kind == "fsq" else self.codebook_size


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, D, h, w): what the decoder reads (straight-through gradients)
    codes: torch.Tensor  # (B, h, w) int64 in [0, K)
    loss: torch.Tensor  # scalar auxiliary loss (commitment / entropy); 0 for fsq
    # fsq only: (B, C, h, w) each cell's rounded level per FSQ dimension, scaled to [-1, 1], carrying the
    # straight-through gradient to the encoder (what a penalty on code changes between cells acts on); else None
    levels: torch.Tensor | None = None


class ImageQuantizer(nn.Module):
    """Quantizes a latent map ``(B, D, h, w)``; ``dequantize(codes)`` is the exact inverse lookup."""

    def __init__(self, dim: int, cfg: QuantizerConfig):
        super().__init__()
        self.cfg = cfg
        self.dim = dim
        self.codebook_size = cfg.size
        self._levels: torch.Tensor | None = None
        if cfg.kind == "vq":
            from vector_quantize_pytorch import VectorQuantize

            self.impl = VectorQuantize(
                dim=dim,
                codebook_size=cfg.codebook_size,
                codebook_dim=cfg.codebook_dim,
                use_cosine_sim=cfg.cosine,
                kmeans_init=cfg.kmeans_init,
                decay=cfg.decay,
                ema_update=cfg.ema,
                learnable_codebook=not cfg.ema,
                threshold_ema_dead_code=cfg.dead_code_threshold,
                commitment_weight=cfg.commitment_weight,
                rotation_trick=True,
            )
        elif cfg.kind == "fsq":
            from vector_quantize_pytorch import FSQ

            self.impl = FSQ(levels=list(cfg.fsq_levels), dim=dim)
            # FSQ hands its rounded levels (B, N, C) to project_out; keep them for ``QuantizerOutput.levels``
            self.impl.project_out.register_forward_pre_hook(self._keep_levels)
        else:
            from vector_quantize_pytorch import LFQ

            self.impl = LFQ(
                dim=dim,
                codebook_size=cfg.codebook_size,
                entropy_loss_weight=cfg.lfq_entropy_weight,
                commitment_loss_weight=cfg.commitment_weight,
            )

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, _, h, w = z.shape
        x = rearrange(z, "b d h w -> b (h w) d")  # (B, N, D): every library here accepts this layout
        if self.cfg.kind == "vq":
            q, idx, loss = self.impl(x)
        elif self.cfg.kind == "fsq":
            q, idx = self.impl(x)
            loss = x.new_zeros(())
        else:
            q, idx, loss = self.impl(x)
        levels, self._levels = self._levels, None  # fsq: just written by the pre-hook; vq / lfq: always None
        if levels is not None:
            levels = rearrange(levels, "b (h w) c -> b c h w", h=h, w=w)
        q = rearrange(q, "b (h w) d -> b d h w", h=h, w=w)
        codes = rearrange(idx.long(), "b (h w) -> b h w", h=h, w=w)
        return QuantizerOutput(quantized=q, codes=codes, loss=loss.sum() if loss.ndim else loss, levels=levels)

    def from_levels(self, levels: torch.Tensor) -> torch.Tensor:
        """fsq: (B, C, h, w) levels (``QuantizerOutput.levels``) -> the latent (B, D, h, w) the decoder reads."""
        _, _, h, w = levels.shape
        q = self.impl.project_out(rearrange(levels, "b c h w -> b (h w) c"))
        self._levels = None  # the pre-hook fired for this call: not a forward's levels
        return rearrange(q, "b (h w) d -> b d h w", h=h, w=w)

    def _keep_levels(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._levels = args[0]

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) int64 -> latent (B, D, h, w), the same values ``forward`` hands the decoder."""
        if codes.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got values in [{lo}, {hi}]")
        _, h, w = codes.shape
        idx = rearrange(codes, "b h w -> b (h w)")  # (B, N)
        if self.cfg.kind == "vq":
            q = self.impl.get_output_from_indices(idx)
        else:
            q = self.impl.indices_to_codes(idx)
        return rearrange(q, "b (h w) d -> b d h w", h=h, w=w)
