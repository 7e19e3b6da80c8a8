"""Training the image-text matcher (``anyloom.generation.matcher``) that reranks text->image candidates.

    train_matcher(cfg, image_tokenizer, text_tokenizer, train_manifest, val_manifest, run) -> folder of the matcher

Reads top to bottom: (caption, picture) pairs from the manifests (the first text and image segment of each
document; documents without one are counted and reported) -> each picture as the frozen image tokenizer
reconstructs it (what generation decodes; ``reconstructions: false`` keeps the originals) -> contrastive steps:
a batch of pictures against the distinct captions in it (two pictures of one caption are not each other's
negatives), cross-entropy over the scaled cosines, AdamW with warmup + cosine -> the validation split's top-1:
each held-out picture against every distinct caption of the train and val splits.
With ``model.region_keys`` (e.g. ``[shape, color]``) the matcher's region head trains in the same steps on the same
pictures (its own parameters, so the global matcher is the same with or without it): every 4 x 4-pixel cell whose
centre lies in one of the document's ``meta.boxes`` is an object cell, labelled with the document's ``meta[key]``
for each key; an object/background loss on every cell plus a cross-entropy per key on the object cells. Its
validation report: the share of val cells whose object/background call is right and, per key, of object cells
whose value is. With ``model.region_contact`` each step's region batch also holds ``contact_batch`` touching copies
(``touching_copies``: one of a training document's objects copied against another, reconstructed like the rest);
their contact cells are the contact logit's positives, every other cell of every picture its negatives. Its report:
the share of clean val pictures with no cell called touching, and of touching val copies with one.

The stage takes ~half a minute on two cores, so it has no mid-run checkpoints (an interrupted run starts over) and
runs on the CPU whatever the LM uses.
It is skipped when ``<run>/matcher`` holds a matcher trained with the same config, tokenizers and data
(the fingerprint in its safetensors metadata).

Axis legend: B batch of pictures, U distinct captions in a batch, N pictures in a split.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from anyloom.config import added_field, fingerprint
from anyloom.generation.matcher import ImageTextMatcher, MatcherConfig, to_unit
from anyloom.progress import progress
from anyloom.training.diffusion_decoder import freeze, reconstruct
from anyloom.training.metrics import MetricsLogger
from anyloom.training.optim import OptimConfig, build_optimizer, build_scheduler
from anyloom.training.run import RunDir
from anyloom.training.seed import seed_everything
from anyloom.weights import read_metadata
from anyloom.world.render import MIN_GAP, boxes_apart


@dataclass(frozen=True)
class MatcherStageConfig:
    # image_size and text_vocab are taken from the tokenizers at training time
    model: MatcherConfig = field(default_factory=MatcherConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-3, warmup_steps=50, weight_decay=0.01, schedule="cosine",
                                            min_lr_ratio=0.0)
    )
    steps: int = 1000
    batch_size: int = 128
    reconstructions: bool = True  # train on the tokenizer's reconstructions (what generation decodes)
    # mirror pictures left-right half of the time: only for data whose texts never name a direction (the world)
    hflip: bool = False
    # add the text -> picture direction to the loss (each caption against the batch's pictures, its own pictures
    # the positives): the direction reranking uses, one prompt against its candidates
    symmetric: bool = True
    log_every: int = 50
    max_seconds: float = 0  # > 0: stop after this much training time (shared CPUs)
    encode_batch_size: int = 256
    seed: int = 0
    # with model.region_contact: touching copies made from the train split (``touching_copies``) and how many of
    # them join each step's region-head batch (the clean pictures' cells are the contact logit's negatives)
    contact_copies: int = added_field(4000)
    contact_batch: int = added_field(32)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "encode_batch_size", "contact_copies", "contact_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_seconds < 0:
            raise ValueError(f"max_seconds must be >= 0, got {self.max_seconds}")


@dataclass
class CaptionedImages:
    pixels: np.ndarray  # (N, H, W, 3) uint8
    texts: list[str]
    skipped: int  # documents without a text or an image segment
    meta: list[dict] = field(default_factory=list)  # each kept document's meta
    ids: list[str] = field(default_factory=list)  # each kept document's id


def load_captioned_images(path: str | Path, image_size: tuple[int, int]) -> CaptionedImages:
    """The first (text, image) pair of every document of a JSONL manifest; others are counted as skipped."""
    from anyloom.data.document import ImageSegment, TextSegment
    from anyloom.data.manifest import read_manifest

    pixels, texts, skipped, meta, ids = [], [], 0, [], []
    for doc in read_manifest(path).documents:
        text, image = doc.first(TextSegment), doc.first(ImageSegment)
        if text is None or image is None or not text.text.strip():
            skipped += 1
            continue
        px = np.asarray(image.pixels)
        if px.dtype != np.uint8 or px.shape != (*image_size, 3):
            raise ValueError(f"{path}: {image.path or doc.id}: expected ({image_size[0]}, {image_size[1]}, 3) uint8 "
                             f"pixels (the image tokenizer's size), got {px.shape} {px.dtype}")
        pixels.append(px)
        texts.append(text.text)
        meta.append(doc.meta)
        ids.append(doc.id)
    if not pixels:
        raise ValueError(f"{path}: no document with both a text and an image segment ({skipped} without)")
    return CaptionedImages(np.stack(pixels), texts, skipped, meta, ids)


REGION_CELL = 4  # pixels per region cell side (the region head's stride)


def region_values(data: CaptionedImages, keys: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    """Each key's distinct values over the documents' meta, sorted (documents without the key are named by
    ``region_targets``)."""
    return tuple(tuple(sorted({str(meta[key]) for meta in data.meta if key in meta})) for key in keys)


def box_cells(boxes: list, h: int, w: int) -> np.ndarray:
    """(h / REGION_CELL, w / REGION_CELL) bool: the cells whose centre lies in one of the (x0, y0, x1, y1) boxes."""
    cy = (np.arange(h // REGION_CELL) + 0.5) * REGION_CELL  # cell centres, pixels
    cx = (np.arange(w // REGION_CELL) + 0.5) * REGION_CELL
    cells = np.zeros((len(cy), len(cx)), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        cells |= (cy[:, None] >= y0) & (cy[:, None] <= y1) & (cx[None, :] >= x0) & (cx[None, :] <= x1)
    return cells


def region_targets(data: CaptionedImages, keys: tuple[str, ...], values: tuple[tuple[str, ...], ...],
                   where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, g, w) bool object cells (cell centre inside a box) and (N, keys) long value indices (-1: a value the
    head was not built with, ignored by the loss)."""
    h, w = data.pixels.shape[1:3]
    cells = np.zeros((len(data.meta), h // REGION_CELL, w // REGION_CELL), dtype=bool)
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
                                 f"(image_matcher.model.region_keys), got meta keys {sorted(meta)}")
            value = str(meta[key])
            labels[n, i] = values[i].index(value) if value in values[i] else -1
    return torch.from_numpy(cells), torch.from_numpy(labels)


@dataclass
class TouchingCopies:
    pixels: np.ndarray  # (M, H, W, 3) uint8
    source: np.ndarray  # (M,) the document each copy was made from
    cells: np.ndarray  # (M, g, w) bool object cells (the source's boxes and the copy's)
    contact: np.ndarray  # (M, g, w) bool cells where the copy touches the object it was placed against


def touching_copies(data: CaptionedImages, count: int, rng: np.random.Generator, where: str,
                    min_gap: float = MIN_GAP, gap_range: tuple[float, float] = (-1.5, 1.0)) -> TouchingCopies:
    """Pictures with two objects run together, for the region head's contact logit: copy one of a document's
    objects (its box, blended in by how far each pixel is from the background towards the object's colour) so that
    it lands ``gap_range`` pixels from another object's box (the world keeps objects ``min_gap`` apart; touching or
    overlapping is what the LM's malformed pictures do), >= ``min_gap`` from all others and inside the picture; the
    contact cells are those the two boxes, grown by 2 px, share. Boxes as validated by ``region_targets``."""
    h, w = data.pixels.shape[1:3]
    usable = [i for i, meta in enumerate(data.meta) if meta.get("boxes")]
    if not usable:
        raise ValueError(f"{where}: no document has meta.boxes to make touching copies from (region_contact)")
    pixels, source, cells, contact = [], [], [], []
    cell_y = np.arange(h // REGION_CELL)[:, None] * REGION_CELL  # cell top / left edges, pixels
    cell_x = np.arange(w // REGION_CELL)[None, :] * REGION_CELL
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
        background = np.median(np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]]), axis=0)  # (3,)
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
        contact.append((cell_y + REGION_CELL > zy0) & (cell_y < zy1) & (cell_x + REGION_CELL > zx0) & (cell_x < zx1))
    return TouchingCopies(np.stack(pixels), np.array(source), np.stack(cells), np.stack(contact))


def region_loss(model: ImageTextMatcher, images: torch.Tensor, cells: torch.Tensor, labels: torch.Tensor,
                contact: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """Object/background BCE on every cell + per key CE on the object cells (+ the contact BCE on every cell with
    ``region_contact``, ``contact`` (B, g, w) bool, None = no cell touches); also the per-cell calls (for accuracy):
    object (B, g, w) bool, per key the argmax value (B, g, w), and the contact logits (B, g, w) or None."""
    obj, per_key, touch = model.region_logits(images)
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


def _flip_where(flip: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the items of the batch ``t`` (B, ..., W) where ``flip`` (B,) is set."""
    return torch.where(flip.view(-1, *[1] * (t.ndim - 1)), t.flip(-1), t)


def _file_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*")):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class MatcherResult:
    folder: Path
    val_top1: float  # held-out pictures whose best caption (of every distinct train/val caption) is their own
    steps: int
    up_to_date: bool = False


@torch.no_grad()
def retrieval_top1(model: ImageTextMatcher, images: torch.Tensor, texts: list[str], pool: list[str],
                   encode) -> tuple[float, Counter]:
    """Share of ``images`` whose highest-scoring caption among ``pool`` is their own; the (own, chosen) confusions."""
    model.eval()
    ids, mask = model.text_batch([encode(t) for t in pool])
    t = model.encode_texts(ids, mask)
    best = torch.cat([(model.encode_images(images[s:s + 512]) @ t.T).argmax(1) for s in range(0, len(images), 512)])
    chosen = [pool[j] for j in best.tolist()]
    confusions = Counter((a, b) for a, b in zip(texts, chosen) if a != b)
    return sum(a == b for a, b in zip(texts, chosen)) / max(1, len(texts)), confusions


def train_matcher(
    cfg: MatcherStageConfig,
    image_tokenizer,
    text_tokenizer,
    train_manifest: str | Path,
    val_manifest: str | Path,
    run: RunDir,
    image_tokenizer_folder: str | Path | None = None,
) -> MatcherResult:
    """Train (or find up to date) the matcher of ``run`` (``run/matcher``); see the module docstring."""
    size = tuple(int(v) for v in image_tokenizer.image_size)
    mcfg = replace(cfg.model, image_size=size, text_vocab=int(text_tokenizer.vocab_size))
    out = run.path / "matcher"
    key = fingerprint({
        "config": replace(cfg, model=mcfg), "text_tokenizer": text_tokenizer.fingerprint,
        "image_tokenizer": _file_digest(Path(image_tokenizer_folder)) if image_tokenizer_folder else "",
        "train": str(train_manifest), "val": str(val_manifest),
    })
    report = run.path / "matcher_val.json"
    if report.is_file() and read_metadata(out).get("fingerprint") == key:
        done = json.loads(report.read_text())
        return MatcherResult(out, done["val_top1"], done["steps"], up_to_date=True)

    train = load_captioned_images(train_manifest, size)
    val = load_captioned_images(val_manifest, size)
    keys = tuple(mcfg.region_keys)
    if keys:
        values = region_values(train, keys)
        cells, region_labels = region_targets(train, keys, values, str(train_manifest))  # names a bad document
        val_cells, val_labels = region_targets(val, keys, values, str(val_manifest))
        mcfg = replace(mcfg, region_values=values)
    if mcfg.region_contact:  # their own generators: the global matcher's batches are the same with or without them
        copies = touching_copies(train, cfg.contact_copies, np.random.default_rng(cfg.seed), str(train_manifest))
        val_copies = touching_copies(val, len(val.pixels), np.random.default_rng(cfg.seed + 1), str(val_manifest))
        copy_rng = torch.Generator().manual_seed(cfg.seed + 1)
    if train.skipped or val.skipped:
        print(f"image matcher: skipped {train.skipped} train / {val.skipped} val documents without a text and an "
              "image segment")
    seed_everything(cfg.seed)
    rng = torch.Generator().manual_seed(cfg.seed)
    if cfg.reconstructions:
        freeze(image_tokenizer)

    def as_trained(pixels: np.ndarray, desc: str) -> torch.Tensor:  # what the matcher trains on and is scored on
        x = to_unit(pixels)
        return reconstruct(image_tokenizer, x, cfg.encode_batch_size, f"matcher: {desc}") if cfg.reconstructions else x

    images = as_trained(train.pixels, "reconstructions (train)")
    val_images = as_trained(val.pixels, "reconstructions (val)")
    if mcfg.region_contact:
        copy_images = as_trained(copies.pixels, "touching copies (train)")
        val_copy_images = as_trained(val_copies.pixels, "touching copies (val)")
        copy_cells, copy_contact = torch.from_numpy(copies.cells), torch.from_numpy(copies.contact)
        copy_labels = region_labels[torch.from_numpy(copies.source)]
    encode = text_tokenizer.encode
    vocab = sorted(set(train.texts))
    caption_index = {t: i for i, t in enumerate(vocab)}
    labels = torch.tensor([caption_index[t] for t in train.texts])  # (N,)

    model = ImageTextMatcher(mcfg)
    ids, mask = model.text_batch([encode(t) for t in vocab])  # every distinct training caption, tokenized once
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.steps, cfg.optim)
    logger = MetricsLogger(run, tensorboard=False)
    n, bs = len(images), min(cfg.batch_size, len(images))
    t0 = time.perf_counter()
    step = 0
    model.train()
    for step in progress(range(1, cfg.steps + 1), desc="image matcher"):
        idx = torch.randint(0, n, (bs,), generator=rng)
        x = images[idx]
        if cfg.hflip:
            flip = torch.rand(bs, generator=rng) < 0.5
            x = _flip_where(flip, x)
        present, target = torch.unique(labels[idx], return_inverse=True)  # (U,), (B,)
        logits = model.logits(model.encode_images(x), model.encode_texts(ids[present], mask[present]))  # (B, U)
        loss = F.cross_entropy(logits, target)
        if cfg.symmetric:
            own = F.one_hot(target, len(present)).T.bool()  # (U, B): caption u is picture b's
            by_text = logits.T  # (U, B)
            loss = 0.5 * loss + 0.5 * (by_text.logsumexp(1) - by_text.masked_fill(~own, -torch.inf).logsumexp(1)).mean()
        if keys:  # the region head has its own parameters: its loss leaves the global matcher's gradients alone
            c, region_x, region_y, contact = cells[idx], x, region_labels[idx], None
            if cfg.hflip:
                c = _flip_where(flip, c)
            if mcfg.region_contact:  # the clean pictures' cells touch nowhere; the copies' contact cells do
                j = torch.randint(0, len(copy_images), (cfg.contact_batch,), generator=copy_rng)
                cx, cc, ct = copy_images[j], copy_cells[j], copy_contact[j]
                if cfg.hflip:
                    cflip = torch.rand(len(j), generator=copy_rng) < 0.5
                    cx, cc, ct = (_flip_where(cflip, t) for t in (cx, cc, ct))
                region_x, region_y = torch.cat([x, cx]), torch.cat([region_y, copy_labels[j]])
                contact = torch.cat([torch.zeros_like(c), ct])
                c = torch.cat([c, cc])
            region, *_ = region_loss(model, region_x, c, region_y, contact)
            loss = loss + region
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        out_of_time = cfg.max_seconds > 0 and time.perf_counter() - t0 >= cfg.max_seconds
        if step % cfg.log_every == 0 or step == cfg.steps or out_of_time:
            acc = (logits.argmax(1) == target).float().mean().item()
            logger.log(step, loss=loss.item(), batch_top1=acc, lr=sched.get_last_lr()[0],
                       scale=model.log_scale.exp().item())
        if out_of_time:
            print(f"image matcher: max_seconds={cfg.max_seconds:g} reached after {step}/{cfg.steps} steps")
            break
    seconds = time.perf_counter() - t0
    pool = sorted(set(train.texts) | set(val.texts))
    top1, confusions = retrieval_top1(model, val_images, val.texts, pool, encode)
    logger.log(step, val_top1=top1, train_seconds=round(seconds, 1))
    region_report = {}
    if keys:
        model.eval()
        with torch.no_grad():
            calls = [region_loss(model, val_images[s:s + 512], val_cells[s:s + 512], val_labels[s:s + 512])
                     for s in range(0, len(val_images), 512)]
        is_obj = torch.cat([c[1] for c in calls])
        region_report = {"object_cells_right": float((is_obj == val_cells).float().mean())}
        for i, name in enumerate(keys):
            value = torch.cat([c[2][i] for c in calls])
            target = val_labels[:, i, None, None].expand_as(val_cells)
            region_report[f"{name}_right_on_object_cells"] = float((value == target)[val_cells].float().mean())
        if mcfg.region_contact:  # a picture is called touching when its most contact-like cell's logit is > 0
            clean = torch.cat([c[3].flatten(1).amax(1) > 0 for c in calls])
            with torch.no_grad():
                found = torch.cat([model.region_logits(val_copy_images[s:s + 512])[2].flatten(1).amax(1) > 0
                                   for s in range(0, len(val_copy_images), 512)])
            region_report["contact_clean_pictures_right"] = float((~clean).float().mean())
            region_report["contact_touching_copies_found"] = float(found.float().mean())
        print("image matcher region head (val): " + ", ".join(f"{k} {v:.3f}" for k, v in region_report.items()))
    logger.close()
    model.save(out, metadata={"fingerprint": key, "steps": str(step)})
    report.write_text(json.dumps({
        "val_top1": top1, "steps": step, "train_seconds": round(seconds, 1), "val_items": len(val.texts),
        "captions": len(pool), "skipped_documents": {"train": train.skipped, "val": val.skipped},
        "most_confused": [{"caption": a, "read_as": b, "count": c} for (a, b), c in confusions.most_common(10)],
        "region_head": region_report,
    }, indent=2) + "\n")
    return MatcherResult(out, top1, step)


__all__ = ["MatcherStageConfig", "MatcherResult", "CaptionedImages", "TouchingCopies", "box_cells",
           "load_captioned_images", "region_loss", "region_targets", "region_values", "retrieval_top1",
           "touching_copies", "train_matcher"]
