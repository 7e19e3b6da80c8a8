"""The world generator: determinism, split hold-out, manifest format, captions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from anyloom.config import ConfigError, build
from anyloom.world.captions import (
    COLORS,
    NUMBER_WORDS,
    SHAPES,
    Caption,
    caption_jsgf,
    caption_vocabulary,
    parse_caption,
)
from anyloom.world.dataset import SPLITS, WorldConfig, build_world, generate_block, world_fingerprint


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tree_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_rerun_is_noop(tiny_world, tmp_path):
    info = json.loads((tiny_world.dir / "world.json").read_text())
    cfg = build(WorldConfig, {**info["config"], "root": str(tmp_path)})
    again = build_world(cfg, workers=1)
    assert again.dir.name == tiny_world.dir.name  # same config, same fingerprint
    assert _tree_bytes(again.dir) == _tree_bytes(tiny_world.dir)
    stamp = (again.dir / "world.json").stat().st_mtime_ns
    assert build_world(cfg, workers=1).dir == again.dir  # complete: nothing is regenerated
    assert (again.dir / "world.json").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folder left behind


def test_other_seed_other_world(tmp_path):
    a = build_world(WorldConfig(seed=1, n_train=8, n_val=0, n_test=0, n_compositional=0, with_speech=False,
                                root=str(tmp_path)), workers=1)
    b = build_world(WorldConfig(seed=2, n_train=8, n_val=0, n_test=0, n_compositional=0, with_speech=False,
                                root=str(tmp_path)), workers=1)
    assert a.dir != b.dir
    assert a.train.read_bytes() != b.train.read_bytes()
    assert not (a.dir / "audio").exists()
    assert all(len(doc["segments"]) == 2 for doc in _lines(a.train))


def test_compositional_pairs_never_in_train_or_val(tiny_world):
    cfg = WorldConfig()
    held = {tuple(p) for p in cfg.holdout}
    pairs = {s: {(d["meta"]["color"], d["meta"]["shape"]) for d in _lines(tiny_world.split(s))}
             for s in tiny_world.splits}
    for split in ("train", "val", "test"):
        assert not pairs[split] & held, split
    assert pairs["compositional"] and pairs["compositional"] <= held
    ids = [d["id"] for s in tiny_world.splits for d in _lines(tiny_world.split(s))]
    assert len(ids) == len(set(ids)) == sum(tiny_world.counts.values())


def test_manifest_items_match_their_files(tiny_world):
    for doc in _lines(tiny_world.train)[:12] + _lines(tiny_world.compositional)[:4]:
        text, image, audio = doc["segments"]
        caption = parse_caption(text["text"])
        meta = doc["meta"]
        assert (caption.count, caption.color, caption.shape) == (meta["count"], meta["color"], meta["shape"])
        assert caption.text == text["text"]
        assert len(meta["boxes"]) == meta["count"]
        assert not Path(image["image"]).is_absolute()
        with Image.open(tiny_world.dir / image["image"]) as im:
            assert im.mode == "RGB" and im.size == (32, 32)
        info = sf.info(tiny_world.dir / audio["audio"])
        assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
        wave, _ = sf.read(tiny_world.dir / audio["audio"], dtype="float32")
        assert 0.4 < len(wave) / 16000 < 4.0
        assert 0.3 < np.abs(wave).max() <= 1.0  # level-normalised, not clipped silent
        assert meta["voice"] in WorldConfig().voices


def test_64px_option_renders_64px(tmp_path):
    w = build_world(WorldConfig(image_size=64, n_train=3, n_val=0, n_test=0, n_compositional=2, with_speech=False,
                                root=str(tmp_path)), workers=1)
    doc = _lines(w.compositional)[0]
    with Image.open(w.dir / doc["segments"][1]["image"]) as im:
        assert im.size == (64, 64)


@pytest.mark.parametrize(
    "override, key",
    [
        ({"holdout": [["red", "hexagon"]]}, "holdout"),
        ({"colors": ["red", "mauve"]}, "colors"),
        ({"image_size": 48}, "image_size"),
        ({"n_train": -1}, "n_train"),
        ({"n_tran": 5}, "n_train"),  # typo: the nearest valid key is named
    ],
)
def test_bad_world_config_is_refused(override, key):
    with pytest.raises(ConfigError, match=key):
        build(WorldConfig, override)


def test_every_caption_round_trips():
    captions = [Caption(n, c, s) for n in range(1, 5) for c in COLORS for s in SHAPES]
    assert len({c.text for c in captions}) == len(captions)
    for c in captions:
        assert parse_caption(c.text) == c
        assert parse_caption("  " + c.text.upper() + " ") == c
    assert Caption(3, "yellow", "triangle").text == "three yellow triangles"
    assert Caption(1, "red", "circle").text == "one red circle"


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "3 words"),
        ("two red", "3 words"),
        ("two red circles please", "3 words"),
        ("five red circles", "count word"),
        ("2 red circles", "count word"),
        ("two mauve circles", "colour"),
        ("two red hexagons", "shape"),
        ("two red circle", "plural"),
        ("one red circles", "singular"),
        ("red two circles", "count word"),
    ],
)
def test_parser_rejects_non_captions(text, why):
    with pytest.raises(ValueError, match=why):
        parse_caption(text)


def test_vocabulary_and_grammar_cover_the_language():
    vocab = caption_vocabulary()
    assert len(vocab) == len(NUMBER_WORDS) + len(COLORS) + 2 * len(SHAPES)
    grammar = caption_jsgf()
    import re

    assert set(re.findall(r"\b[a-z]+\b", grammar.split("\n", 2)[2])) - {"public", "caption", "color", "singular",
                                                                        "plural", "many"} == set(vocab)
    assert grammar.startswith("#JSGF V1.0;")


def test_bytes_do_not_depend_on_workers(tmp_path):
    cfg = dict(n_train=130, n_val=0, n_test=0, n_compositional=3, with_speech=False)  # three blocks + one
    one = build_world(WorldConfig(**cfg, root=str(tmp_path / "one")), workers=1)
    two = build_world(WorldConfig(**cfg, root=str(tmp_path / "two")), workers=2)
    assert _tree_bytes(one.dir) == _tree_bytes(two.dir)


def test_speech_block_does_not_depend_on_history(tmp_path):
    # espeak-ng carries hidden state from one utterance to the next; a block must reset it, so that the
    # same block made after different histories (other processes, earlier blocks) has the same bytes.
    from anyloom.world.speech import Voice, get_espeak

    cfg = WorldConfig(n_train=66)
    (tmp_path / "a" / "images").mkdir(parents=True)
    (tmp_path / "a" / "audio").mkdir()
    (tmp_path / "b" / "images").mkdir(parents=True)
    (tmp_path / "b" / "audio").mkdir()
    lines_a = generate_block(cfg, "train", 64, 66, tmp_path / "a")
    for i in range(3):
        get_espeak().synthesize("four green stars", Voice("en-us+m2", 150, 45), seed=i)
    lines_b = generate_block(cfg, "train", 64, 66, tmp_path / "b")
    assert lines_a == lines_b
    assert _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")


def test_openmoji_option(tmp_path):
    from anyloom.data.manifest import read_manifest
    from anyloom.data.openmoji import OpenMojiConfig, build_openmoji

    paths = build_openmoji(OpenMojiConfig(max_items=12, with_speech=False, val_fraction=0.25, test_fraction=0.25,
                                          root=str(tmp_path)))
    assert (paths.counts["train"], paths.counts["val"], paths.counts["test"]) == (6, 3, 3)
    docs = [d for s in ("train", "val", "test") for d in read_manifest(getattr(paths, s)).documents]
    assert len({d.id for d in docs}) == 12
    names = {d.meta["codepoint"]: d.segments[0].text for d in docs}
    assert names["U+00A9"] == "copyright sign"  # unicodedata.name, lower case
    for d in docs:
        px = d.segments[1].pixels
        assert px.shape == (32, 32, 3) and px.min() < 128 and px.max() == 255  # drawn, on white
    assert "CC BY-SA 4.0" in (paths.dir / "LICENSE.txt").read_text()


def test_make_world_cli(tmp_path, capsys):
    from make_world import main

    assert main(["world.n_tran=3"]) == 2
    assert "did you mean 'world.n_train'" in capsys.readouterr().err
    assert main(["openmoji.size=64"]) == 2
    assert "openmoji.image_size" in capsys.readouterr().err
    args = ["world.n_train=4", "world.n_val=1", "world.n_test=1", "world.n_compositional=2",
            "world.with_speech=false", f"world.root={tmp_path}", "--workers", "1"]
    assert main(args) == 2  # the recipe's 200 instruction documents need 200 training items
    assert "replies must be in [0, n_train=4], got 200" in capsys.readouterr().err
    assert main(args + ["world.replies=0"]) == 0
    out = capsys.readouterr().out
    assert f"world: {tmp_path}/" in out and "compositional       2 items" in out


def test_reply_documents_are_instructions_for_the_interleaved_task_only(tmp_path):
    """world.replies: the first training items again as "draw <caption> and say it" + their picture and speech,
    restricted to the interleaved task; a world without them keeps its name (fingerprint)."""
    from anyloom.data.manifest import read_manifest

    base = dict(seed=3, n_train=6, n_val=0, n_test=0, n_compositional=0, with_speech=False, root=str(tmp_path))
    plain = WorldConfig(**base)
    assert world_fingerprint(plain) == world_fingerprint(WorldConfig(**base, reply_prompt="say {caption}"))
    replied = WorldConfig(**base, replies=2)
    assert world_fingerprint(replied) != world_fingerprint(plain)
    paths = build_world(replied, workers=1)
    docs = read_manifest(paths.train).documents
    assert len(docs) == 8 and paths.counts["train_replies"] == 2
    for item, reply in zip(docs[:2], docs[6:]):
        assert reply.segments[0].text == f"draw {item.segments[0].text} and say it"
        assert reply.tasks == ("interleaved",) and item.tasks is None
        assert np.array_equal(reply.segments[1].pixels, item.segments[1].pixels)
        assert reply.id == f"{item.id}-reply" and reply.meta["reply_to"] == item.segments[0].text
    with pytest.raises(ValueError, match="replies must be in"):
        WorldConfig(**base, replies=7)
    with pytest.raises(ValueError, match="must contain"):
        WorldConfig(**base, reply_prompt="draw it")


def test_validation_holdout_has_pairs_of_its_own(tmp_path):
    """holdout_val: pairs absent from every other split, only in compositional_val; a world without them keeps its
    name and its items, and has no such split."""
    base = dict(seed=5, n_train=24, n_val=4, n_test=4, n_compositional=6, with_speech=False, root=str(tmp_path))
    plain = WorldConfig(**base)
    assert world_fingerprint(plain) == world_fingerprint(WorldConfig(**base, holdout_val=(), n_compositional_val=0))
    val_pairs = (("cyan", "star"), ("pink", "circle"))
    cfg = WorldConfig(**base, holdout_val=val_pairs, n_compositional_val=6)
    assert world_fingerprint(cfg) != world_fingerprint(plain)
    w, p = build_world(cfg, workers=1), build_world(plain, workers=1)
    assert w.splits == SPLITS and p.splits == SPLITS[:-1] and not (p.dir / "compositional_val.jsonl").exists()
    with pytest.raises(ValueError, match="no compositional_val split"):
        p.split("compositional_val")
    pairs = {s: {(d["meta"]["color"], d["meta"]["shape"]) for d in _lines(w.split(s))} for s in w.splits}
    assert pairs["compositional_val"] and pairs["compositional_val"] <= set(val_pairs)
    for split in ("train", "val", "test", "compositional"):
        assert not pairs[split] & set(val_pairs), split
    assert _lines(w.compositional) == _lines(p.compositional)  # its own hold-out: the same items as without
    assert w.counts["compositional_val"] == 6
    with pytest.raises(ValueError, match="must not share pairs with holdout"):
        WorldConfig(**base, holdout_val=(("red", "star"),), n_compositional_val=2)
    with pytest.raises(ValueError, match="needs at least one holdout_val pair"):
        WorldConfig(**base, n_compositional_val=2)


def test_partial_captions_name_one_attribute_for_text_to_image_only(tmp_path):
    """world.partial_captions: the first training items' pictures again under their shape alone or their colour alone,
    serving only text->image; a world without them keeps its name."""
    from anyloom.data.manifest import read_manifest

    base = dict(seed=3, n_train=6, n_val=0, n_test=0, n_compositional=0, with_speech=True, root=str(tmp_path))
    assert world_fingerprint(WorldConfig(**base)) == world_fingerprint(WorldConfig(**base, partial_captions=0))
    w = build_world(WorldConfig(**base, partial_captions=4), workers=1)
    lines = _lines(w.train)
    items, partial = lines[:6], lines[6:]
    assert len(partial) == 4 and w.counts["train_partial_captions"] == 4
    for i, (doc, item) in enumerate(zip(partial, items)):
        meta = item["meta"]
        noun = meta["shape"] if meta["count"] == 1 else meta["shape"] + "s"
        words = doc["segments"][0]["text"].split()
        if i % 2 == 0:
            assert words[1:] == [noun] and doc["meta"]["names"] == "shape"
        else:
            assert words[1:] == [meta["color"], "shape" if meta["count"] == 1 else "shapes"]
        assert doc["segments"][1] == item["segments"][1] and len(doc["segments"]) == 2  # its picture, no speech
        assert doc["tasks"] == ["t2i"]
    assert [d.tasks for d in read_manifest(w.train).documents][6:] == [("t2i",)] * 4
    with pytest.raises(ValueError, match="partial_captions must be in"):
        WorldConfig(**base, partial_captions=7)
