"""Rendering world scenes: 1-4 same-colour, same-shape objects on a low-saturation background.

Shapes are drawn hard-edged on a canvas ``supersample`` times larger and box-averaged down into a coverage
map, which gives exact anti-aliasing with no resampling filter (so the bytes depend only on the seed).
Objects never touch: their boxes keep a gap of at least ``MIN_GAP`` output pixels, so the judge can count
connected components.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from anyloom.world.captions import PALETTE, Caption

MIN_GAP = 2  # output pixels between object boxes (blur in generated images must not merge objects)
STAR_INNER = 0.45  # inner/outer radius of the 5-point star; fatter than the regular 0.382 to read at 9 px

# Largest object side per count, as a fraction of the image side; the smallest is MIN_SIDE.
MAX_SIDE = {1: 0.58, 2: 0.44, 3: 0.40, 4: 0.38}
MIN_SIDE = 0.28


@dataclass(frozen=True)
class Scene:
    pixels: np.ndarray  # (H, W, 3) uint8 RGB
    boxes: list[tuple[float, float, float, float]]  # (x0, y0, x1, y1) per object, output pixels
    background: tuple[int, int, int]  # the mean background colour


def shape_outline(shape: str, x0: float, y0: float, side: float) -> list[tuple[float, float]] | None:
    """Polygon filling the box (x0, y0, side, side) for ``shape``; None for the circle (drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        return [(x0, y0), (x0 + side, y0), (x0 + side, y0 + side), (x0, y0 + side)]
    if shape == "triangle":
        return [(x0 + side / 2, y0), (x0 + side, y0 + side), (x0, y0 + side)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else STAR_INNER
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        w, h = max(xs) - min(xs), max(ys) - min(ys)
        scale = side / max(w, h)  # the star's box is slightly wider than tall; centre it in the square
        ox = x0 + (side - w * scale) / 2 - min(xs) * scale
        oy = y0 + (side - h * scale) / 2 - min(ys) * scale
        return [(ox + x * scale, oy + y * scale) for x, y in pts]
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape_mask(shape: str, size: int, boxes: list[tuple[float, float, float, float]]) -> Image.Image:
    """A hard-edged 'L' mask (255 inside) of ``shape`` in each box on a size x size canvas."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for x0, y0, x1, _ in boxes:
        poly = shape_outline(shape, x0, y0, x1 - x0)
        if poly is None:
            draw.ellipse([x0, y0, x1, y0 + (x1 - x0)], fill=255)
        else:
            draw.polygon(poly, fill=255)
    return mask


def _place(rng: np.random.Generator, count: int, size: int) -> list[tuple[float, float, float, float]]:
    """Non-overlapping square boxes with a MIN_GAP margin; shrinks the size range until they fit."""
    hi = MAX_SIDE[count] * size
    lo = MIN_SIDE * size
    for _attempt in range(100):
        boxes: list[tuple[float, float, float, float]] = []
        for _ in range(count):
            side = float(rng.uniform(lo, hi))
            for _ in range(60):
                x0 = float(rng.uniform(1, size - 1 - side))
                y0 = float(rng.uniform(1, size - 1 - side))
                box = (x0, y0, x0 + side, y0 + side)
                if all(boxes_apart(box, b) for b in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == count:
            return boxes
        hi = max(lo, hi * 0.97)
    raise RuntimeError(f"could not place {count} objects on a {size}px canvas")


def boxes_apart(a: tuple[float, float, float, float], b: tuple[float, float, float, float],
                gap: float = MIN_GAP) -> bool:
    """Whether the (x0, y0, x1, y1) boxes ``a`` and ``b`` keep at least ``gap`` pixels between them on some axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def render_scene(rng: np.random.Generator, caption: Caption, image_size: int = 32, supersample: int = 4) -> Scene:
    """Draw ``caption`` as a scene with random sizes, positions, background tint/gradient and colour jitter."""
    n, big = image_size, image_size * supersample
    boxes = _place(rng, caption.count, n)

    # Background: a grey with a small tint and a linear gradient (low saturation keeps it apart from the palette).
    grey = rng.uniform(24, 216)
    base = grey + rng.uniform(-10, 10, size=3)
    angle = rng.uniform(0, 2 * math.pi)
    amp = rng.uniform(0, 16)
    t = (np.arange(n) + 0.5) / n - 0.5
    ramp = math.cos(angle) * t[None, :] + math.sin(angle) * t[:, None]  # (n, n)
    bg = base[None, None, :] + amp * ramp[:, :, None]  # (n, n, 3): a linear field, so its box mean is its centre

    color = np.array(PALETTE[caption.color], dtype=np.float64) + rng.uniform(-10, 10, size=3)
    big_boxes = [tuple(v * supersample for v in b) for b in boxes]
    mask = np.asarray(draw_shape_mask(caption.shape, big, big_boxes), dtype=np.float64) / 255.0  # (big, big)
    alpha = mask.reshape(n, supersample, n, supersample).mean(axis=(1, 3))[:, :, None]  # coverage (n, n, 1)
    small = bg * (1 - alpha) + color[None, None, :] * alpha  # (n, n, 3)
    pixels = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    return Scene(pixels=pixels, boxes=[tuple(round(v, 2) for v in b) for b in boxes],
                 background=tuple(int(round(v)) for v in np.clip(base, 0, 255)))


__all__ = ["Scene", "render_scene", "shape_outline", "draw_shape_mask", "boxes_apart", "MIN_GAP"]
