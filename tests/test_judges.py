"""The closed-world judges: image -> caption (classical CV) and speech -> caption (pocketsphinx + JSGF)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from anyloom.world.captions import PALETTE, Caption, parse_caption
from anyloom.world.dataset import WorldConfig, sample_caption
from anyloom.world.judge import inspect_image, judge_image, judge_images
from anyloom.world.render import render_scene


def _ground_truth(n: int, image_size: int = 32, split: str = "test", seed: int = 0):
    cfg = WorldConfig(seed=seed, image_size=image_size)
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, 7, i])
        caption = sample_caption(cfg, split, rng)
        out.append((caption, render_scene(rng, caption, image_size).pixels))
    return out


def test_image_judge_reads_ground_truth_at_995_percent():
    data = _ground_truth(400)
    got = judge_images(np.stack([px for _, px in data]))
    correct = sum(g == c for (c, _), g in zip(data, got, strict=True))
    assert correct / len(data) >= 0.995, f"{correct}/{len(data)}"


def test_image_judge_reads_64px_and_compositional_pairs():
    data = _ground_truth(40, image_size=64, split="compositional", seed=3)
    assert sum(judge_image(px) == c for c, px in data) >= 39


def test_image_judge_survives_blur_and_noise():
    # Generated images are softer and noisier than renders: mild blur + noise must not change the verdict.
    rng = np.random.default_rng(0)
    data = _ground_truth(100, seed=5)
    correct = 0
    for c, px in data:
        soft = ndimage.gaussian_filter(px.astype(np.float64), (0.5, 0.5, 0)) + rng.normal(0, 4, px.shape)
        correct += judge_image(np.clip(soft, 0, 255).astype(np.uint8)) == c
    assert correct >= 97


def test_image_judge_refuses_non_captions():
    blank = np.full((32, 32, 3), 120, np.uint8)
    report = inspect_image(blank)
    assert report.caption is None and report.reason == "no objects"

    # Two objects of different colours: not a caption of this world.
    px = np.full((32, 32, 3), 60, np.uint8)
    px[4:14, 4:14] = PALETTE["red"]
    px[18:28, 18:28] = PALETTE["blue"]
    report = inspect_image(px)
    assert report.caption is None and "colour" in report.reason
    assert sorted(o.color for o in report.objects) == ["blue", "red"]
    assert [o.shape for o in report.objects] == ["square", "square"]

    # Five squares: more than the language can count.
    px = np.full((32, 32, 3), 60, np.uint8)
    for k in range(5):
        px[2 + 6 * k: 6 + 6 * k, 2:6] = PALETTE["green"]
    assert judge_image(px) is None
    with pytest.raises(ValueError, match="RGB"):
        judge_image(np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        judge_image(np.zeros((32, 32, 3), np.float32))


def test_image_judge_hand_drawn_square():
    px = np.full((32, 32, 3), 200, np.uint8)
    px[8:20, 10:22] = PALETTE["purple"]
    assert judge_image(px) == Caption(1, "purple", "square")


def test_speech_judge_reads_ground_truth_speech(tiny_world):
    from anyloom.data.manifest import read_manifest
    from anyloom.world.asr import SpeechJudge, word_error_rate

    docs = read_manifest(tiny_world.train).documents + read_manifest(tiny_world.val).documents
    refs = [d.segments[0].text for d in docs]
    hyps = SpeechJudge().transcribe([d.segments[2].wave for d in docs], 16000)
    assert len(hyps) == len(refs) >= 60
    wer = word_error_rate(refs, hyps)
    assert wer <= 0.05, list(zip(refs, hyps))
    for h in hyps:  # the grammar only produces captions (or nothing)
        if h and len(h.split()) == 3:
            parse_caption(h)


def test_speech_judge_resamples_other_rates(tiny_world):
    from anyloom.data.manifest import read_manifest
    from anyloom.world.asr import SpeechJudge

    docs = read_manifest(tiny_world.val).documents[:4]
    waves = [np.interp(np.arange(0, len(w) * 1.5) / 1.5, np.arange(len(w)), w).astype(np.float32)
             for w in (d.segments[2].wave for d in docs)]  # 24 kHz versions
    judge = SpeechJudge()
    assert judge.transcribe(waves, 24000) == judge.transcribe([d.segments[2].wave for d in docs], 16000)
    assert judge.transcribe([np.zeros(16000, np.float32)], 16000)[0].split() != docs[0].segments[0].text.split()


def test_word_error_rate_golden_numbers():
    from anyloom.world.asr import word_error_rate

    assert word_error_rate(["one red circle"], ["one red circle"]) == 0.0
    assert word_error_rate(["one red circle"], ["one red"]) == pytest.approx(1 / 3)
    assert word_error_rate(["one red circle", "two blue stars"], ["", "two green stars"]) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="2 references but 1"):
        word_error_rate(["a b", "c"], ["a b"])


def test_speech_judge_decodes_a_waveform_once_and_order_does_not_matter(tiny_world, monkeypatch):
    """The judge remembers transcripts (the evaluation hears the originals twice); that is only sound if a
    transcript does not depend on what was decoded before it, checked here with two fresh judges."""
    from anyloom.data.manifest import read_manifest
    from anyloom.world.asr import SpeechJudge

    waves = [d.segments[2].wave for d in read_manifest(tiny_world.val).documents[:12]]
    forward = SpeechJudge().transcribe(waves, 16000)
    assert SpeechJudge().transcribe(waves[::-1], 16000)[::-1] == forward
    judge = SpeechJudge()
    calls = []
    decode = judge._decode
    monkeypatch.setattr(judge, "_decode", lambda w, sr: calls.append(1) or decode(w, sr))
    assert judge.transcribe(waves + waves, 16000) == forward + forward
    assert len(calls) == len(waves)
    assert judge.transcribe([waves[0].copy()], 24000)  # another rate is another key: decoded again
    assert len(calls) == len(waves) + 1


def test_the_audio_tokenizer_report_reads_with_the_datas_grammar_or_the_general_model():
    from anyloom.plugins import PluginError, load_plugin
    from anyloom.recipes import load_recipe
    from anyloom.training.audio_tokenizer import evaluate_tokenizer
    from anyloom.world.captions import caption_jsgf

    assert load_plugin("anyloom.asr_grammars", "world_captions")() == caption_jsgf()
    assert load_recipe("world").audio_tokenizer.train.asr_grammar == "world_captions"
    assert load_recipe("manifest").audio_tokenizer.train.asr_grammar is None  # other data: the general model
    assert load_recipe("openmoji").audio_tokenizer.train.asr_grammar is None
    with pytest.raises(PluginError, match="audio_tokenizer.train.asr_grammar: 'world_caption' is not a known"):
        evaluate_tokenizer(None, None, 1, "world_caption")
