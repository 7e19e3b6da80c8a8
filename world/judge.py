"""The image judge: pixels -> (count, colour, shape), by classical computer vision, no learned weights.

1. Background: a plane per channel fitted to the border pixels (scenes have a tinted grey background with
   a gentle gradient), refitted without outliers so an object touching the border does not bend it.
2. Objects: pixels far from the background, split into 8-connected components; specks below a minimum
   area (noise in generated images) are ignored. The world keeps objects >= 2 px apart, so one component
   is one object.
3. Colour: the mean of a component's most saturated pixels, classified to the nearest palette entry
   (refused when nothing is near, e.g. a brownish blur).
4. Shape: the component's soft coverage (how far each pixel moved from the background towards the object
   colour) is resampled into its own bounding box at 16 x 16 and matched to templates produced by the same
   measurement on rendered shapes of several sizes; size and position drop out.

An image whose objects disagree in colour or shape, or has 0 or more than 4 objects, is not a caption:
``judge_image`` returns None and ``inspect_image`` says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from anyloom.world.captions import NUMBER_WORDS, PALETTE, SHAPES, Caption
from anyloom.world.render import draw_shape_mask

FOREGROUND_DISTANCE = 45.0  # RGB distance from the background; the palette is >= ~100 from any grey
MIN_AREA_FRACTION = 8 / 1024  # smallest object, as a fraction of the image (8 px at 32 x 32)
MAX_COLOR_DISTANCE = 80.0  # farther than this from every palette entry -> unreadable colour
MAX_SHAPE_DISTANCE = 0.22  # mean |coverage - template| above this -> unreadable shape
GRID = 16  # side of the normalised coverage patch
EDGE_COVERAGE = 0.2  # rows/columns less covered than this are not part of the object's box (noise)
# Generated images are blurrier than rendered ones: templates include blurred versions (sigma, pixels).
TEMPLATE_BLURS = (0.0, 0.5, 0.8, 1.1)

_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.array([PALETTE[c] for c in _PALETTE_NAMES], dtype=np.float64)  # (K, 3)


@dataclass(frozen=True)
class JudgedObject:
    color: str | None  # None: no palette colour is near
    shape: str | None  # None: no template is near
    area: float  # soft area in pixels
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the component, pixel indices, x1/y1 exclusive
    color_distance: float
    shape_distance: float


@dataclass(frozen=True)
class JudgeReport:
    caption: Caption | None
    objects: list[JudgedObject]
    background: tuple[float, float, float]  # mean background colour
    reason: str  # why caption is None ("" when it is not)


def _background(px: np.ndarray) -> np.ndarray:
    """(H, W, 3) background model: a per-channel plane fitted to the border, robust to objects on it."""
    h, w, _ = px.shape
    ys, xs = np.mgrid[0:h, 0:w]
    border = np.zeros((h, w), dtype=bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    a = np.stack([np.ones(border.sum()), xs[border] / w - 0.5, ys[border] / h - 0.5], axis=1)  # (B, 3)
    values = px[border]  # (B, 3)
    keep = np.linalg.norm(values - np.median(values, axis=0), axis=1) < FOREGROUND_DISTANCE
    for _ in range(2):
        coef, *_ = np.linalg.lstsq(a[keep], values[keep], rcond=None)  # (3 basis, 3 channels)
        keep = np.linalg.norm(values - a @ coef, axis=1) < FOREGROUND_DISTANCE / 2
        if keep.sum() < 4:
            keep[:] = True
    full = np.stack([np.ones((h, w)), xs / w - 0.5, ys / h - 0.5], axis=-1)  # (H, W, 3 basis)
    return full @ coef  # (H, W, 3)


def _box_of_coverage(alpha: np.ndarray) -> tuple[float, float, float, float] | None:
    """Sub-pixel (x0, y0, x1, y1) of a coverage map: edge rows/columns count by how covered they are."""
    cols = alpha.max(axis=0)
    rows = alpha.max(axis=1)
    xi = np.nonzero(cols > EDGE_COVERAGE)[0]
    yi = np.nonzero(rows > EDGE_COVERAGE)[0]
    if len(xi) < 2 or len(yi) < 2:
        return None
    x0 = xi[0] + 1.0 - cols[xi[0]]
    x1 = xi[-1] + cols[xi[-1]]
    y0 = yi[0] + 1.0 - rows[yi[0]]
    y1 = yi[-1] + rows[yi[-1]]
    return float(x0), float(y0), float(x1), float(y1)


def normalized_patch(alpha: np.ndarray) -> np.ndarray | None:
    """Coverage resampled into its own bounding box: (GRID, GRID) in [0, 1], or None if degenerate."""
    box = _box_of_coverage(alpha)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    t = (np.arange(GRID) + 0.5) / GRID
    xs = x0 + t * (x1 - x0) - 0.5  # pixel centres sit at index + 0.5
    ys = y0 + t * (y1 - y0) - 0.5
    yy, xx = np.meshgrid(ys, xs, indexing="ij")  # (GRID, GRID)
    return ndimage.map_coordinates(alpha, [yy, xx], order=1, mode="constant", cval=0.0)


@lru_cache(maxsize=1)
def _templates() -> tuple[np.ndarray, tuple[str, ...]]:
    """Patches of every shape rendered at several sizes and sub-pixel offsets: (N, GRID, GRID), labels."""
    patches, labels = [], []
    ss = 8
    for shape in SHAPES:
        for side in (8.5, 10, 12, 14.5, 18, 24, 34):
            for off in (0.0, 0.25, 0.5):
                n = int(np.ceil(side + off)) + 8
                box = (4 + off) * ss, (4 + off) * ss, (4 + off + side) * ss, (4 + off + side) * ss
                big = np.asarray(draw_shape_mask(shape, n * ss, [box]), dtype=np.float64) / 255.0
                alpha = big.reshape(n, ss, n, ss).mean(axis=(1, 3))  # (n, n) coverage
                for sigma in TEMPLATE_BLURS:
                    patch = normalized_patch(ndimage.gaussian_filter(alpha, sigma) if sigma else alpha)
                    if patch is not None:
                        patches.append(patch)
                        labels.append(shape)
    return np.stack(patches), tuple(labels)


def _classify_shape(alpha: np.ndarray) -> tuple[str | None, float]:
    patch = normalized_patch(alpha)
    if patch is None:
        return None, float("inf")
    templates, labels = _templates()
    dist = np.abs(templates - patch[None]).mean(axis=(1, 2))  # (N,)
    best = int(np.argmin(dist))
    d = float(dist[best])
    return (labels[best] if d <= MAX_SHAPE_DISTANCE else None), d


def inspect_image(pixels: np.ndarray) -> JudgeReport:
    """Everything the judge sees in one (H, W, 3) uint8 RGB image (see the module docstring)."""
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"judge expects (H, W, 3) RGB pixels, got shape {pixels.shape}")
    if pixels.dtype != np.uint8:  # a float image in [0, 1] would look empty, not wrong: refuse it
        raise ValueError(f"judge expects uint8 pixels in 0..255, got dtype {pixels.dtype}")
    px = pixels.astype(np.float64)
    h, w, _ = px.shape
    bg = _background(px)
    dist = np.linalg.norm(px - bg, axis=-1)  # (H, W)
    labels, n = ndimage.label(dist > FOREGROUND_DISTANCE, structure=np.ones((3, 3)))
    min_area = MIN_AREA_FRACTION * h * w
    # Every pixel belongs to its nearest component, so a rim is never shared between close objects.
    _, (iy, ix) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    owner = labels[iy, ix]  # (H, W)
    objects: list[JudgedObject] = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        # Work in the component's box grown by 3 px (room for the rim and the coverage box's margin).
        y0, y1 = max(sl[0].start - 3, 0), min(sl[0].stop + 3, h)
        x0, x1 = max(sl[1].start - 3, 0), min(sl[1].stop + 3, w)
        lab, d, p, b = labels[y0:y1, x0:x1], dist[y0:y1, x0:x1], px[y0:y1, x0:x1], bg[y0:y1, x0:x1]
        own = owner[y0:y1, x0:x1]
        comp = lab == k
        core = comp & (d >= 0.8 * d[comp].max())
        mean = p[core].mean(axis=0)
        cd = np.linalg.norm(_PALETTE_RGB - mean[None], axis=1)
        color = _PALETTE_NAMES[int(np.argmin(cd))] if cd.min() <= MAX_COLOR_DISTANCE else None
        # Soft coverage: how far each pixel moved from the background towards the object's colour,
        # over the component grown by two pixels (its anti-aliased or blurred rim), never into pixels that
        # are nearer another object.
        region = ndimage.binary_dilation(comp, structure=np.ones((3, 3)), iterations=2) & (own == k)
        target = mean[None, None, :] - b  # (h, w, 3)
        alpha = ((p - b) * target).sum(-1) / np.maximum((target * target).sum(-1), 1e-6)
        alpha = np.where(region, np.clip(alpha, 0.0, 1.0), 0.0)
        area = float(alpha.sum())
        if area < min_area:
            continue
        shape, sd = _classify_shape(np.pad(alpha, 1))
        box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
        objects.append(JudgedObject(color=color, shape=shape, area=area, box=box,
                                    color_distance=float(cd.min()), shape_distance=sd))
    background = tuple(float(v) for v in bg.mean(axis=(0, 1)))
    caption, reason = _caption_of(objects)
    return JudgeReport(caption=caption, objects=objects, background=background, reason=reason)


def _caption_of(objects: list[JudgedObject]) -> tuple[Caption | None, str]:
    if not objects:
        return None, "no objects"
    if len(objects) > len(NUMBER_WORDS):
        return None, f"{len(objects)} objects (at most {len(NUMBER_WORDS)})"
    colors = {o.color for o in objects}
    shapes = {o.shape for o in objects}
    if None in colors:
        return None, "an object has no palette colour"
    if None in shapes:
        return None, "an object matches no shape"
    if len(colors) > 1:
        return None, f"objects disagree in colour: {sorted(colors)}"
    if len(shapes) > 1:
        return None, f"objects disagree in shape: {sorted(shapes)}"
    return Caption(count=len(objects), color=colors.pop(), shape=shapes.pop()), ""


def judge_image(pixels: np.ndarray) -> Caption | None:
    """(H, W, 3) uint8 RGB -> the caption it shows, or None when it shows no caption (see ``inspect_image``)."""
    return inspect_image(pixels).caption


def judge_images(batch: np.ndarray | list[np.ndarray]) -> list[Caption | None]:
    """``judge_image`` over a batch: (N, H, W, 3) uint8 or a list of (H, W, 3)."""
    return [judge_image(np.asarray(p)) for p in batch]


__all__ = ["JudgedObject", "JudgeReport", "inspect_image", "judge_image", "judge_images", "normalized_patch"]
