"""Your own data through the whole chain: a manifest with non-square RGBA pictures, stereo 22 kHz recordings and two
broken files, prepared alike from JSONL and from tar shards, trained by the manifest_tiny recipe to eval.json, then
generated from in all four directions with `make train RECIPE=manifest_tiny` and `make generate`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from own_data import write_own_data
from PIL import Image

from anyloom.data.manifest import ManifestError, read_manifest
from anyloom.data.prepare import DataConfig, prepare_data, split_of

REPO = Path(__file__).resolve().parents[1]
N = 36


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    return write_own_data(tmp_path_factory.mktemp("own"), n=N)


def _prepare(own, tmp_path, source: str, **kw):
    cfg = DataConfig(source="manifest", train=str(own[source]), val_fraction=0.15, test_fraction=0.15,
                     root=str(tmp_path / "prepared"), **kw)
    return prepare_data(cfg, (32, 32), 16000, log=lambda _: None)


def _documents(data):
    return {d.id: d for s in data.splits for d in read_manifest(data.split(s)).documents}


def test_jsonl_and_shards_prepare_to_the_same_documents_with_two_skips_named(own, tmp_path):
    a, b = _prepare(own, tmp_path, "manifest"), _prepare(own, tmp_path, "shards")
    assert a.counts == b.counts and sum(a.counts.values()) == N
    assert a.skipped == b.skipped == {"corrupt image": 1, "empty audio": 1}
    report = json.loads((a.dir / "report.json").read_text())
    places = [p for ps in report["skipped_places"].values() for p in ps]
    assert any("broken.png" in p for p in places) and any("empty.wav" in p for p in places)
    da, db = _documents(a), _documents(b)
    assert sorted(da) == sorted(db)
    for doc_id, doc in da.items():
        image_a, image_b = doc.segments[1].pixels, db[doc_id].segments[1].pixels
        assert image_a.shape == (32, 32, 3) and np.array_equal(image_a, image_b)
        assert np.array_equal(doc.segments[2].wave, db[doc_id].segments[2].wave)
    # the split follows the id, not the order or the file the document came from
    assert all(split_of(d, DataConfig(val_fraction=0.15, test_fraction=0.15)) == s
               for s in a.splits for d in (x.id for x in read_manifest(a.split(s)).documents))


def test_pictures_fit_by_the_stated_policy_and_transparency_over_the_background(own, tmp_path):
    source = Image.open(own["manifest"].parent / "media" / "000.png")  # 48x40 RGBA, a shape on transparency
    crop = _prepare(own, tmp_path, "manifest", image_fit="crop", background=(0, 0, 0))
    pad = _prepare(own, tmp_path, "manifest", image_fit="pad", background=(0, 255, 0))
    doc_c, doc_p = _documents(crop)["doc000"], _documents(pad)["doc000"]
    assert source.size == (48, 40) and doc_c.segments[1].pixels.shape == (32, 32, 3)
    corner_c, corner_p = doc_c.segments[1].pixels[0, 0], doc_p.segments[1].pixels[0, 0]
    assert corner_c.tolist() == [0, 0, 0]  # transparency over black
    assert corner_p.tolist() == [0, 255, 0]  # the padding band (48x40 -> 32x27 + 5 rows) in the background
    wave = doc_c.segments[2].wave
    assert wave.ndim == 1 and doc_c.segments[2].sample_rate == 16000  # stereo 22,050 Hz -> mono 16 kHz


def test_limits_skip_with_a_count_and_strict_mode_names_the_place(own, tmp_path):
    short = _prepare(own, tmp_path, "manifest", max_text_chars=13)
    assert short.skipped == {"corrupt image": 1, "empty audio": 1, "too long": N // 3}  # the "a green ..." captions
    with pytest.raises(ValueError, match=r"no readable documents \(38 skipped: .*too long: a recording of"):
        _prepare(own, tmp_path, "manifest", max_audio_seconds=0.05)
    with pytest.raises(ManifestError, match=r"all\.jsonl:\d+: corrupt image: .*broken\.png"):
        _prepare(own, tmp_path, "manifest", strict=True)
    with pytest.raises(ValueError, match="data.val is empty and data.val_fraction is 0"):
        prepare_data(DataConfig(source="manifest", train=str(own["manifest"]), test_fraction=0.1), (32, 32), 16000)


def test_a_modality_the_data_lacks_skips_its_stages(own, tmp_path):
    lines = [json.loads(x) for x in own["manifest"].read_text().splitlines()]
    text_image = own["manifest"].parent / "text_image.jsonl"
    text_image.write_text("".join(json.dumps({"id": x["id"], "segments": x["segments"][:2]}) + "\n" for x in lines))
    data = prepare_data(DataConfig(source="manifest", train=str(text_image), val_fraction=0.15, test_fraction=0.15,
                                   root=str(tmp_path / "p")), (32, 32), 16000, log=lambda _: None)
    assert data.modalities == ("text", "image")
    from anyloom.recipes import load_recipe
    from anyloom.training.chain import Context, stage_audio_tokenizer
    from anyloom.training.run import RunDir

    ctx = Context(load_recipe("manifest_tiny"), RunDir(tmp_path / "run"), artifacts={"data": data})
    outcome = stage_audio_tokenizer(ctx)
    assert "no recordings" in outcome.text and "audio_tokenizer" not in ctx.artifacts


def _make(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(["make", "-s", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_own_data_through_make_train_and_make_generate(own, tmp_path):
    run = tmp_path / "runs" / "own"
    _make("train", "RECIPE=manifest_tiny",
          f"ARGS=data.train={own['shards']} data.val_fraction=0.15 data.test_fraction=0.15 "
          f"data.root={tmp_path / 'prepared'} run.out_dir={tmp_path / 'runs'} run.name=own")
    scores = json.loads((run / "eval.json").read_text())
    assert {"t2i", "i2t", "a2t", "t2a"} <= set(scores)
    assert all("judge" in scores[d] for d in ("t2i", "i2t", "a2t", "t2a"))
    summary = (run / "summary.md").read_text()
    assert "2 skipped (1 corrupt image, 1 empty audio)" in summary
    out = tmp_path / "gen"
    media = own["manifest"].parent / "media"
    for asked, made in ((("PROMPT=a red circle", "TO=image"), "*.png"),
                        ((f"IMAGE={media / '001.png'}", "TO=text"), "*.txt"),
                        (("PROMPT=a blue square", "TO=audio"), "*.wav"),
                        ((f"AUDIO={media / '002.wav'}", "TO=text"), "*.txt")):
        target = out / asked[1] / asked[0].split("=")[0]
        _make("generate", f"RUN={run}", *asked, f"GEN_ARGS=--out {target} --seed 0")
        files = list(target.glob(made))
        assert files, f"{asked}: nothing written in {target}"
        if made == "*.wav":
            wave, rate = sf.read(files[0])
            assert rate == 16000 and len(wave) > 0


@pytest.mark.slow
def test_data_without_recordings_trains_evaluates_and_generates_what_it_holds(own, tmp_path):
    lines = [json.loads(x) for x in own["manifest"].read_text().splitlines()]
    text_image = own["manifest"].parent / "text_image_only.jsonl"
    text_image.write_text("".join(json.dumps({"id": x["id"], "segments": x["segments"][:2]}) + "\n"
                                  for x in lines if len(x["segments"]) > 2))
    run = tmp_path / "runs" / "ti"
    proc = _make("train", "RECIPE=manifest_tiny",
                 f"ARGS=data.train={text_image} data.val_fraction=0.15 data.test_fraction=0.15 "
                 f"data.root={tmp_path / 'prepared'} run.out_dir={tmp_path / 'runs'} run.name=ti")
    assert "audio_tokenizer: skipped: the training data holds no recordings" in proc.stdout
    assert "not evaluating a2t, t2a" in proc.stdout
    scores = json.loads((run / "eval.json").read_text())
    assert {"t2i", "i2t"} <= set(scores) and not {"a2t", "t2a"} & set(scores) and "audio" not in scores["lm"]["ppl"]
    _make("generate", f"RUN={run}", "PROMPT=a red circle", "TO=image", f"GEN_ARGS=--out {tmp_path / 'gen'}")
    refused = subprocess.run(["make", "-s", "generate", f"RUN={run}", "PROMPT=a red circle", "TO=audio"], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "this model has no audio tokenizer" in refused.stderr
    assert "Traceback" not in refused.stderr
