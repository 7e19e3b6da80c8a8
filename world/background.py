"""The world's pictures have a plain background: the median colour of a picture's border is that colour (objects
never cover more than a few border pixels). The world's plug-ins that tell objects from background use it."""

from __future__ import annotations

import torch


def border_median(images: torch.Tensor, *, midpoint: bool = False) -> torch.Tensor:
    """(..., C, H, W) -> (..., C): the median colour of each picture's border pixels (its four edges).

    The border has an even number of pixels: the median is the lower of the two middle values, or with
    ``midpoint`` their mean (numpy's convention). The two differ by at most one level on the world's pictures;
    each plug-in keeps the one it was trained with."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    if not midpoint:
        return border.median(dim=-1).values
    ordered, n = border.sort(dim=-1).values, border.shape[-1]
    if n % 2:
        return ordered[..., n // 2]
    return (ordered[..., n // 2 - 1] + ordered[..., n // 2]) / 2
