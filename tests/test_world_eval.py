"""The evaluation harness itself: a judge-perfect model scores 100%, a random one scores about chance."""

from __future__ import annotations

import numpy as np
import pytest

from anyloom.data.captions import COLORS, NUMBER_WORDS, SHAPES, parse_caption
from anyloom.data.manifest import read_manifest
from anyloom.data.render import render_scene
from anyloom.evaluation.world_eval import evaluate_world, items_from_documents


class PerfectModel:
    """Renders the asked-for scene, and reads images / speech back from the items it was built from."""

    def __init__(self, items):
        self.caption_of_image = {it.pixels.tobytes(): it.caption for it in items}
        self.caption_of_wave = {it.wave.tobytes(): it.caption for it in items}
        self.wave_of_caption = {it.caption: it.wave for it in items}
        self.rng = np.random.default_rng(0)

    def text_to_image(self, captions):
        return [render_scene(self.rng, parse_caption(c)).pixels for c in captions]

    def image_to_text(self, images):
        return [self.caption_of_image[p.tobytes()] for p in images]

    def speech_to_text(self, waves, sample_rate):
        return [self.caption_of_wave[w.tobytes()] for w in waves]

    def text_to_speech(self, captions):
        return [self.wave_of_caption[c] for c in captions], 16000


class RandomModel:
    def __init__(self):
        self.rng = np.random.default_rng(1)

    def _caption(self):
        count = int(self.rng.integers(1, 5))
        color, shape = self.rng.choice(COLORS), self.rng.choice(SHAPES)
        return f"{NUMBER_WORDS[count - 1]} {color} {shape}{'s' if count > 1 else ''}"

    def text_to_image(self, captions):
        return [self.rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in captions]

    def image_to_text(self, images):
        return [self._caption() for _ in images]

    def speech_to_text(self, waves, sample_rate):
        return [self._caption() for _ in waves]

    def text_to_speech(self, captions):
        return [self.rng.normal(0, 0.1, 16000).astype(np.float32) for _ in captions], 16000


@pytest.fixture(scope="module")
def items(tiny_world):
    return items_from_documents(read_manifest(tiny_world.test).documents)


def test_perfect_model_scores_perfectly(items):
    scores = evaluate_world(PerfectModel(items), {"test": items}, directions=("t2i", "i2t", "a2t"))
    assert scores["t2i"]["attr_acc"] == 1.0 and scores["t2i"]["unreadable"] == 0.0
    assert scores["i2t"]["exact"] == 1.0 and scores["a2t"]["wer"] == 0.0


def test_random_model_scores_about_chance(items):
    scores = evaluate_world(RandomModel(), {"test": items, "compositional": items}, directions=("t2i", "i2t", "a2t"))
    assert scores["t2i"]["attr_acc"] == 0.0  # noise is never read as a scene
    assert scores["i2t"]["exact"] < 0.2  # chance is 1 / (4 counts x 8 colours x 4 shapes)
    assert scores["i2t"]["count_acc"] < 0.6 and scores["a2t"]["wer"] > 0.5
    assert set(scores["compositional"]) == {"t2i", "i2t", "a2t"}
