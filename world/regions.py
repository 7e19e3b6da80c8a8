"""The world's region head for the image-text matcher (plug-in ``world_regions`` of group ``anyloom.matcher_heads``).

A world picture shows a few objects of one shape and one colour on a plain background, kept >= ``MIN_GAP`` pixels
apart; each document's ``meta`` gives the objects' ``boxes`` and their ``shape`` and ``color``. The head reads a
picture cell by cell, one cell per 4 x 4 pixels: an object/background logit and, per key of ``keys`` (the meta keys
labelling every box), logits over the key's values. Where the global matcher sums a whole picture into one vector,
the head looks at each object, and needs no prompt:

- ``consistency``: for each key, the value the picture's object cells hold most, then the least sure object cell's
  log-probability of that value, summed over keys (0 = every object cell certain of one value; a picture with one
  object of another shape or colour among the rest scores far lower). The world's reranking scorer reads it
  (``anyloom.world.rerank``).
- ``contact``: a contact logit per cell, two objects touching there (the LM sometimes draws two squares run together
  into one rectangle, which the judge then counts as one). It is trained on copy-paste pictures
  (``touching_copies``: a document's object copied so it touches another) against the clean ones, and
  ``consistency`` adds log(1 - p) of the picture's most contact-like cell.
- ``colorblind`` keys (the world's ``shape``) are read by a second net of the same form that sees only each pixel's
  distance from the picture's background (``colorless``): a net that sees colour learns which shapes come in which
  colours, and reads a colour-shape pair held out of training (a red star) as unsure or as another shape.

Its training side (``RegionTrainer``, an ``anyloom.training.matcher.HeadTrainer``) runs in the matcher's steps on
the same pictures: every cell whose centre lies in one of the document's boxes is an object cell, labelled with
the document's value of each key; an object/background loss on every cell plus a cross-entropy per key on the
object cells (plus, with ``contact``, ``contact_batch`` touching copies per step: their contact cells are the
contact logit's positives, every other cell of every picture its negatives). Its validation report: the share of
val cells whose object/background call is right and, per key, of object cells whose value is; with ``contact``,
the share of clean val pictures with no cell called touching and of touching val copies with one.

Recipe::

    image_matcher:
      head: {name: world_regions, keys: [shape, color], contact: true, colorblind: [shape]}

Axis legend: B pictures, g x w region cells, K a key's values, N pictures of a split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anyloom.data.images import ImageSet
from anyloom.matcher.model import MatcherHead, to_unit
from anyloom.world.background import border_median
from anyloom.world.render import MIN_GAP, boxes_apart

CELL = 4  # pixels per region cell side (the head's stride)


@dataclass(frozen=True)
class RegionOptions:
    keys: tuple[str, ...] = ()  # the meta keys labelling each object box (the world's shape and color)
    values: tuple[tuple[str, ...], ...] = ()  # each key's values in class order: read from the training data
    channels: int = 64  # width of the cell readers
    contact: bool = False  # a contact logit per cell, trained on touching copies
    colorblind: tuple[str, ...] = ()  # keys read from the colourless distance map (``colorless``)
    contact_copies: int = 4000  # touching copies made from the train split (with contact)
    contact_batch: int = 32  # of them in each step's region batch

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("keys must name at least one meta key labelling the object boxes (e.g. [shape, color])")
        if self.values and (len(self.keys) != len(self.values) or any(len(v) < 1 for v in self.values)):
            raise ValueError(f"values needs one non-empty list of values per key, got {len(self.values)} for keys "
                             f"{tuple(self.keys)}")
        for name in ("channels", "contact_copies", "contact_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        unknown = [k for k in self.colorblind if k not in self.keys]
        if unknown:
            raise ValueError(f"colorblind key {unknown[0]!r} is not one of keys {tuple(self.keys)}")


def colorless(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 1, H, W) in [0, 1]: each pixel's distance from the picture's background (the
    median colour of its border), over the picture's largest such distance. Object shapes stay; their colour goes."""
    distance = (images - border_median(images)[:, :, None, None]).norm(dim=1, keepdim=True)
    return distance / distance.flatten(1).amax(1).clamp(min=1e-3)[:, None, None, None]


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.SiLU())


def _cell_reader(channels_in: int, c: int, heads: int) -> nn.Sequential:
    """A fully convolutional cell reader: 2x2 space-to-depth of ``channels_in / 4`` channels -> one cell per
    ``CELL`` x ``CELL`` pixels -> ``heads`` logits per cell."""
    return nn.Sequential(nn.PixelUnshuffle(2), _conv(channels_in, c // 2, 1), _conv(c // 2, c, 2), _conv(c, c, 1),
                         _conv(c, c, 1), nn.Conv2d(c, heads, 1))


class RegionHead(MatcherHead):
    Config = RegionOptions

    def __init__(self, cfg: RegionOptions):
        super().__init__()
        if not cfg.values:
            raise ValueError(f"region keys {tuple(cfg.keys)} without their values: a matcher with a region head is "
                             "built by the image_matcher stage (which reads them from the data)")
        self.cfg = cfg
        # each key's number of values, split by which net reads it (keys order within each)
        self._seeing = [len(v) for k, v in zip(cfg.keys, cfg.values) if k not in cfg.colorblind]
        self._blind = [len(v) for k, v in zip(cfg.keys, cfg.values) if k in cfg.colorblind]
        # object logit + each colour-seeing key's values (+ the contact logit)
        self.regions = _cell_reader(12, cfg.channels, 1 + sum(self._seeing) + int(cfg.contact))
        # the colour-blind keys' values, from the one-channel distance map
        self.blind_regions = _cell_reader(4, cfg.channels, sum(self._blind)) if self._blind else None

    @classmethod
    def trainer(cls, cfg: RegionOptions, train: ImageSet, val: ImageSet, seed: int, where: tuple[str, str]
                ) -> RegionTrainer:
        return RegionTrainer(cfg, train, val, seed, where)

    def region_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """(B, 3, H, W) in [-1, 1] -> object logits (B, g, w), per key value logits (B, K, g, w), and the contact
        logits (B, g, w) (None without ``contact``)."""
        cfg = self.cfg
        obj, *seen = torch.split(self.regions(images), [1, *self._seeing, *([1] if cfg.contact else [])], dim=1)
        contact = seen.pop()[:, 0] if cfg.contact else None
        blind: list[torch.Tensor] = []
        if self.blind_regions is not None:
            blind = list(torch.split(self.blind_regions(colorless(images)), self._blind, dim=1))
        per_key = [blind.pop(0) if k in cfg.colorblind else seen.pop(0) for k in cfg.keys]
        return obj[:, 0], per_key, contact

    @torch.no_grad()
    def consistency(self, images: torch.Tensor | np.ndarray, batch_size: int = 512) -> torch.Tensor:
        """(B,) float32 on the CPU, <= 0: per key, the least sure object cell's log-probability of the value the
        picture's object cells hold most, summed over keys, plus log(1 - p) of the most contact-like cell with
        ``contact`` (module docstring). A picture with no cell judged an object is read at its single most
        object-like cell."""
        x = to_unit(images).to(next(self.parameters()).device)
        was = self.training
        self.eval()
        scores = []
        for start in range(0, len(x), batch_size):
            obj, per_key, contact = self.region_logits(x[start:start + batch_size])
            flat = obj.flatten(1)  # (B, g*w)
            is_obj = (flat > 0) | (flat == flat.amax(1, keepdim=True))  # at least one cell each
            total = torch.zeros(len(flat), device=flat.device)
            for logits in per_key:
                logp = logits.flatten(2).log_softmax(1)  # (B, K, g*w)
                held = (logp.exp() * is_obj[:, None]).sum(2).argmax(1)  # (B,) the dominant value
                own = logp.gather(1, held[:, None, None].expand(-1, 1, logp.shape[2]))[:, 0]  # (B, g*w)
                total += own.masked_fill(~is_obj, 0.0).amin(1)
            if contact is not None:
                total -= F.softplus(contact.flatten(1).amax(1))  # log(1 - sigmoid(the largest contact logit))
            scores.append(total)
        self.train(was)
        return torch.cat(scores).float().cpu()


# ---- training side -------------------------------------------------------------------------------------------

def key_values(data: ImageSet, keys: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """Each key's distinct values over the documents' meta, sorted (documents without the key are named by
    ``cell_targets``)."""
    return tuple(tuple(sorted({str(meta[key]) for meta in data.meta if key in meta})) for key in keys)


def box_cells(boxes: list, h: int, w: int) -> np.ndarray:
    """(h / CELL, w / CELL) bool: the cells whose centre lies in one of the (x0, y0, x1, y1) boxes."""
    cy = (np.arange(h // CELL) + 0.5) * CELL  # cell centres, pixels
    cx = (np.arange(w // CELL) + 0.5) * CELL
    cells = np.zeros((len(cy), len(cx)), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        cells |= (cy[:, None] >= y0) & (cy[:, None] <= y1) & (cx[None, :] >= x0) & (cx[None, :] <= x1)
    return cells


def cell_targets(data: ImageSet, keys: tuple[str, ...], values: tuple[tuple[str, ...], ...], where: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, g, w) bool object cells (cell centre inside a box) and (N, keys) long value indices (-1: a value the
    head was not built with, ignored by the loss)."""
    h, w = data.pixels.shape[1:3]
    cells = np.zeros((len(data.meta), h // CELL, w // CELL), dtype=bool)
    labels = np.full((len(data.meta), len(keys)), -1, dtype=np.int64)
    for n, (doc_id, meta) in enumerate(zip(data.ids, data.meta)):
        boxes = meta.get("boxes")
        if not isinstance(boxes, list) or any(not isinstance(b, list) or len(b) != 4 for b in boxes):
            raise ValueError(f"{where}: document {doc_id!r}: meta.boxes must be a list of [x0, y0, x1, y1] "
                             f"pixel boxes, got {boxes!r}")
        cells[n] = box_cells(boxes, h, w)
        for i, key in enumerate(keys):
            if key not in meta:
                raise ValueError(f"{where}: document {doc_id!r}: no meta.{key} for the region head "
                                 f"(image_matcher.head.keys), got meta keys {sorted(meta)}")
            value = str(meta[key])
            labels[n, i] = values[i].index(value) if value in values[i] else -1
    return torch.from_numpy(cells), torch.from_numpy(labels)


@dataclass
class TouchingCopies:
    pixels: np.ndarray  # (M, H, W, 3) uint8
    source: np.ndarray  # (M,) the document each copy was made from
    cells: np.ndarray  # (M, g, w) bool object cells (the source's boxes and the copy's)
    contact: np.ndarray  # (M, g, w) bool cells where the copy touches the object it was placed against


def touching_copies(data: ImageSet, count: int, rng: np.random.Generator, where: str, min_gap: float = MIN_GAP,
                    gap_range: tuple[float, float] = (-1.5, 1.0)) -> TouchingCopies:
    """Pictures with two objects run together, for the contact logit: copy one of a document's objects (its box,
    blended in by how far each pixel is from the background towards the object's colour) so that it lands
    ``gap_range`` pixels from another object's box (the world keeps objects ``min_gap`` apart; touching or
    overlapping is what the LM's malformed pictures do), >= ``min_gap`` from all others and inside the picture; the
    contact cells are those the two boxes, grown by 2 px, share. Boxes as validated by ``cell_targets``."""
    h, w = data.pixels.shape[1:3]
    usable = [i for i, meta in enumerate(data.meta) if meta.get("boxes")]
    if not usable:
        raise ValueError(f"{where}: no document has meta.boxes to make touching copies from (region head contact)")
    pixels, source, cells, contact = [], [], [], []
    cell_y = np.arange(h // CELL)[:, None] * CELL  # cell top / left edges, pixels
    cell_x = np.arange(w // CELL)[None, :] * CELL
    tries = 0
    while len(pixels) < count:
        tries += 1
        if tries > 50 * count:
            raise ValueError(f"{where}: made only {len(pixels)} of {count} touching copies in {tries - 1} tries: "
                             "the documents' objects leave no room to place a copy")
        doc = usable[int(rng.integers(len(usable)))]
        boxes = [tuple(float(v) for v in b) for b in data.meta[doc]["boxes"]]
        a = boxes[int(rng.integers(len(boxes)))]
        target = int(rng.integers(len(boxes)))
        b = boxes[target]
        wa, ha = a[2] - a[0], a[3] - a[1]
        side, gap = int(rng.integers(4)), float(rng.uniform(*gap_range))
        along_y = rng.uniform(b[1] - ha + 3, b[3] - 3)  # sliding along the side, overlapping it by >= 3 px
        along_x = rng.uniform(b[0] - wa + 3, b[2] - 3)
        x0, y0 = [(b[2] + gap, along_y), (b[0] - gap - wa, along_y),  # right of b, left of b,
                  (along_x, b[3] + gap), (along_x, b[1] - gap - ha)][side]  # below b, above b
        sx, sy = int(round(x0 - a[0])), int(round(y0 - a[1]))  # whole pixels: the copy keeps its anti-aliasing
        moved = (a[0] + sx, a[1] + sy, a[2] + sx, a[3] + sy)
        if moved[0] < 0.5 or moved[1] < 0.5 or moved[2] > w - 0.5 or moved[3] > h - 0.5:
            continue
        if not all(boxes_apart(moved, o, min_gap) for i, o in enumerate(boxes) if i != target):
            continue
        px = data.pixels[doc].astype(np.float64)
        background = border_median(torch.from_numpy(px).permute(2, 0, 1), midpoint=True).numpy()  # (3,)
        bx0, by0 = max(int(np.floor(a[0])) - 1, 0), max(int(np.floor(a[1])) - 1, 0)
        bx1, by1 = min(int(np.ceil(a[2])) + 1, w), min(int(np.ceil(a[3])) + 1, h)
        patch = px[by0:by1, bx0:bx1]
        far = np.linalg.norm(patch - background, axis=-1)
        if far.max() < 30:  # nothing there to copy (an object the colour of the background)
            continue
        color = patch[far >= 0.8 * far.max()].mean(0)
        towards = color - background
        alpha = np.clip(((patch - background) * towards).sum(-1) / max(float(towards @ towards), 1e-6), 0.0, 1.0)
        dy0, dx0 = max(by0 + sy, 0), max(bx0 + sx, 0)
        dy1, dx1 = min(by1 + sy, h), min(bx1 + sx, w)
        al = alpha[dy0 - by0 - sy:dy1 - by0 - sy, dx0 - bx0 - sx:dx1 - bx0 - sx, None]
        px[dy0:dy1, dx0:dx1] = px[dy0:dy1, dx0:dx1] * (1 - al) + color * al
        pixels.append(np.clip(np.rint(px), 0, 255).astype(np.uint8))
        source.append(doc)
        cells.append(box_cells([*boxes, moved], h, w))
        zx0, zy0 = max(moved[0], b[0]) - 2, max(moved[1], b[1]) - 2
        zx1, zy1 = min(moved[2], b[2]) + 2, min(moved[3], b[3]) + 2
        contact.append((cell_y + CELL > zy0) & (cell_y < zy1) & (cell_x + CELL > zx0) & (cell_x < zx1))
    return TouchingCopies(np.stack(pixels), np.array(source), np.stack(cells), np.stack(contact))


def region_loss(head: RegionHead, images: torch.Tensor, cells: torch.Tensor, labels: torch.Tensor,
                contact: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """Object/background BCE on every cell + per key CE on the object cells (+ the contact BCE on every cell with
    ``contact``, ``contact`` (B, g, w) bool, None = no cell touches); also the per-cell calls (for accuracy):
    object (B, g, w) bool, per key the argmax value (B, g, w), and the contact logits (B, g, w) or None."""
    obj, per_key, touch = head.region_logits(images)
    loss = F.binary_cross_entropy_with_logits(obj, cells.float())
    if touch is not None:
        target = torch.zeros_like(touch) if contact is None else contact.float()
        loss = loss + F.binary_cross_entropy_with_logits(touch, target)
    for i, logits in enumerate(per_key):
        target = labels[:, i, None, None].expand_as(cells)  # (B, g, w)
        keep = cells & (target >= 0)
        if keep.any():
            loss = loss + F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], target[keep])
    return loss, obj > 0, [lg.argmax(1) for lg in per_key], touch


def _flip_where(flip: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the items of the batch ``t`` (B, ..., W) where ``flip`` (B,) is set (None: none)."""
    return t if flip is None else torch.where(flip.view(-1, *[1] * (t.ndim - 1)), t.flip(-1), t)


class RegionTrainer:
    """The region head's side of the matcher's steps (``anyloom.training.matcher.HeadTrainer``): targets from the
    splits' boxes and labels, touching copies with ``contact``; see the module docstring."""

    def __init__(self, cfg: RegionOptions, train: ImageSet, val: ImageSet, seed: int, where: tuple[str, str]):
        keys = tuple(cfg.keys)
        values = key_values(train, keys)
        self.cells, self.labels = cell_targets(train, keys, values, where[0])  # names a bad document
        self.val_cells, self.val_labels = cell_targets(val, keys, values, where[1])
        self.config = replace(cfg, values=values)
        self.copies = self.val_copies = None
        if cfg.contact:  # their own generators: the global matcher's batches are the same with or without them
            self.copies = touching_copies(train, cfg.contact_copies, np.random.default_rng(seed), where[0])
            self.val_copies = touching_copies(val, len(val.pixels), np.random.default_rng(seed + 1), where[1])
            self.copy_rng = torch.Generator().manual_seed(seed + 1)

    def prepare(self, as_trained: Callable[[np.ndarray, str], torch.Tensor]) -> None:
        """The touching copies as the matcher sees its pictures (reconstructed by the image tokenizer or not)."""
        if self.copies is not None:
            self.copy_images = as_trained(self.copies.pixels, "touching copies (train)")
            self.val_copy_images = as_trained(self.val_copies.pixels, "touching copies (val)")
            self.copy_cells = torch.from_numpy(self.copies.cells)
            self.copy_contact = torch.from_numpy(self.copies.contact)
            self.copy_labels = self.labels[torch.from_numpy(self.copies.source)]

    def loss(self, head: RegionHead, x: torch.Tensor, idx: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
        """The step's region loss on its pictures ``x`` (the train split's ``idx``, mirrored where ``flip``)."""
        c, region_x, region_y, contact = _flip_where(flip, self.cells[idx]), x, self.labels[idx], None
        if self.copies is not None:  # the clean pictures' cells touch nowhere; the copies' contact cells do
            j = torch.randint(0, len(self.copy_images), (self.config.contact_batch,), generator=self.copy_rng)
            cx, cc, ct = self.copy_images[j], self.copy_cells[j], self.copy_contact[j]
            if flip is not None:
                cflip = torch.rand(len(j), generator=self.copy_rng) < 0.5
                cx, cc, ct = (_flip_where(cflip, t) for t in (cx, cc, ct))
            region_x, region_y = torch.cat([x, cx]), torch.cat([region_y, self.copy_labels[j]])
            contact = torch.cat([torch.zeros_like(c), ct])
            c = torch.cat([c, cc])
        return region_loss(head, region_x, c, region_y, contact)[0]

    @torch.no_grad()
    def report(self, head: RegionHead, val_images: torch.Tensor) -> dict[str, float]:
        """Cell accuracies on the val pictures (and the contact calls on clean pictures and touching copies)."""
        head.eval()
        cells, labels = self.val_cells, self.val_labels
        calls = [region_loss(head, val_images[s:s + 512], cells[s:s + 512], labels[s:s + 512])
                 for s in range(0, len(val_images), 512)]
        is_obj = torch.cat([c[1] for c in calls])
        report = {"object_cells_right": float((is_obj == cells).float().mean())}
        for i, name in enumerate(self.config.keys):
            value = torch.cat([c[2][i] for c in calls])
            target = labels[:, i, None, None].expand_as(cells)
            report[f"{name}_right_on_object_cells"] = float((value == target)[cells].float().mean())
        if self.copies is not None:  # a picture is called touching when its most contact-like cell's logit is > 0
            clean = torch.cat([c[3].flatten(1).amax(1) > 0 for c in calls])
            found = torch.cat([head.region_logits(self.val_copy_images[s:s + 512])[2].flatten(1).amax(1) > 0
                               for s in range(0, len(self.val_copy_images), 512)])
            report["contact_clean_pictures_right"] = float((~clean).float().mean())
            report["contact_touching_copies_found"] = float(found.float().mean())
        return report


__all__ = ["CELL", "RegionHead", "RegionOptions", "RegionTrainer", "TouchingCopies", "box_cells", "cell_targets",
           "colorless", "key_values", "region_loss", "touching_copies"]
