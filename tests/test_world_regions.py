"""The world's region head for the image-text matcher (world/regions.py): a matcher head plug-in trained in the
matcher's steps, and the touching copies its contact logit learns from."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_matcher import SMALL, _Sized, _Words, _write_manifest

from anyloom.matcher.model import HeadSpec, ImageTextMatcher, to_unit
from anyloom.training.matcher import MatcherStageConfig, load_pairs, train_matcher
from anyloom.training.run import RunDir
from anyloom.world.regions import RegionHead, RegionOptions, box_cells, colorless, touching_copies

COLOR = {"name": "world_regions", "keys": ["color"], "channels": 16}


def _boxed_manifest(folder: Path, name: str, n: int, seed: int, drop_key: bool = False) -> Path:
    """Two same-colour 6 x 6 squares, one in the left and one in the right half, with their boxes and colour in
    meta (the layout the world writes); the text is the colour."""
    rng = np.random.default_rng(seed)
    colours = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60)}
    lines = []
    for i in range(n):
        colour = str(rng.choice(list(colours)))
        px = rng.integers(90, 130, (16, 16, 3)).astype(np.uint8)
        boxes = []
        for x0 in (int(rng.integers(0, 2)), 8 + int(rng.integers(0, 2))):
            y0 = int(rng.integers(0, 10))
            px[y0:y0 + 6, x0:x0 + 6] = colours[colour]
            boxes.append([x0, y0, x0 + 6, y0 + 6])
        Image.fromarray(px).save(folder / f"{name}{i}.png")
        meta = {"boxes": boxes} if drop_key and i == 3 else {"color": colour, "boxes": boxes}
        lines.append(json.dumps({"id": f"{name}-{i}", "segments": [{"text": colour}, {"image": f"{name}{i}.png"}],
                                 "meta": meta}))
    return _write_manifest(folder, name, lines)


def test_region_head_learns_object_labels_and_scores_an_odd_object_down(tmp_path):
    train, val = _boxed_manifest(tmp_path, "train", 96, 0), _boxed_manifest(tmp_path, "val", 24, 1)
    cfg = MatcherStageConfig(model=SMALL, head=COLOR, steps=120, batch_size=32, reconstructions=False)
    result = train_matcher(cfg, _Sized(), _Words(), train, val, RunDir(tmp_path / "run"))
    report = json.loads((tmp_path / "run" / "matcher_val.json").read_text())["head"]
    assert report["object_cells_right"] >= 0.85 and report["color_right_on_object_cells"] >= 0.9
    again = train_matcher(cfg, _Sized(), _Words(), train, val, RunDir(tmp_path / "run"))
    assert again.up_to_date
    m = ImageTextMatcher.load(result.folder)
    assert isinstance(m.head, RegionHead) and m.head.cfg.values == (("blue", "green", "red"),)  # from the data
    # the global matcher is the one trained without the head: same steps, same batches, its own parameters
    plain = train_matcher(replace(cfg, head=None), _Sized(), _Words(), train, val, RunDir(tmp_path / "plain"))
    alone = ImageTextMatcher.load(plain.folder).state_dict()
    assert set(alone) == {k for k in m.state_dict() if not k.startswith("head.")}
    assert all(torch.equal(alone[k], v) for k, v in m.state_dict().items() if not k.startswith("head."))
    # two red squares vs a red and a blue one (never seen in training): the odd object costs consistency
    same = np.full((2, 16, 16, 3), 110, dtype=np.uint8)
    same[:, 4:10, 1:7] = (220, 40, 40)
    same[:, 4:10, 9:15] = (220, 40, 40)
    same[1, 4:10, 9:15] = (40, 70, 220)
    score = m.head.consistency(same)
    assert score.dtype == torch.float32 and score.shape == (2,)
    assert score[0] > -0.5 and score[1] < score[0] - 1.0
    assert ImageTextMatcher.load(plain.folder).head is None
    bad = _boxed_manifest(tmp_path, "bad", 8, 2, drop_key=True)
    with pytest.raises(ValueError, match=r"bad-3.*meta\.color"):
        train_matcher(cfg, _Sized(), _Words(), bad, val, RunDir(tmp_path / "bad"))
    with pytest.raises(ValueError, match="without their values"):
        ImageTextMatcher(SMALL, HeadSpec("world_regions", RegionOptions(keys=("color",))))


def _single_square_manifest(folder: Path, name: str, n: int, seed: int) -> Path:
    """One 5 x 5 square per 16 x 16 picture (red or blue), its box and colour in meta."""
    rng = np.random.default_rng(seed)
    colours = {"red": (220, 40, 40), "blue": (40, 70, 220)}
    lines = []
    for i in range(n):
        colour = str(rng.choice(list(colours)))
        px = np.full((16, 16, 3), int(rng.integers(90, 130)), dtype=np.uint8)
        x0, y0 = (int(v) for v in rng.integers(1, 11, 2))
        px[y0:y0 + 5, x0:x0 + 5] = colours[colour]
        Image.fromarray(px).save(folder / f"{name}{i}.png")
        lines.append(json.dumps({"id": f"{name}-{i}", "segments": [{"text": colour}, {"image": f"{name}{i}.png"}],
                                 "meta": {"color": colour, "boxes": [[x0, y0, x0 + 5, y0 + 5]]}}))
    return _write_manifest(folder, name, lines)


def test_touching_copies_place_a_copy_against_an_object_and_change_nothing_else(tmp_path):
    data = load_pairs(_single_square_manifest(tmp_path, "t", 20, 0), (16, 16))
    copies = touching_copies(data, 30, np.random.default_rng(0), "t.jsonl")
    assert copies.pixels.shape == (30, 16, 16, 3) and copies.contact.shape == copies.cells.shape == (30, 4, 4)
    for px, src, cells, contact in zip(copies.pixels, copies.source, copies.cells, copies.contact):
        before = data.pixels[src]
        changed = np.argwhere((px != before).any(-1))
        assert len(changed) >= 10  # a 5 x 5 square drawn (partly over its neighbour)
        x0, y0, x1, y1 = data.meta[src]["boxes"][0]
        # the copy lies within 2 px of the square it copies (it touches or overlaps it) and has its colour
        gaps = np.maximum(np.maximum(x0 - changed[:, 1] - 1, changed[:, 1] - x1 + 1),
                          np.maximum(y0 - changed[:, 0] - 1, changed[:, 0] - y1 + 1))
        assert gaps.min() <= 2
        assert (np.abs(px[changed[:, 0], changed[:, 1]].astype(int) - before[y0, x0]).max(-1) <= 2).mean() > 0.5
        assert contact.any() and cells.sum() > box_cells([[x0, y0, x1, y1]], 16, 16).sum() - 1
    with pytest.raises(ValueError, match="no document has meta.boxes"):
        touching_copies(replace(data, meta=[{} for _ in data.meta]), 3, np.random.default_rng(0), "t.jsonl")
    crowded = replace(data, meta=[{"boxes": [[0, 0, 16, 16]]} for _ in data.meta])  # no room anywhere
    with pytest.raises(ValueError, match=r"t\.jsonl: made only 0 of 3 touching copies"):
        touching_copies(crowded, 3, np.random.default_rng(0), "t.jsonl")


def test_region_contact_learns_to_flag_two_objects_run_together(tmp_path):
    train = _single_square_manifest(tmp_path, "train", 96, 0)
    val = _single_square_manifest(tmp_path, "val", 32, 1)
    contact = {**COLOR, "contact": True, "contact_copies": 96, "contact_batch": 16}
    cfg = MatcherStageConfig(model=SMALL, head=contact, steps=150, batch_size=32, reconstructions=False)
    result = train_matcher(cfg, _Sized(), _Words(), train, val, RunDir(tmp_path / "run"))
    report = json.loads((tmp_path / "run" / "matcher_val.json").read_text())["head"]
    assert report["contact_clean_pictures_right"] >= 0.8 and report["contact_touching_copies_found"] >= 0.8
    m = ImageTextMatcher.load(result.folder)
    # the global matcher is the same as without the contact logit (the copies only reach the region head)
    plain = ImageTextMatcher.load(train_matcher(replace(cfg, head=None), _Sized(), _Words(), train, val,
                                                RunDir(tmp_path / "plain")).folder).state_dict()
    assert all(torch.equal(plain[k], v) for k, v in m.state_dict().items() if not k.startswith("head."))
    # one red square vs two run together into a 5 x 10 bar (never seen as such in training)
    pics = np.full((2, 16, 16, 3), 110, dtype=np.uint8)
    pics[:, 5:10, 3:8] = (220, 40, 40)
    pics[1, 5:10, 8:13] = (220, 40, 40)
    score = m.head.consistency(pics)
    assert score[1] < score[0] - 1.0


def test_colorblind_region_keys_read_shapes_without_colour(tmp_path):
    pics = np.full((2, 16, 16, 3), 110, dtype=np.uint8)
    pics[0, 4:10, 3:9] = (220, 40, 40)
    pics[1, 4:10, 3:9] = (40, 70, 220)  # the same square in another colour
    x = to_unit(pics)
    maps = colorless(x)
    assert maps.shape == (2, 1, 16, 16) and torch.allclose(maps[0], maps[1], atol=1e-6)
    assert maps[0, 0, 5, 5] == 1 and maps[0, 0, 0, 0] == 0
    torch.manual_seed(0)
    cfg = RegionOptions(keys=("shape", "color"), values=(("circle", "square"), ("blue", "red")), channels=16,
                        colorblind=("shape",), contact=True)
    m = ImageTextMatcher(SMALL, HeadSpec("world_regions", cfg)).eval()
    obj, (shape, colour), contact = m.head.region_logits(x)
    assert shape.shape == colour.shape == (2, 2, 4, 4) and obj.shape == contact.shape == (2, 4, 4)
    assert torch.allclose(shape[0], shape[1], atol=1e-5)  # the shape head cannot see the colour
    assert not torch.allclose(colour[0], colour[1], atol=1e-3)
    again = ImageTextMatcher.load(m.save(tmp_path / "m"))
    assert torch.equal(again.head.consistency(pics), m.head.consistency(pics))
    with pytest.raises(ValueError, match="colorblind key 'size' is not one of keys"):
        replace(cfg, colorblind=("size",))
