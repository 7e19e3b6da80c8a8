"""Audio tokenizers: the contract, input handling, Griffin-Lim, save/load, training and metrics (tiny configs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anyloom.tokenizers.audio_common import AudioInputError, prepare_wave
from anyloom.tokenizers.audio_mel import MelFeatureConfig, MelFeatures, MelTokenizer, MelTokenizerConfig
from anyloom.tokenizers.base import AudioTokenizer


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
    from anyloom.training.weights import save_weights

    save_weights(tmp_path / "x", {"w": torch.zeros(1)}, {"kind": "something_else"})
    with pytest.raises(ValueError, match="kind"):
        MelTokenizer.load(tmp_path / "x")


def test_numpy_input_is_accepted(mel_tok):
    wave = speechlike(0.3, seed=8)
    a = mel_tok.encode(wave[None].numpy().astype(np.float64), 16000).codes
    assert torch.equal(a, mel_tok.encode(wave[None], 16000).codes)
