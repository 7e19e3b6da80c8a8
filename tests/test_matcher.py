"""The image-text matcher (generation/matcher.py) and its training stage (training/matcher.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anyloom.generation.matcher import ImageTextMatcher, MatcherConfig, colorless, to_unit
from anyloom.training.matcher import (
    MatcherStageConfig,
    box_cells,
    load_captioned_images,
    touching_copies,
    train_matcher,
)
from anyloom.training.run import RunDir

SMALL = MatcherConfig(image_size=(16, 16), channels=(8, 8, 16), hidden=32, dim=16, text_vocab=50, max_text_tokens=4)


def test_scores_are_paired_cosines_and_survive_save_and_load(tmp_path):
    torch.manual_seed(0)
    m = ImageTextMatcher(SMALL).eval()
    pixels = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    texts = [[1, 2], [3], [4, 5, 6, 7, 8, 9]]  # the last is cut at max_text_tokens
    s = m.similarity(pixels, texts)
    floats = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.allclose(m.similarity(floats, texts), s)
    assert torch.allclose(m.similarity(floats.double().numpy(), texts), s)  # float64 arrays are cast
    assert torch.allclose(m.similarity(pixels, [[1, 2], [3], [4, 5, 6, 7]]), s)
    # paired: image i against text i is the diagonal of the full score matrix
    ids, mask = m.text_batch(texts)
    full = m.logits(m.encode_images(floats), m.encode_texts(ids, mask))
    assert torch.allclose(full.diagonal(), s, atol=1e-5)
    assert (s.abs() <= m.log_scale.exp() + 1e-4).all()
    again = ImageTextMatcher.load(m.save(tmp_path / "matcher"))
    assert torch.equal(again.similarity(pixels, texts), s)


def test_bad_inputs_get_clear_errors(tmp_path):
    m = ImageTextMatcher(SMALL)
    px = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="outside the matcher's vocabulary"):
        m.similarity(px, [[1], [50]])
    with pytest.raises(ValueError, match="empty text"):
        m.similarity(px, [[1], []])
    with pytest.raises(ValueError, match="2 images and 1 texts"):
        m.similarity(px, [[1]])
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        m.similarity(np.zeros((1, 8, 8, 3), dtype=np.uint8), [[1]])
    with pytest.raises(ValueError, match="multiples of 8"):
        MatcherConfig(image_size=(12, 16))
    with pytest.raises(ValueError, match="logit_scale"):
        MatcherConfig(logit_scale=-1.0)
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"kind": "image_vq"}))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="not an image-text matcher"):
        ImageTextMatcher.load(folder)


class _Words:
    """A word-level stand-in for the text tokenizer (encode, vocab_size, fingerprint)."""

    words = ["<pad>", "red", "blue", "green", "left", "right"]
    vocab_size = len(words)
    fingerprint = "words-v1"

    def encode(self, text: str) -> list[int]:
        return [self.words.index(w) for w in text.split()]


class _Sized:
    image_size = (16, 16)


def _write_manifest(folder: Path, name: str, lines: list[str]) -> Path:
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _manifest(folder: Path, name: str, n: int, seed: int) -> Path:
    """Documents 'colour side': a coloured square on the left or right half of a noisy grey picture; one document
    has no image (counted as skipped)."""
    rng = np.random.default_rng(seed)
    colours = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60)}
    lines = []
    for i in range(n):
        colour, side = rng.choice(list(colours)), rng.choice(["left", "right"])
        px = rng.integers(90, 130, (16, 16, 3)).astype(np.uint8)
        x0 = int(rng.integers(0, 3)) + (0 if side == "left" else 8)
        y0 = int(rng.integers(0, 9))
        px[y0:y0 + 6, x0:x0 + 6] = colours[colour]
        Image.fromarray(px).save(folder / f"{name}{i}.png")
        lines.append(json.dumps({"segments": [{"text": f"{colour} {side}"}, {"image": f"{name}{i}.png"}]}))
    lines.append(json.dumps({"segments": [{"text": "red left"}]}))
    return _write_manifest(folder, name, lines)


def test_training_learns_the_captions_and_is_skipped_when_up_to_date(tmp_path):
    train, val = _manifest(tmp_path, "train", 96, 0), _manifest(tmp_path, "val", 24, 1)
    cfg = MatcherStageConfig(model=SMALL, steps=80, batch_size=32, reconstructions=False, log_every=20)
    run = RunDir(tmp_path / "run")
    result = train_matcher(cfg, _Sized(), _Words(), train, val, run)
    assert not result.up_to_date and result.steps == 80
    assert result.val_top1 >= 0.9  # 6 captions: chance is 1/6; colour and side must both be read
    report = json.loads((run.path / "matcher_val.json").read_text())
    assert report["skipped_documents"] == {"train": 1, "val": 1} and report["captions"] == 6
    weights = result.folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = train_matcher(cfg, _Sized(), _Words(), train, val, run)
    assert again.up_to_date and again.val_top1 == result.val_top1 and weights.stat().st_mtime_ns == stamp
    changed = train_matcher(MatcherStageConfig(model=SMALL, steps=10, batch_size=32, reconstructions=False), _Sized(),
                            _Words(), train, val, run)
    assert not changed.up_to_date and changed.steps == 10
    m = ImageTextMatcher.load(changed.folder)
    assert m.cfg.text_vocab == _Words.vocab_size and tuple(m.cfg.image_size) == (16, 16)
    # a fixed logit scale stays where it was put while the rest learns
    fixed = replace(SMALL, logit_scale=5.0)
    result = train_matcher(MatcherStageConfig(model=fixed, steps=40, batch_size=32, reconstructions=False), _Sized(),
                           _Words(), train, val, RunDir(tmp_path / "fixed"))
    m = ImageTextMatcher.load(result.folder)
    assert m.log_scale.exp().item() == pytest.approx(5.0) and m.cfg.logit_scale == 5.0 and result.val_top1 >= 0.9


def test_a_manifest_without_pictures_is_refused(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"segments": [{"text": "red left"}]}) + "\n")
    with pytest.raises(ValueError, match="no document with both a text and an image"):
        train_matcher(MatcherStageConfig(model=SMALL, reconstructions=False), _Sized(), _Words(), path, path,
                      RunDir(tmp_path / "run"))


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
    regional = replace(SMALL, region_keys=("color",), region_channels=16)
    cfg = MatcherStageConfig(model=regional, steps=120, batch_size=32, reconstructions=False)
    result = train_matcher(cfg, _Sized(), _Words(), train, val, RunDir(tmp_path / "run"))
    report = json.loads((tmp_path / "run" / "matcher_val.json").read_text())["region_head"]
    assert report["object_cells_right"] >= 0.85 and report["color_right_on_object_cells"] >= 0.9
    again = train_matcher(cfg, _Sized(), _Words(), train, val, RunDir(tmp_path / "run"))
    assert again.up_to_date
    m = ImageTextMatcher.load(result.folder)
    assert m.cfg.region_values == (("blue", "green", "red"),)  # read from the data, sorted
    # the global matcher is the one trained without the head: same steps, same batches, its own parameters
    plain = train_matcher(replace(cfg, model=SMALL), _Sized(), _Words(), train, val, RunDir(tmp_path / "plain"))
    alone = ImageTextMatcher.load(plain.folder).state_dict()
    assert all(torch.equal(alone[k], v) for k, v in m.state_dict().items() if not k.startswith("regions."))
    # two red squares vs a red and a blue one (never seen in training): the odd object costs consistency
    same = np.full((2, 16, 16, 3), 110, dtype=np.uint8)
    same[:, 4:10, 1:7] = (220, 40, 40)
    same[:, 4:10, 9:15] = (220, 40, 40)
    same[1, 4:10, 9:15] = (40, 70, 220)
    score = m.consistency(same)
    assert score[0] > -0.5 and score[1] < score[0] - 1.0
    with pytest.raises(ValueError, match="no region head"):
        ImageTextMatcher.load(plain.folder).consistency(same)
    bad = _boxed_manifest(tmp_path, "bad", 8, 2, drop_key=True)
    with pytest.raises(ValueError, match=r"bad-3.*meta\.color"):
        train_matcher(cfg, _Sized(), _Words(), bad, val, RunDir(tmp_path / "bad"))
    with pytest.raises(ValueError, match="without their values"):
        ImageTextMatcher(regional)


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
    data = load_captioned_images(_single_square_manifest(tmp_path, "t", 20, 0), (16, 16))
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
    with pytest.raises(ValueError, match="region_contact needs the region head"):
        MatcherConfig(region_contact=True)


def test_region_contact_learns_to_flag_two_objects_run_together(tmp_path):
    train = _single_square_manifest(tmp_path, "train", 96, 0)
    val = _single_square_manifest(tmp_path, "val", 32, 1)
    regional = replace(SMALL, region_keys=("color",), region_channels=16)
    contact = replace(regional, region_contact=True)
    cfg = MatcherStageConfig(model=contact, steps=150, batch_size=32, reconstructions=False, contact_copies=96,
                             contact_batch=16)
    result = train_matcher(cfg, _Sized(), _Words(), train, val, RunDir(tmp_path / "run"))
    report = json.loads((tmp_path / "run" / "matcher_val.json").read_text())["region_head"]
    assert report["contact_clean_pictures_right"] >= 0.8 and report["contact_touching_copies_found"] >= 0.8
    m = ImageTextMatcher.load(result.folder)
    # the global matcher is the same as without the contact logit (the copies only reach the region head)
    plain = ImageTextMatcher.load(train_matcher(replace(cfg, model=regional), _Sized(), _Words(), train, val,
                                                RunDir(tmp_path / "plain")).folder).state_dict()
    assert all(torch.equal(plain[k], v) for k, v in m.state_dict().items() if not k.startswith("regions."))
    # one red square vs two run together into a 5 x 10 bar (never seen as such in training)
    pics = np.full((2, 16, 16, 3), 110, dtype=np.uint8)
    pics[:, 5:10, 3:8] = (220, 40, 40)
    pics[1, 5:10, 8:13] = (220, 40, 40)
    score = m.consistency(pics)
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
    cfg = replace(SMALL, region_keys=("shape", "color"), region_values=(("circle", "square"), ("blue", "red")),
                  region_channels=16, region_colorblind=("shape",), region_contact=True)
    m = ImageTextMatcher(cfg).eval()
    obj, (shape, colour), contact = m.region_logits(x)
    assert shape.shape == colour.shape == (2, 2, 4, 4) and obj.shape == contact.shape == (2, 4, 4)
    assert torch.allclose(shape[0], shape[1], atol=1e-5)  # the shape head cannot see the colour
    assert not torch.allclose(colour[0], colour[1], atol=1e-3)
    again = ImageTextMatcher.load(m.save(tmp_path / "m"))
    assert torch.equal(again.consistency(pics), m.consistency(pics))
    with pytest.raises(ValueError, match="region_colorblind key 'size' is not one of region_keys"):
        replace(cfg, region_colorblind=("size",))
