"""The world's per-pixel loss weights for the image tokenizer (plug-ins of group ``anyloom.pixel_weights``).

The world's objects nearly touch: two objects 1-2 px apart, or a thin tip, merge when a reconstruction blurs or
bleeds colour into the gap, and the world's judge then reads one object where there were two. These maps mark
those pixels so that the reconstruction loss weighs them more; the world recipe names them::

    image_tokenizer:
      pixel_weights: [{name: world_gaps, weight: 8.0}]   # radius, threshold: GapWeights.Options

Each plug-in is built with its typed ``Options`` and called with the target batch (B, C, H, W) in [-1, 1]; it
returns (B, 1, H, W) weights in [0, 1] (see ``anyloom.training.image_tokenizer.PixelWeights``).

Axis legend: B batch, C channels, H/W image size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from anyloom.world.background import border_median


def thin_map(target: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1]: how far each pixel of (B, C, H, W) ``target`` stands out from both its left and right
    (or both its upper and lower) neighbours in the same direction, largest over channels, saturating at ``scale``.

    A 1-pixel gap between two objects or a 1-pixel line scores fully; a step edge scores 0 (one neighbour is on the
    pixel's own side); border pixels score 0.
    """
    def ridge(prev: torch.Tensor, mid: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(prev - mid, nxt - mid), torch.minimum(mid - prev, mid - nxt))

    rx = ridge(target[..., :, :-2], target[..., :, 1:-1], target[..., :, 2:]).amax(dim=1, keepdim=True)
    ry = ridge(target[..., :-2, :], target[..., 1:-1, :], target[..., 2:, :]).amax(dim=1, keepdim=True)
    r = torch.maximum(F.pad(rx, (1, 1)), F.pad(ry, (0, 0, 1, 1)))  # (B, 1, H, W)
    return (r / scale).clamp(0.0, 1.0)


def gap_map(target: torch.Tensor, radius: int, threshold: float) -> torch.Tensor:
    """(B, 1, H, W) in {0, 1}: background pixels of (B, C, H, W) ``target`` that a morphological closing of its
    objects fills, i.e. gaps and notches at most ``2 * radius`` pixels wide between object pixels.

    Object pixels are those farther than ``threshold`` (Euclidean over channels) from the picture's background, the
    median colour of its border; the closing is a (2 * radius + 1)^2 square dilation followed by the same erosion
    (outside the image counts as background for the erosion: a strip between an object and the image border is not
    a gap).
    """
    b, c = target.shape[:2]
    background = border_median(target).view(b, c, 1, 1)
    objects = ((target - background).pow(2).sum(dim=1, keepdim=True).sqrt() > threshold).to(target.dtype)
    k = 2 * radius + 1
    dilated = F.max_pool2d(objects, k, stride=1, padding=radius)
    closed = -F.max_pool2d(-F.pad(dilated, (radius,) * 4), k, stride=1)  # outside the image is background
    return closed * (1.0 - objects)


class ThinWeights:
    """``world_thin``: 1-pixel ridges of the target (a background gap between two objects, a thin line or tip)."""

    @dataclass(frozen=True)
    class Options:
        scale: float = 0.25  # how far a pixel stands out from both neighbours (in [-1, 1] units) to count fully

        def __post_init__(self) -> None:
            if self.scale <= 0:
                raise ValueError(f"world_thin: scale must be > 0, got {self.scale}")

    def __init__(self, options: Options) -> None:
        self.options = options

    def __call__(self, target: torch.Tensor) -> torch.Tensor:
        return thin_map(target, self.options.scale)


class GapWeights:
    """``world_gaps``: background pixels inside gaps at most ``2 * radius`` pixels wide between objects."""

    @dataclass(frozen=True)
    class Options:
        radius: int = 2  # half the widest gap that counts, in pixels
        threshold: float = 0.35  # RGB distance from the background (in [-1, 1] units) at which a pixel is an object's

        def __post_init__(self) -> None:
            if self.radius < 1 or self.threshold <= 0:
                raise ValueError(f"world_gaps: radius must be >= 1 and threshold > 0, got {self.radius}, "
                                 f"{self.threshold}")

    def __init__(self, options: Options) -> None:
        self.options = options

    def __call__(self, target: torch.Tensor) -> torch.Tensor:
        return gap_map(target, self.options.radius, self.options.threshold)


__all__ = ["GapWeights", "ThinWeights", "gap_map", "thin_map"]
