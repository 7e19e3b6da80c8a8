"""The in-memory form of one interleaved document: an ordered list of text, image and audio segments.

Manifests (JSONL, webdataset shards) and the world generator produce these; pre-tokenization consumes them.
Images are decoded RGB pixels and audio is mono float at a known rate, so nothing downstream touches files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np


@dataclass
class TextSegment:
    text: str


@dataclass
class ImageSegment:
    pixels: np.ndarray  # (H, W, 3) uint8 RGB
    path: str | None = None  # where it came from, for error messages


@dataclass
class AudioSegment:
    wave: np.ndarray  # (T,) float32 mono in [-1, 1]
    sample_rate: int
    path: str | None = None


Segment = TextSegment | ImageSegment | AudioSegment
S = TypeVar("S", TextSegment, ImageSegment, AudioSegment)


@dataclass
class Document:
    segments: list[Segment]
    id: str = ""  # stable identifier (the world's item id, or "<manifest>:<line>")
    meta: dict[str, Any] = field(default_factory=dict)  # free-form, e.g. the world's count/colour/shape
    # the LM task templates this document may serve (sequences/mixture.py: "interleaved", "t2i", ...); None: any.
    # An instruction ("draw two red circles and say it" + picture + speech) is only an interleaved document: as a
    # caption it would teach image->text to answer with instructions.
    tasks: tuple[str, ...] | None = None

    def first(self, kind: type[S]) -> S | None:
        """The first segment of type ``kind`` (TextSegment, ImageSegment or AudioSegment), or None."""
        return next((s for s in self.segments if isinstance(s, kind)), None)
