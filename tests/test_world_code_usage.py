"""scripts/world_code_usage.py: which codes a tokenizer uses for the world's colours and shapes (on a fake world)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import world_code_usage as wcu

from anyloom.data.document import Document, ImageSegment, TextSegment
from anyloom.data.manifest import ManifestResult
from anyloom.tokenizers.image_quantizers import QuantizerConfig
from anyloom.tokenizers.image_vq import ImageVQConfig, ImageVQTokenizer

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def picture(colour: str, shape: str, rng: np.random.Generator) -> Document:
    px = np.zeros((16, 16, 3), np.uint8)
    x, y = (int(v) for v in rng.integers(0, 8, 2))
    if shape == "square":
        px[y:y + 8, x:x + 8] = COLOURS[colour]
    else:  # a diagonal bar
        for i in range(8):
            px[y + i, x + i:x + i + 2] = COLOURS[colour]
    meta = {"color": colour, "shape": shape, "boxes": [[x, y, x + 8, y + 8]]}
    return Document([TextSegment(f"one {colour} {shape}"), ImageSegment(px)], meta=meta)


class FakeWorld:
    def __init__(self, splits: dict[str, list[Document]]):
        self.splits = splits

    def split(self, name: str) -> str:
        return name


def test_object_cells_cover_the_boxes_cells():
    assert wcu.object_cells([[0, 0, 8, 8]], (4, 4), (16, 16)) == [0, 1, 4, 5]
    assert wcu.object_cells([[5.5, 0, 6, 3.9]], (4, 4), (16, 16)) == [1]
    assert wcu.object_cells([[12, 12, 16, 16], [0, 0, 1, 1]], (4, 4), (16, 16)) == [0, 15]


def test_code_usage_reads_training_codes_and_bounds_its_information(monkeypatch):
    rng = np.random.default_rng(0)
    train = [picture(c, s, rng) for c in ("red", "blue") for s in ("square", "bar") for _ in range(6)]
    unseen = [picture("green", "square", rng) for _ in range(4)]
    monkeypatch.setattr(wcu, "read_manifest",
                        lambda name: ManifestResult({"train": train, "unseen": unseen}[str(name)]))
    torch.manual_seed(0)
    tokenizer = ImageVQTokenizer(ImageVQConfig(image_size=(16, 16), patch=1, channels=(8, 16), dec_blocks=(1, 1),
                                               latent_dim=8, norm_groups=4,
                                               quantizer=QuantizerConfig(kind="fsq", fsq_levels=(5, 4, 3)))).eval()
    result = wcu.code_usage(tokenizer, FakeWorld({}), ["train", "unseen"], train_limit=0)
    assert result["train_pictures"] == len(train)
    # a training picture's codes are all seen with its own colour and shape
    assert result["train"]["unseen_with_colour"] == result["train"]["unseen_with_shape"] == 0.0
    assert result["unseen"]["pictures"] == 4
    assert result["unseen"]["unseen_with_colour"] == 1.0  # no training picture is green
    assert 0.0 <= result["unseen"]["unseen_with_shape"] <= 1.0
    assert 0.0 <= result["unseen"]["pictures_with_unseen_shape_code"] <= 1.0
    info = result["digit_information"]
    assert info["colour_entropy"] == pytest.approx(math.log(2), abs=1e-3)
    assert info["shape_entropy"] <= math.log(2) + 1e-9
    for d in range(3):  # a digit is a function of the code: it cannot tell more about the colour than the code
        digit = info[f"digit_{d}"]
        assert -1e-9 <= digit["colour"] <= min(digit["entropy"], info["code"]["colour"]) + 1e-9
        assert -1e-9 <= digit["shape"] <= info["code"]["shape"] + 1e-9
