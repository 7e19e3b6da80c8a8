"""The image-text matcher (matcher/model.py) and its training stage (training/matcher.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anyloom.config import ConfigError
from anyloom.matcher.model import ImageTextMatcher, MatcherConfig
from anyloom.plugins import PluginError
from anyloom.training.matcher import MatcherStageConfig, train_matcher
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


def test_a_head_is_a_named_plug_in_with_typed_options():
    with pytest.raises(ConfigError, match="head.name"):
        MatcherStageConfig(head={"keys": ["color"]})
    with pytest.raises(PluginError, match="head.name: .no_such_head. is not a known anyloom.matcher_heads plug-in"):
        MatcherStageConfig(head={"name": "no_such_head"})
    with pytest.raises(ConfigError, match=r"did you mean 'head.colorblind'"):
        MatcherStageConfig(head={"name": "world_regions", "keys": ["color"], "colorblnd": ["color"]})
    stored = MatcherStageConfig(head={"name": "world_regions", "keys": ["color"]}).head
    assert stored["name"] == "world_regions" and stored["channels"] == 64 and stored["contact"] is False
