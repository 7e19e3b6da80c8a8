"""The world's pictures have a plain background: the median colour of a picture's border is that colour (objects
never cover more than a few border pixels). The world's plug-ins that tell objects from background use it."""

from __future__ import annotations

import torch


def border_median(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C): the median colour of each picture's border pixels (its four edges)."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    return border.median(dim=-1).values
