"""Pictures from a manifest: every trainer that learns from images (image tokenizer, diffusion decoder, image-text
matcher) reads its splits through :func:`load_images`.

    load_images(manifest, image_size)                     every distinct image segment, documents in order
    load_images(manifest, image_size, captioned=True)     each document's first (text, image) pair, with its meta
                                                          (not documents whose "tasks" exclude captioning)
    PictureStream(manifest, image_size)                   a torch Dataset that decodes each picture when asked:
                                                          corpora too large to hold decoded in memory

A picture file that several documents name (a corpus repeating its pictures under other texts, e.g. instruction
documents) is read once by :func:`load_images` and :class:`PictureStream`: a trainer of pictures learns each picture
once, whatever the documents around it. The repeats are counted (``repeated``); the captioned pairs keep every
document, since their texts differ.

Two ways to meet a bad document. ``strict=True`` (the default): the manifest reader raises at the first
unreadable document, and a picture of another size than ``image_size`` is an error naming its file.
``strict=False``: unreadable documents are skipped and counted (their reasons kept), and the reader resizes every
picture to ``image_size``. Either way documents without what was asked for (an image; with ``captioned`` a
non-blank text too) are counted as skipped.

Axis legend: N pictures, H/W image size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from anyloom.data.document import Document, ImageSegment, TextSegment
from anyloom.data.manifest import (
    Decoding,
    ManifestError,
    PictureRef,
    index_pictures,
    read_manifest,
    read_picture,
)

MAX_REASONS = 20  # skip messages kept per set (the count covers them all)


@dataclass
class ImageSet:
    pixels: np.ndarray  # (N, H, W, 3) uint8, in document order
    skipped: int  # documents skipped: unreadable (strict=False) or without what was asked for
    reasons: list[str] = field(default_factory=list)  # the reader's skip messages ("file:line: why"), the first 20
    captions: list[str] = field(default_factory=list)  # captioned=True: each picture's text
    meta: list[dict] = field(default_factory=list)  # captioned=True: each picture's document meta
    ids: list[str] = field(default_factory=list)  # captioned=True: each picture's document id
    repeated: int = 0  # image segments naming a picture file an earlier document named (read once)


def _checked(px: np.ndarray, image_size: tuple[int, int], manifest: str | Path, name: str) -> np.ndarray:
    """``px`` if it is (H, W, 3) uint8 of ``image_size``; else an error naming the manifest and the picture."""
    px = np.asarray(px)
    if px.dtype != np.uint8 or px.ndim != 3 or px.shape[2] != 3:
        raise ValueError(f"{manifest}: {name}: expected (H, W, 3) uint8 pixels, got {px.shape} {px.dtype}")
    if tuple(px.shape[:2]) != tuple(image_size):
        raise ValueError(f"{manifest}: {name}: image is {px.shape[0]}x{px.shape[1]}, the tokenizer and decoder "
                         f"expect {image_size[0]}x{image_size[1]} (H x W)")
    return px


# a document that names its tasks is a caption pair only where it may serve one of these: an instruction for the
# interleaved task ("draw two red circles and say it") is not a caption of its picture
CAPTION_TASKS = ("t2i", "i2t")


def _caption_pair(doc: Document) -> tuple[TextSegment, ImageSegment] | None:
    if doc.tasks is not None and not set(doc.tasks) & set(CAPTION_TASKS):
        return None
    text, image = doc.first(TextSegment), doc.first(ImageSegment)
    if text is None or image is None or not text.text.strip():
        return None
    return text, image


def load_images(manifest: str | Path, image_size: tuple[int, int], *, limit: int = 0, strict: bool = True,
                captioned: bool = False) -> ImageSet:
    """The pictures of ``manifest`` (see the module docstring); ``limit`` > 0 keeps the first ``limit``."""
    size = tuple(image_size)
    result = read_manifest(manifest, strict=strict, image_size=None if strict else size)
    out = ImageSet(pixels=np.zeros((0, *size, 3), np.uint8), skipped=len(result.skipped),
                   reasons=[f"{s.source}: {s.reason}" for s in result.skipped[:MAX_REASONS]])
    pixels: list[np.ndarray] = []
    seen: set[str] = set()  # picture files already read
    for doc in result.documents:
        if captioned:
            pair = _caption_pair(doc)
            if pair is None:
                out.skipped += 1
                continue
            text, image = pair
            pixels.append(_checked(image.pixels, size, manifest, image.path or doc.id))
            out.captions.append(text.text)
            out.meta.append(doc.meta)
            out.ids.append(doc.id)
        else:
            segments = [s for s in doc.segments if isinstance(s, ImageSegment)]
            out.skipped += not segments
            for seg in segments:
                if seg.path is not None:
                    if seg.path in seen:
                        out.repeated += 1
                        continue
                    seen.add(seg.path)
                pixels.append(_checked(seg.pixels, size, manifest, seg.path or doc.id))
                if limit and len(pixels) >= limit:
                    break
        if limit and len(pixels) >= limit:
            break
    if not pixels:
        wanted = "document with both a text and an image segment" if captioned else "readable image segments"
        raise ValueError(f"{manifest}: no {wanted} ({result.summary}, {out.skipped} skipped in all)")
    out.pixels = np.stack(pixels[:limit] if limit else pixels)
    return out


class PictureStream:
    """The pictures of a manifest (JSONL or uncompressed webdataset shards) as a map-style torch Dataset: indexing
    reads lines and tar headers only; ``stream[i]`` reads and decodes picture ``i`` (resized to ``image_size`` by
    ``fit``). A picture that cannot be read gives its reason (a string, "file:line: why") instead of pixels, so
    a loader can count and report it without losing the batch: :func:`collate_pictures`."""

    def __init__(self, manifest: str | Path, image_size: tuple[int, int], fit: str = "resize"):
        index = index_pictures(manifest)
        if not index.refs:
            raise ValueError(f"{manifest}: no image segments ({len(index.skipped)} documents skipped)")
        first: dict[tuple[str, int], PictureRef] = {}
        for ref in index.refs:  # each picture once, where it is first named
            first.setdefault((ref.file, ref.offset), ref)
        refs = list(first.values())
        self.refs, self.skipped = refs, index.skipped
        self.repeated = len(index.refs) - len(refs)  # references to a picture an earlier one named
        self.decoding = Decoding(image_size=tuple(image_size), image_fit=fit)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> np.ndarray | str:
        try:
            return read_picture(self.refs[i], self.decoding)
        except ManifestError as e:
            return str(e)


@dataclass
class PictureBatch:
    pixels: torch.Tensor  # (B', 3, H, W) float in [-1, 1]: the readable pictures of the batch
    unreadable: list[str]  # the others' reasons


def collate_pictures(items: list[np.ndarray | str]) -> PictureBatch:
    """A DataLoader's ``collate_fn`` for :class:`PictureStream`: pixels stacked, unreadable pictures listed."""
    good = [x for x in items if not isinstance(x, str)]
    pixels = torch.zeros(0)
    if good:  # the arithmetic of tokenizers.image_vq.uint8_to_float, so both loaders give the same floats
        pixels = (torch.from_numpy(np.stack(good)).float() / 255.0 * 2.0 - 1.0).permute(0, 3, 1, 2).contiguous()
    return PictureBatch(pixels=pixels, unreadable=[x for x in items if isinstance(x, str)])


__all__ = ["ImageSet", "load_images", "PictureStream", "PictureBatch", "collate_pictures"]
