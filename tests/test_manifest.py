"""The manifest reader: good documents come back exactly; every broken input is named by file and line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from anyloom.data.document import AudioSegment, ImageSegment, TextSegment
from anyloom.data.manifest import ManifestError, iter_manifest, read_manifest


def _png(path: Path, mode: str = "RGB", size: int = 8) -> np.ndarray:
    rng = np.random.default_rng(len(mode))
    rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    im = Image.fromarray(rgb)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path)
    return rgb


def _tone(n: int, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(n) / rate
    wave = 0.5 * np.sin(2 * np.pi * 440 * t).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


@pytest.fixture
def files(tmp_path):
    (tmp_path / "img").mkdir()
    rgb = _png(tmp_path / "img" / "rgb.png")
    _png(tmp_path / "img" / "gray.png", "L")
    _png(tmp_path / "img" / "pal.png", "P")
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    im.putpixel((1, 1), (0, 0, 255, 255))
    im.save(tmp_path / "img" / "rgba.png")
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    sf.write(tmp_path / "mono16k.wav", _tone(1600, 16000), 16000, subtype="PCM_16")
    sf.write(tmp_path / "stereo44k.wav", _tone(4410, 44100, channels=2), 44100, subtype="PCM_16")
    sf.write(tmp_path / "empty.wav", np.zeros((0,), np.float32), 16000, subtype="PCM_16")
    return tmp_path, rgb


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_good_documents_are_read_and_repaired(files):
    d, rgb = files
    m = _write(d / "m.jsonl", [
        {"id": "a", "segments": [{"text": "one red circle"}, {"image": "img/rgb.png"}, {"audio": "mono16k.wav"}],
         "meta": {"count": 1}},
        "",
        {"segments": [{"image": "img/gray.png"}, {"image": "img/pal.png"}, {"image": "img/rgba.png"},
                      {"audio": "stereo44k.wav"}, {"image": str(d / "img" / "rgb.png")}]},
    ])
    result = read_manifest(m)
    assert result.skipped == [] and result.summary == "2 documents read, 0 skipped"
    a, b = result.documents
    assert a.id == "a" and a.meta == {"count": 1}
    assert isinstance(a.segments[0], TextSegment) and a.segments[0].text == "one red circle"
    assert isinstance(a.segments[1], ImageSegment) and np.array_equal(a.segments[1].pixels, rgb)
    assert isinstance(a.segments[2], AudioSegment) and a.segments[2].sample_rate == 16000
    assert np.abs(a.segments[2].wave - _tone(1600, 16000)).max() < 1e-3
    assert b.id == f"{m}:3"  # no id: the document's place
    gray, pal, rgba, audio, absolute = b.segments
    assert gray.pixels.shape == (8, 8, 3) and np.array_equal(gray.pixels[..., 0], gray.pixels[..., 2])
    assert pal.pixels.shape == (8, 8, 3) and pal.pixels.dtype == np.uint8
    assert tuple(rgba.pixels[0, 0]) == (255, 255, 255) and tuple(rgba.pixels[1, 1]) == (0, 0, 255)
    assert audio.wave.ndim == 1 and len(audio.wave) == 1600  # 0.1 s of 44.1 kHz stereo -> 16 kHz mono
    peak = np.abs(audio.wave[100:-100]).max()
    assert 0.45 < peak < 0.55  # downmixed (mean of identical channels), not summed
    assert np.array_equal(absolute.pixels, rgb)


def test_image_size_resizes(files):
    d, _ = files
    m = _write(d / "m.jsonl", [{"segments": [{"image": "img/rgb.png"}]}])
    (doc,) = read_manifest(m, image_size=(4, 6)).documents
    assert doc.segments[0].pixels.shape == (4, 6, 3)


BROKEN = [
    ('{"segments": [{"text": "one red circle"}', "malformed JSON"),
    ({"segments": [{"image": "img/corrupt.png"}]}, "corrupt image"),
    ({"segments": [{"audio": "empty.wav"}]}, "empty audio"),
    ({"segments": [{"video": "clip.mp4"}]}, "unknown key 'video'"),
    ({"segments": [{"image": "img/nope.png"}]}, "missing file"),
    ({"segments": [{"text": "   "}]}, "empty text"),
    ({"segments": []}, "non-empty list"),
    ({"segments": [{"text": "a"}], "labels": 3}, "unknown key 'labels'"),
    ({"segments": [{"text": "a", "image": "img/rgb.png"}]}, "exactly one"),
    ({"segments": [{"audio": "img/rgb.png"}]}, "corrupt audio"),
    ('[1, 2]', "expected a JSON object"),
]


@pytest.mark.parametrize("line, why", BROKEN)
def test_strict_mode_names_file_and_line(files, line, why):
    d, _ = files
    m = _write(d / "m.jsonl", [{"segments": [{"text": "fine"}]}, line])
    with pytest.raises(ManifestError) as e:
        read_manifest(m)
    assert str(e.value).startswith(f"{m}:2: ")
    assert why in str(e.value)


def test_lenient_mode_skips_and_counts(files):
    d, _ = files
    good = {"segments": [{"text": "fine"}, {"image": "img/rgb.png"}]}
    m = _write(d / "m.jsonl", [good] + [line for line, _ in BROKEN] + [good])
    result = read_manifest(m, strict=False)
    assert len(result.documents) == 2
    assert [s.source for s in result.skipped] == [f"{m}:{i}" for i in range(2, 2 + len(BROKEN))]
    for skip, (_, why) in zip(result.skipped, BROKEN, strict=True):
        assert why in skip.reason
    assert result.summary.startswith(f"2 documents read, {len(BROKEN)} skipped (")
    # The lazy reader yields the same documents and reports the same skips.
    skipped: list = []
    assert [doc.id for doc in iter_manifest(m, strict=False, skipped=skipped)] == [f"{m}:1", f"{m}:{len(BROKEN) + 2}"]
    assert skipped == result.skipped


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="no such manifest"):
        read_manifest(tmp_path / "nope.jsonl")


def test_bad_utf8_line_costs_only_that_line(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_bytes(b'{"segments": [{"text": "one"}]}\n{"segments": [{"text": "\xff\xfe"}]}\n'
                  b'{"segments": [{"text": "three"}]}\n')
    result = read_manifest(m, strict=False)
    assert [d.segments[0].text for d in result.documents] == ["one", "three"]
    assert result.skipped[0].source == f"{m}:2" and "not UTF-8" in result.skipped[0].reason


def test_webdataset_shards(files):
    import webdataset as wds

    d, rgb = files
    png = (d / "img" / "rgb.png").read_bytes()
    wav = (d / "stereo44k.wav").read_bytes()
    shard = d / "shard-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "s0", "json": json.dumps({"segments": [
            {"text": "two blue stars"}, {"image": "png"}, {"audio": "wav"}], "meta": {"count": 2}}).encode(),
            "png": png, "wav": wav})
        sink.write({"__key__": "s1", "txt": b"one red circle", "png": png})  # no json: txt, image, audio order
        sink.write({"__key__": "s2", "json": json.dumps({"segments": [{"image": "jpg"}]}).encode(), "png": png})
        sink.write({"__key__": "s3", "json": b"{not json"})
    with pytest.raises(ManifestError, match=rf"{shard}:s2: missing file: image member 'jpg'"):
        read_manifest(shard)
    # A brace pattern reads several shards in order (webdataset's naming).
    second = d / "shard-000001.tar"
    with wds.TarWriter(str(second)) as sink:
        sink.write({"__key__": "t0", "txt": b"four cyan squares"})
    both = read_manifest(d / "shard-{000000..000001}.tar", strict=False)
    assert [doc.id for doc in both.documents] == ["s0", "s1", "t0"]
    result = read_manifest(shard, strict=False)
    s0, s1 = result.documents
    assert s0.id == "s0" and s0.meta == {"count": 2} and s0.segments[0].text == "two blue stars"
    assert np.array_equal(s0.segments[1].pixels, rgb) and len(s0.segments[2].wave) == 1600
    assert [type(s) for s in s1.segments] == [TextSegment, ImageSegment] and s1.segments[0].text == "one red circle"
    assert [s.source for s in result.skipped] == [f"{shard}:s2", f"{shard}:s3"]
    assert "malformed JSON" in result.skipped[1].reason


def test_world_manifest_reads_back(tiny_world):
    result = read_manifest(tiny_world.val, image_size=(32, 32))
    assert len(result.documents) == tiny_world.counts["val"] and not result.skipped
    doc = result.documents[0]
    assert [type(s) for s in doc.segments] == [TextSegment, ImageSegment, AudioSegment]
    assert doc.segments[1].pixels.shape == (32, 32, 3) and doc.segments[2].sample_rate == 16000
    buf = io.BytesIO()
    Image.fromarray(doc.segments[1].pixels).save(buf, format="PNG")
    with Image.open(tiny_world.dir / "images" / f"{doc.id}.png") as im:
        assert np.array_equal(np.asarray(im), doc.segments[1].pixels)


@pytest.mark.parametrize("side", [40, 60])  # above MAX_IMAGE_PIXELS (PIL warns) and above twice it (PIL raises)
def test_a_decompression_bomb_is_skipped_by_name_and_the_read_goes_on(tmp_path, monkeypatch, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)
    Image.new("RGB", (side, side), (9, 9, 9)).save(tmp_path / "bomb.png")
    Image.new("RGB", (30, 30), (9, 9, 9)).save(tmp_path / "fine.png")
    Path(tmp_path / "zero.png").write_bytes(b"")
    lines = [{"segments": [{"text": "a"}, {"image": name}]} for name in ("bomb.png", "fine.png", "zero.png")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = read_manifest(tmp_path / "m.jsonl", strict=False)
    assert len(result.documents) == 1 and result.documents[0].segments[1].path.endswith("fine.png")
    reasons = [f"{s.source}: {s.reason}" for s in result.skipped]
    assert reasons[0].startswith(f"{tmp_path / 'm.jsonl'}:1: decompression bomb: ") and "bomb.png" in reasons[0]
    assert reasons[1].startswith(f"{tmp_path / 'm.jsonl'}:3: empty image: ") and "zero bytes" in reasons[1]
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: decompression bomb"):
        read_manifest(tmp_path / "m.jsonl", strict=True)
