"""Audio tokenizers: the contract, input handling, Griffin-Lim, save/load, training and metrics (tiny configs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anyloom.tokenizers.audio_common import AudioInputError, prepare_wave
from anyloom.tokenizers.audio_mel import MelFeatureConfig, MelFeatures, MelTokenizer, MelTokenizerConfig
from anyloom.tokenizers.base import AudioTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

def tiny_mel_config(**kw) -> MelTokenizerConfig:
    base = dict(channels=32, res_blocks=1, code_dim=16, num_codebooks=2, codebook_size=32, griffin_lim_iters=8)
    base.update(kw)
    return MelTokenizerConfig(**base)


def speechlike(seconds: float = 0.5, sr: int = 16000, seed: int = 0) -> torch.Tensor:
    """A harmonic tone with a gliding pitch and a syllable-rate envelope: (T,) float in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sr)) / sr
    f0 = 120 + 40 * torch.rand(1, generator=g) + 30 * torch.sin(2 * math.pi * 1.5 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / sr
    wave = sum(torch.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.6 + 0.4 * torch.sin(2 * math.pi * 4 * t)
    return (0.3 * wave * envelope).float()


@pytest.fixture(scope="module")
def mel_tok() -> MelTokenizer:
    torch.manual_seed(0)
    tok = MelTokenizer(tiny_mel_config())
    # initialise the codebooks (k-means on one batch) so that encode is a pure function afterwards
    tok.train()
    with torch.no_grad():
        waves = torch.stack([speechlike(seed=i) for i in range(4)])
        mel = tok.features.log_mel(waves)
        tok.fit_normalization(mel)
        tok(tok.normalize(mel))
    return tok.eval()


def test_contract_shapes_and_rates(mel_tok):
    assert isinstance(mel_tok, AudioTokenizer)
    assert mel_tok.sample_rate == 16000 and mel_tok.frame_rate == 50.0
    assert mel_tok.num_codebooks == 2 and mel_tok.codebook_size == 32
    wave = torch.stack([speechlike(0.5, seed=1), speechlike(0.5, seed=2)])
    out = mel_tok.encode(wave, 16000)
    assert out.codes.shape == (2, 2, 25) and out.codes.dtype == torch.int64
    assert out.lengths.tolist() == [25, 25]
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < 32
    audio = mel_tok.decode(out.codes)
    assert audio.shape == (2, 25 * 320) and torch.isfinite(audio).all() and audio.abs().max() <= 1.0
    assert mel_tok.cfg.tokens_per_second == 100.0
    assert MelTokenizer(tiny_mel_config(downsample=2)).frame_rate == 25.0


def test_int16_stereo_and_resampling_are_handled(mel_tok):
    wave = speechlike(0.5, seed=3)
    codes = mel_tok.encode(wave[None], 16000).codes
    pcm = (wave * 32768).round().clamp(-32768, 32767).to(torch.int16)
    assert torch.equal(prepare_wave(pcm, 16000, 16000).wave[0], pcm.float() / 32768)
    # int16 rounding moves a few residual codes that sit near a tie; the first level must agree
    from_pcm = mel_tok.encode(pcm[None], 16000).codes
    assert torch.equal(from_pcm[:, 0], codes[:, 0]) and (from_pcm == codes).float().mean() > 0.9
    stereo = torch.stack([wave, wave], dim=0)[None]  # (1, 2, T): the downmix is the mean
    assert torch.equal(mel_tok.encode(stereo, 16000).codes, codes)
    assert torch.allclose(prepare_wave(torch.stack([wave, -wave])[None], 16000, 16000).wave, torch.zeros(1, 8000))
    # 8 kHz and 22.05 kHz input are resampled to 16 kHz: the same duration gives the same frame count
    assert mel_tok.encode(speechlike(0.5, sr=8000)[None], 8000).codes.shape[-1] == 25
    assert mel_tok.encode(speechlike(0.5, sr=22050)[None], 22050).codes.shape[-1] == 25
    # a padded batch: lengths (in input samples) map to valid frames
    out = mel_tok.encode(torch.zeros(2, 16000), 16000, lengths=torch.tensor([16000, 3300]))
    assert out.lengths.tolist() == [50, 11]


def test_prepare_wave_resample_preserves_a_tone():
    sr_in, sr_out = 22050, 16000
    t = torch.arange(sr_in) / sr_in
    prepared = prepare_wave(0.5 * torch.sin(2 * math.pi * 440 * t), sr_in, sr_out)
    assert prepared.wave.shape == (1, sr_out)
    t_out = torch.arange(sr_out) / sr_out
    expected = 0.5 * torch.sin(2 * math.pi * 440 * t_out)
    assert (prepared.wave[0, 200:-200] - expected[200:-200]).abs().max() < 1e-3


@pytest.mark.parametrize(
    "wave, sr, message",
    [
        (torch.zeros(1, 0), 16000, "empty"),
        (torch.zeros(1, 100), 16000, "too short"),
        (torch.tensor([[0.0, float("nan")] * 400]), 16000, "NaN"),
        (torch.full((1, 800), 3.0), 16000, "beyond"),
        (torch.zeros(1, 800, dtype=torch.int32), 16000, "dtype"),
        (torch.zeros(1, 800), 0, "sample_rate"),
        (torch.zeros(2, 2, 2, 800), 16000, "shape"),
    ],
)
def test_bad_input_gets_a_clear_error(mel_tok, wave, sr, message):
    with pytest.raises(AudioInputError, match=message):
        mel_tok.encode(wave, sr)


def test_slight_clipping_is_clamped_and_counted():
    wave = torch.tensor([[0.0, 1.02, -1.01, 0.5]])
    prepared = prepare_wave(wave, 16000, 16000)
    assert prepared.clamped_samples == 2 and prepared.wave.abs().max() <= 1.0


def test_decode_rejects_bad_codes(mel_tok):
    with pytest.raises(ValueError, match="out of range"):
        mel_tok.decode(torch.full((1, 2, 5), 32))
    with pytest.raises(ValueError, match=r"\(B, 2, F\)"):
        mel_tok.decode(torch.zeros(1, 3, 5, dtype=torch.long))


def test_griffin_lim_recovers_the_mel_of_a_real_signal():
    feats = MelFeatures(MelFeatureConfig())
    wave = speechlike(1.0, seed=5)[None]
    log_mel = feats.log_mel(wave)
    mel_of_linear = torch.einsum("bkf,km->bmf", feats.to_linear(log_mel), feats.fb).clamp_min(1e-2).log()
    assert (mel_of_linear - log_mel).abs().mean() < 0.01  # the filterbank inverse is (nearly) exact
    # iterations reduce the spectral inconsistency: the re-analysed mel approaches the target
    errors = []
    for iters in (0, 32):
        rebuilt = feats.griffin_lim(feats.to_linear(log_mel), iters, 0.99)
        assert rebuilt.shape == wave.shape
        voiced = log_mel > math.log(1e-2)
        errors.append(float((feats.log_mel(rebuilt) - log_mel)[voiced].abs().mean()))
    assert errors[1] < 0.5 * errors[0] and errors[1] < 0.4, errors


def test_save_load_round_trip(mel_tok, tmp_path):
    folder = mel_tok.save(tmp_path / "tok")
    loaded = MelTokenizer.load(folder)
    wave = speechlike(0.4, seed=7)[None]
    a, b = mel_tok.encode(wave, 16000).codes, loaded.encode(wave, 16000).codes
    assert torch.equal(a, b)
    assert torch.equal(mel_tok.decode(a), loaded.decode(b))
    assert loaded.cfg == mel_tok.cfg


def test_load_refuses_a_foreign_folder(tmp_path):
    from anyloom.weights import save_weights

    save_weights(tmp_path / "x", {"w": torch.zeros(1)}, {"kind": "something_else"})
    with pytest.raises(ValueError, match="kind"):
        MelTokenizer.load(tmp_path / "x")


def test_numpy_input_is_accepted(mel_tok):
    wave = speechlike(0.3, seed=8)
    a = mel_tok.encode(wave[None].numpy().astype(np.float64), 16000).codes
    assert torch.equal(a, mel_tok.encode(wave[None], 16000).codes)


# -- training ------------------------------------------------------------------------------------------------
def _speech_manifest(folder, n: int, seed: int = 0):
    """A JSONL manifest of ``n`` synthetic utterances (WAV files at 22.05 kHz: exercises resampling)."""
    import json

    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        sf.write(folder / f"a{i}.wav", speechlike(0.6, sr=22050, seed=seed + i).numpy(), 22050, subtype="PCM_16")
        lines.append(json.dumps({"segments": [{"text": f"utterance {i}"}, {"audio": f"a{i}.wav"}]}))
    lines.append(json.dumps({"segments": [{"text": "no audio here"}]}))
    (folder / "m.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "m.jsonl"


def _tiny_stage(steps: int, ckpt_every: int = 0):
    from anyloom.training.audio_tokenizer import AudioTokenizerStageConfig, AudioTokenizerTrainConfig
    from anyloom.training.optim import OptimConfig

    return AudioTokenizerStageConfig(
        mel=tiny_mel_config(codebook_size=16),
        optim=OptimConfig(lr=3e-3, weight_decay=0.0, warmup_steps=2),
        train=AudioTokenizerTrainConfig(steps=steps, batch_size=4, crop_seconds=0.2, log_every=1,
                                        ckpt_every=ckpt_every, num_samples=1, eval_items=0, max_seconds=0),
    )


def test_training_improves_exports_and_skips_when_done(tmp_path):
    import json

    from anyloom.training.audio_tokenizer import train_audio_tokenizer
    from anyloom.training.run import RunDir

    manifest = _speech_manifest(tmp_path / "data", 6)
    run = RunDir(tmp_path / "run")
    folder = train_audio_tokenizer(_tiny_stage(40), manifest, manifest, run)
    records = [json.loads(line) for line in run.metrics_file.read_text().splitlines()]
    first, last = records[0]["mel_l1_nats"], records[-1]["mel_l1_nats"]
    assert last < 0.7 * first, (first, last)
    assert sorted(p.name for p in run.samples.glob("*.wav")) == [
        "audio_0_original.wav", "audio_step0000040_0_reconstruction.wav"]
    tok = MelTokenizer.load(folder)
    assert tok.encode(speechlike(0.3)[None], 16000).codes.shape == (1, 2, 15)
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert train_audio_tokenizer(_tiny_stage(40), manifest, manifest, run) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # same fingerprint: not retrained
    # the waveform codec's section does not concern a mel tokenizer: editing it does not retrain either
    import dataclasses

    from anyloom.tokenizers.audio_codec import WaveCodecConfig

    other = dataclasses.replace(_tiny_stage(40), codec=WaveCodecConfig(num_codebooks=2))
    assert train_audio_tokenizer(other, manifest, manifest, run) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_resume_equals_uninterrupted(tmp_path):
    import shutil

    from anyloom.training.audio_tokenizer import train_audio_tokenizer
    from anyloom.training.run import RunDir

    manifest = _speech_manifest(tmp_path / "data", 4)
    whole = MelTokenizer.load(train_audio_tokenizer(_tiny_stage(12, ckpt_every=6), manifest, manifest,
                                                    RunDir(tmp_path / "a")))
    run = RunDir(tmp_path / "b")
    train_audio_tokenizer(_tiny_stage(12, ckpt_every=6), manifest, manifest, run)
    # simulate a crash after step 6: only the first checkpoint survives
    shutil.rmtree(run.path / "tokenizer")
    shutil.rmtree(run.checkpoints / "step_0000012")
    resumed = MelTokenizer.load(train_audio_tokenizer(_tiny_stage(12, ckpt_every=6), manifest, manifest, run))
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_load_speech_reports_documents_without_audio(tmp_path):
    from anyloom.training.audio_tokenizer import load_speech

    speech = load_speech(_speech_manifest(tmp_path / "data", 3), 16000)
    assert len(speech.waves) == 3 and speech.skipped == 1 and speech.texts[0] == "utterance 0"
    assert abs(len(speech.waves[0]) - 0.6 * 16000) <= 1  # resampled from 22.05 kHz


def test_load_speech_reads_each_recording_once(tmp_path):
    """A recording that later documents name again (instruction documents) is read once, with its first text."""
    import json

    from anyloom.training.audio_tokenizer import load_speech

    manifest = _speech_manifest(tmp_path / "data", 2)
    again = {"segments": [{"text": "say utterance 1"}, {"audio": "a1.wav"}], "tasks": ["interleaved"]}
    manifest.write_text(manifest.read_text() + json.dumps(again) + "\n")
    speech = load_speech(manifest, 16000)
    assert speech.texts == ["utterance 0", "utterance 1"] and speech.repeated == 1 and speech.skipped == 1
    assert "1 repeated recording read once" in speech.counts()


# -- metrics -------------------------------------------------------------------------------------------------
def test_si_snr_matches_the_definition():
    from anyloom.evaluation.audio_metrics import si_snr

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 4000, generator=g)
    noise = torch.randn(2, 4000, generator=g)
    noise = noise - noise.mean(-1, keepdim=True)
    ref = ref - ref.mean(-1, keepdim=True)
    noise = noise - (noise * ref).sum(-1, keepdim=True) / ref.pow(2).sum(-1, keepdim=True) * ref  # orthogonal
    noise = noise / noise.norm(dim=-1, keepdim=True) * ref.norm(dim=-1, keepdim=True) / 10  # 20 dB below
    est = 3.0 * ref + 3.0 * noise  # scale does not matter
    assert torch.allclose(si_snr(est, ref), torch.full((2,), 20.0), atol=1e-3)
    assert si_snr(ref, ref).min() > 70


def test_mel_distance_and_evaluate_reconstruction(mel_tok):
    from anyloom.evaluation.audio_metrics import evaluate_reconstruction, mel_distance

    a = speechlike(0.5, seed=1)[None]
    assert float(mel_distance(a, a)[0]) == 0.0
    noise = 0.3 * torch.randn(1, 8000, generator=torch.Generator().manual_seed(0))  # every bin far above the floor
    assert float(mel_distance(noise * 0.5, noise)[0]) == pytest.approx(math.log(2), abs=1e-4)

    class EchoJudge:  # stands in for the ASR: "hears" the first reference only for loud audio
        def transcribe(self, waves, sample_rate):
            return ["one red circle" if np.abs(w).max() > 0.05 else "" for w in waves]

    def wer(refs, hyps):
        return sum(r != h for r, h in zip(refs, hyps)) / len(refs)

    waves = [speechlike(0.4, seed=i).numpy() for i in range(2)]
    report = evaluate_reconstruction(mel_tok, waves, 16000, ["one red circle", "two"], EchoJudge(), wer)
    assert report.items == 2 and report.asr_wer_ground_truth == 0.5
    assert report.tokens_per_second == 100.0 and math.isfinite(report.mel_distance)
    keys = report.as_eval()
    assert keys["audio_tokenizer.asr_wer_ground_truth"] == 0.5 and "audio_tokenizer.si_snr_db" in keys
    with pytest.raises(ValueError, match="references"):
        evaluate_reconstruction(mel_tok, waves, 16000, ["one"], EchoJudge(), wer)


def test_waveform_codec_trains_and_round_trips(tmp_path):
    import json

    from anyloom.tokenizers.audio_codec import SeanetConfig, WaveCodec, WaveCodecConfig
    from anyloom.training.audio_tokenizer import AudioTokenizerStageConfig, train_audio_tokenizer
    from anyloom.training.run import RunDir

    codec = WaveCodecConfig(
        seanet=SeanetConfig(num_filters=4, ratios=(8, 5, 4, 2), hidden_size=16, lstm_layers=1),
        num_codebooks=2, codebook_size=16,
    )
    stage = AudioTokenizerStageConfig(kind="seanet_codec", codec=codec, optim=_tiny_stage(1).optim,
                                      train=_tiny_stage(25).train)
    manifest = _speech_manifest(tmp_path / "data", 4)
    run = RunDir(tmp_path / "run")
    tok = WaveCodec.load(train_audio_tokenizer(stage, manifest, manifest, run))
    records = [json.loads(line) for line in run.metrics_file.read_text().splitlines()]
    assert records[-1]["mel_l1_nats"] < 0.8 * records[0]["mel_l1_nats"], (records[0], records[-1])
    out = tok.encode(speechlike(0.4)[None], 16000)
    assert out.codes.shape == (1, 2, 20) and tok.decode(out.codes).shape == (1, 6400)
    assert tok.decode(out.codes[:, :1]).shape == (1, 6400)  # quantizer dropout: one level decodes too
