"""The neural vocoder: contract (lengths, features, save/load), training (loss falls, resume equals uninterrupted,
up to date), the side-by-side comparison with Griffin-Lim, and the pipeline's choice between them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_audio_tokenizer import _speech_manifest, speechlike, tiny_mel_config

from anyloom.decoders.vocoder import MelVocoder, VocodedMelTokenizer, VocoderConfig
from anyloom.tokenizers.audio_mel import MelFeatureConfig, MelTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

TINY = VocoderConfig(channels=16, blocks=2, expansion=2, n_fft=256)
FEATS = MelFeatureConfig(n_fft=256, win_length=256, hop_length=160, n_mels=16)


def tiny_tokenizer(features: MelFeatureConfig = FEATS) -> MelTokenizer:
    torch.manual_seed(0)
    tok = MelTokenizer(tiny_mel_config(features=features, codebook_size=16))
    tok.train()
    with torch.no_grad():  # k-means on one batch: encode is a pure function afterwards
        mel = tok.features.log_mel(torch.stack([speechlike(0.48, seed=i) for i in range(4)]))
        tok.fit_normalization(mel)
        tok(tok.normalize(mel))
    return tok.eval()


def test_vocoder_lengths_round_trip_and_feature_check(tmp_path):
    torch.manual_seed(0)
    vocoder = MelVocoder(TINY, FEATS).eval()
    mel = torch.randn(2, 16, 7)
    wave = vocoder(mel)
    assert wave.shape == (2, 7 * 160) and torch.isfinite(wave).all()
    vocoder.save(tmp_path / "v", metadata={"steps": "0"})
    again = MelVocoder.load(tmp_path / "v")
    assert torch.equal(again.vocode(mel), vocoder.vocode(mel))
    assert again.features == FEATS and again.cfg == TINY
    tok = tiny_tokenizer()
    voiced = VocodedMelTokenizer(tok, vocoder)
    w = speechlike(0.3)[None]
    codes = voiced.encode(w, 16000).codes
    assert torch.equal(codes, tok.encode(w, 16000).codes)  # the same codes: only the last step of decoding differs
    assert voiced.decode(codes).shape == tok.decode(codes).shape
    assert (voiced.sample_rate, voiced.frame_rate, voiced.num_codebooks) == (
        tok.sample_rate, tok.frame_rate, tok.num_codebooks)
    other = tiny_tokenizer(MelFeatureConfig(n_fft=256, win_length=256, hop_length=160, n_mels=16, f_max=4000.0))
    with pytest.raises(ValueError, match="f_max: vocoder 8000.0 vs 4000.0"):
        VocodedMelTokenizer(other, vocoder)
    with pytest.raises(ValueError, match=r"expected log-mel \(B, 16, F\)"):
        vocoder(torch.randn(1, 80, 5))
    with pytest.raises(ValueError, match="kind is 'anyloom.mel_rvq'"):
        tok.save(tmp_path / "tok")
        MelVocoder.load(tmp_path / "tok")
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        VocoderConfig(kernel_size=4)


def _stage(steps: int, ckpt_every: int = 0, **train):
    from anyloom.training.optim import OptimConfig
    from anyloom.training.vocoder import VocoderStageConfig, VocoderTrainConfig

    return VocoderStageConfig(model=TINY, optim=OptimConfig(lr=3e-3, weight_decay=0.0, warmup_steps=2),
                              train=VocoderTrainConfig(**{**dict(steps=steps, batch_size=4, crop_seconds=0.2,
                                                                 log_every=1, ckpt_every=ckpt_every, num_samples=1,
                                                                 eval_items=0), **train}))


def test_training_lowers_the_loss_writes_samples_and_skips_when_done(tmp_path):
    from anyloom.training.run import RunDir
    from anyloom.training.vocoder import train_vocoder

    manifest = _speech_manifest(tmp_path / "data", 6)
    tok = tiny_tokenizer()
    tok.save(tmp_path / "tok")
    run = RunDir(tmp_path / "run")
    folder = train_vocoder(_stage(60), tok, tmp_path / "tok", manifest, manifest, run)
    records = [json.loads(line) for line in run.metrics_file.read_text().splitlines()]
    first = np.mean([r["mel_l1_nats"] for r in records[:3]])
    last = np.mean([r["mel_l1_nats"] for r in records[-3:]])
    assert last < 0.6 * first, (first, last)
    assert sorted(p.name for p in run.samples.glob("*.wav")) == [
        "speech_0_griffin_lim.wav", "speech_0_original.wav", "speech_step0000060_0_neural.wav"]
    assert json.loads((run.path / "eval.json").read_text())["vocoder.steps"] == 60
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert train_vocoder(_stage(60), tok, tmp_path / "tok", manifest, manifest, run) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # same fingerprint: not retrained
    with pytest.raises(ValueError, match="needs a mel tokenizer"):
        train_vocoder(_stage(2), object(), tmp_path / "tok", manifest, manifest, run)


def test_resume_equals_uninterrupted(tmp_path):
    from anyloom.training.run import RunDir
    from anyloom.training.vocoder import train_vocoder

    manifest = _speech_manifest(tmp_path / "data", 4)
    tok = tiny_tokenizer()
    tok.save(tmp_path / "tok")
    stage = _stage(10, ckpt_every=5, input="original")
    whole = MelVocoder.load(train_vocoder(stage, tok, tmp_path / "tok", manifest, manifest, RunDir(tmp_path / "a")))
    run = RunDir(tmp_path / "b")
    train_vocoder(stage, tok, tmp_path / "tok", manifest, manifest, run)
    shutil.rmtree(run.path / "vocoder")  # a crash after step 5: only the first checkpoint survives
    shutil.rmtree(run.checkpoints / "step_0000010")
    resumed = MelVocoder.load(train_vocoder(stage, tok, tmp_path / "tok", manifest, manifest, run))
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_aligned_crops_cover_the_samples_of_their_frames():
    from anyloom.training.vocoder import VocoderData, aligned_crops

    mel = torch.arange(30.0)[None].repeat(16, 1)  # frame index in every bin
    wave = torch.arange(30 * 160.0) // 160  # the frame each sample belongs to
    m, w = aligned_crops(VocoderData(mel, wave, 160), 5, 4, torch.Generator().manual_seed(0))
    assert m.shape == (5, 16, 4) and w.shape == (5, 4 * 160)
    for i in range(5):
        assert torch.equal(w[i].view(4, 160)[:, 0], m[i, 0])  # samples of exactly the window's frames
    with pytest.raises(ValueError, match="fewer than one window"):
        aligned_crops(VocoderData(mel, wave, 160), 1, 31, torch.Generator())


def test_compare_vocoders_scores_both_on_the_same_codes():
    from anyloom.evaluation.audio_metrics import mel_distance
    from anyloom.evaluation.decoders import compare_vocoders

    tok = tiny_tokenizer()
    torch.manual_seed(1)
    vocoder = MelVocoder(TINY, FEATS).eval()
    waves = [speechlike(0.32, seed=i).numpy() for i in range(3)]

    class Judge:  # hears the first word of every caption when the wave is loud enough
        def transcribe(self, waves, sample_rate):
            return ["utterance" if np.abs(w).max() > 1e-3 else "" for w in waves]

    out = compare_vocoders(tok, vocoder, waves, 16000, ["utterance"] * 3, Judge())
    assert out["utterances"] == 3 and set(out) == {"utterances", "griffin_lim", "neural"}
    for name, decoder in (("griffin_lim", tok), ("neural", VocodedMelTokenizer(tok, vocoder))):
        scores = out[name]
        assert scores["audio_seconds_per_second"] > 0 and scores["asr_wer_ground_truth"] == 0.0
        recs = [decoder.decode(decoder.encode(torch.from_numpy(w)[None], 16000).codes)[0][: len(w)] for w in waves]
        want = np.mean([float(mel_distance(r[None], torch.from_numpy(w)[None])[0]) for r, w in zip(recs, waves)])
        assert scores["mel_distance"] == pytest.approx(want, rel=1e-5)


def test_pipeline_vocoder_choice(tmp_path):
    """generation.vocoder / vocoder=: the same speech codes through Griffin-Lim or the run's neural vocoder; a run
    without one refuses it; a vocoder for other mel features is refused at load."""
    from test_generation_pipeline import build_tiny_run

    from anyloom.generation.config import GenerationConfig
    from anyloom.generation.pipeline import PipelineError, load

    run = build_tiny_run(tmp_path / "tiny")
    with pytest.raises(PipelineError, match="no neural vocoder"):
        load(run, device="cpu").generate("two red circles", to="audio", vocoder="neural")
    with pytest.raises(PipelineError, match="expected 'auto', 'griffin_lim' or 'neural'"):
        load(run, device="cpu").generate("two red circles", to="audio", vocoder="hifigan")
    pipe = load(run, device="cpu")
    without = pipe.generate("two red circles", to="audio", seed=3, candidates=2)  # auto: Griffin-Lim, the only one
    torch.manual_seed(0)
    MelVocoder(TINY, pipe.audio_tokenizer.cfg.features).save(run / "stages" / "vocoder" / "vocoder")
    pipe = load(run, device="cpu")
    gl = pipe.generate("two red circles", to="audio", seed=3, candidates=2, vocoder="griffin_lim")
    neural = pipe.generate("two red circles", to="audio", seed=3, candidates=2, vocoder="neural")
    assert np.array_equal(gl.wave, without.wave)
    auto = pipe.generate("two red circles", to="audio", seed=3, candidates=2)  # auto: the run's vocoder
    assert np.array_equal(auto.wave, neural.wave)
    assert torch.equal(gl.codes, neural.codes) and gl.score == neural.score  # the same candidate kept
    expected = pipe.vocoder.vocode(pipe.audio_tokenizer.decode_mel(neural.codes[None]))[0].numpy()
    assert np.array_equal(neural.wave, expected[: len(neural.wave)])
    assert not np.allclose(neural.wave, gl.wave)
    by_recipe = load(run, device="cpu", config=GenerationConfig(vocoder="neural"))
    again = by_recipe.generate("two red circles", to="audio", seed=3, candidates=2)
    assert np.array_equal(again.wave, neural.wave)
    reply = by_recipe.generate("two red circles", to="any", seed=1, vocoder="griffin_lim")
    assert reply.segments  # the mixed reply takes the option too
    wrong = MelFeatureConfig(n_fft=256, win_length=256, hop_length=160, n_mels=16, f_max=4000.0)
    MelVocoder(TINY, wrong).save(run / "stages" / "vocoder" / "vocoder")
    with pytest.raises(PipelineError, match="belongs to another run"):
        load(run, device="cpu")
