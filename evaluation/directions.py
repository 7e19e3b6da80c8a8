"""What an evaluation talks to: a model seen as the four directions it is scored on, and the batching of prompts.

Any object with these methods is evaluated (the generation pipeline through ``run_eval.PipelineModel``, or a fake
in a test), so a perfect fake scores 100% and a constant one chance under every judge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from anyloom.progress import progress


class AnyToAny(Protocol):
    def text_to_image(self, captions: list[str]) -> list[np.ndarray]: ...  # (H, W, 3) uint8 each

    def image_to_text(self, images: list[np.ndarray]) -> list[str]: ...

    def speech_to_text(self, waves: list[np.ndarray], sample_rate: int) -> list[str]: ...

    def text_to_speech(self, captions: list[str]) -> tuple[list[np.ndarray], int]: ...


def batches(items: list, batch_size: int, desc: str) -> Iterator[list]:
    """``items`` in consecutive batches of ``batch_size``, with a progress bar named ``desc``."""
    for start in progress(range(0, len(items), batch_size), desc=desc):
        yield items[start:start + batch_size]


def per_split(splits: dict[str, list], score: Callable[[list], dict[str, Any]]) -> dict[str, Any]:
    """``score(items)`` of every split: the ``test`` split's at the top level (eval.json's headline), every other
    split's under its name."""
    out: dict[str, Any] = {}
    for split, items in splits.items():
        if split == "test":
            out.update(score(items))
        else:
            out[split] = score(items)
    return out


__all__ = ["AnyToAny", "batches", "per_split"]
