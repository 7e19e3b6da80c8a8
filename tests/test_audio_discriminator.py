"""MS-STFT discriminator: shapes, golden loss values, and its wiring into the waveform codec's training loop."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from anyloom.tokenizers.audio_discriminator import (
    DiscriminatorConfig,
    MultiScaleSTFTDiscriminator,
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_disc(**kw) -> DiscriminatorConfig:
    base = dict(enabled=True, n_ffts=(128, 64), hop_lengths=(32, 16), channels=4, start_step=0)
    base.update(kw)
    return DiscriminatorConfig(**base)


def test_output_shapes_per_scale():
    torch.manual_seed(0)
    cfg = tiny_disc()
    disc = MultiScaleSTFTDiscriminator(cfg)
    out = disc(torch.randn(2, 1000) * 0.1)
    assert len(out.logits) == len(out.features) == 2
    for n_fft, hop, logits, feats in zip(cfg.n_ffts, cfg.hop_lengths, out.logits, out.features):
        frames = 1 + (1000 - n_fft) // hop  # no centring
        bins = n_fft // 2 + 1
        widths = [bins]
        for _ in cfg.time_dilations:  # stride 2 with "same" padding along frequency
            widths.append((widths[-1] - 1) // 2 + 1)
        expected = [(2, 4, frames, widths[0])] + [(2, 4, frames, w) for w in widths[1:]] + [(2, 4, frames, widths[-1])]
        assert [tuple(f.shape) for f in feats] == expected
        assert tuple(logits.shape) == (2, 1, frames, widths[-1])
    # the input channels are the real and imaginary STFT, scaled by 1 / ||window||
    wave = torch.randn(1, 300)
    scale = disc.scales[1]
    spec = torch.stft(wave, 64, 16, window=torch.hann_window(64), center=False, return_complex=True)
    spec = spec / torch.hann_window(64).pow(2).sum().sqrt()  # (1, W, F)
    x = scale.spectrogram(wave)  # (1, 2, F, W)
    assert torch.allclose(x[0, 0], spec[0].real.T) and torch.allclose(x[0, 1], spec[0].imag.T)
    with pytest.raises(ValueError, match="largest n_fft"):
        disc(torch.randn(2, 100))


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="equal length"):
        DiscriminatorConfig(n_ffts=(64, 128), hop_lengths=(16,))
    with pytest.raises(ValueError, match="hop_length"):
        DiscriminatorConfig(n_ffts=(64,), hop_lengths=(128,))
    from anyloom.training.audio_tokenizer import AudioTokenizerStageConfig

    with pytest.raises(ValueError, match="seanet_codec"):
        AudioTokenizerStageConfig(kind="mel_rvq", discriminator=DiscriminatorConfig(enabled=True))


def test_recipe_override_turns_it_on():
    from anyloom.recipes import load_recipe

    recipe = load_recipe("audio_tokenizer", ["audio_tokenizer.kind=seanet_codec",
                                             "audio_tokenizer.discriminator.enabled=true",
                                             "audio_tokenizer.discriminator.loss=least_squares"])
    assert recipe.audio_tokenizer.discriminator.enabled
    assert recipe.audio_tokenizer.discriminator.loss == "least_squares"
    assert not load_recipe("world").audio_tokenizer.discriminator.enabled  # the default stays off


def test_adversarial_losses_golden_values():
    t = torch.tensor
    # a perfect hinge discriminator (real >= 1, fake <= -1) has nothing left to learn
    assert float(discriminator_loss([t([2.0, 1.0])], [t([-1.0, -3.0])], "hinge")) == 0.0
    # undecided scores: relu(1 - 0.5) + relu(1 + 0.5) = 2, and scales average
    assert float(discriminator_loss([t([0.5]), t([2.0])], [t([0.5]), t([-2.0])], "hinge")) == pytest.approx(1.0)
    assert float(generator_loss([t([2.0, -1.0])], "hinge")) == pytest.approx(1.0)  # mean(0, 2)
    assert float(generator_loss([t([1.0]), t([3.0])], "hinge")) == 0.0  # fooled at every scale
    # least squares: targets 1 (real) and 0 (fake)
    assert float(discriminator_loss([t([1.0])], [t([0.0])], "least_squares")) == 0.0
    assert float(discriminator_loss([t([0.0])], [t([1.0])], "least_squares")) == pytest.approx(2.0)
    assert float(generator_loss([t([1.0]), t([3.0])], "least_squares")) == pytest.approx(2.0)  # mean(0, 4)


def test_feature_matching_is_normalised_per_layer():
    g = torch.Generator().manual_seed(0)
    real = [[torch.randn(2, 3, 4, generator=g), 100 * torch.randn(2, 5, generator=g)], [torch.randn(3, generator=g)]]
    assert float(feature_matching_loss(real, [[f.clone() for f in fs] for fs in real])) == 0.0
    # every layer off by half its own magnitude -> 0.5, however different the layers' scales are
    assert float(feature_matching_loss(real, [[1.5 * f for f in fs] for fs in real])) == pytest.approx(0.5)
    # layer terms average over all layers of all scales: (1 + 0 + 0) / 3
    fake = [[torch.zeros(2, 3, 4), real[0][1].clone()], [real[1][0].clone()]]
    assert float(feature_matching_loss(real, fake)) == pytest.approx(1 / 3)
    # the real maps are targets: no gradient reaches them
    r = [[torch.ones(4, requires_grad=True)]]
    f = [[torch.zeros(4, requires_grad=True)]]
    feature_matching_loss(r, f).backward()
    assert r[0][0].grad is None and torch.allclose(f[0][0].grad, torch.full((4,), -0.25))
    with pytest.raises(ValueError, match="shapes differ"):
        feature_matching_loss([[torch.ones(3)]], [[torch.ones(4)]])


# -- training loop -------------------------------------------------------------------------------------------
def _stage(steps: int, start_step: int):
    from anyloom.tokenizers.audio_codec import SeanetConfig, WaveCodecConfig
    from anyloom.training.audio_tokenizer import AudioTokenizerStageConfig, AudioTokenizerTrainConfig
    from anyloom.training.optim import OptimConfig

    codec = WaveCodecConfig(seanet=SeanetConfig(num_filters=4, ratios=(8, 5, 4, 2), hidden_size=16, lstm_layers=1),
                            num_codebooks=2, codebook_size=16)
    return AudioTokenizerStageConfig(
        kind="seanet_codec", codec=codec, optim=OptimConfig(lr=3e-3, weight_decay=0.0, warmup_steps=2),
        train=AudioTokenizerTrainConfig(steps=steps, batch_size=2, crop_seconds=0.2, log_every=1, ckpt_every=3,
                                        num_samples=1, eval_items=0, max_seconds=0),
        discriminator=tiny_disc(n_ffts=(256, 512), hop_lengths=(64, 128), start_step=start_step),
    )


def _speech_manifest(folder, n: int):
    """A JSONL manifest of ``n`` short synthetic voiced sounds (harmonics of a gliding pitch) as 16 kHz WAVs."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    t = torch.arange(9600) / 16000
    lines = []
    for i in range(n):
        phase = 2 * math.pi * torch.cumsum(110 + 20 * i + 30 * torch.sin(2 * math.pi * 2 * t), 0) / 16000
        wave = 0.3 * sum(torch.sin(k * phase) / k for k in range(1, 6)) * (0.6 + 0.4 * torch.sin(2 * math.pi * 4 * t))
        sf.write(folder / f"a{i}.wav", wave.numpy(), 16000, subtype="PCM_16")
        lines.append(json.dumps({"segments": [{"text": f"sound {i}"}, {"audio": f"a{i}.wav"}]}))
    (folder / "m.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "m.jsonl"


def _checkpoint(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from anyloom.training.snapshots import TENSORS

    return load_file(str(folder / TENSORS))


def _disc_state(folder) -> dict[str, torch.Tensor]:
    return {k: v for k, v in _checkpoint(folder).items() if k.startswith(("model.disc.", "optim.disc_optim."))}


def test_codec_trains_with_the_discriminator_and_resumes(tmp_path):
    from anyloom.tokenizers.audio_codec import WaveCodec
    from anyloom.training.audio_tokenizer import train_audio_tokenizer
    from anyloom.training.run import RunDir
    from anyloom.weights import load_weights

    manifest = _speech_manifest(tmp_path / "data", 3)
    stage = _stage(steps=6, start_step=2)
    run = RunDir(tmp_path / "run")
    folder = train_audio_tokenizer(stage, manifest, manifest, run)
    records = [json.loads(line) for line in run.metrics_file.read_text().splitlines() if '"d_loss"' in line]
    assert [r["step"] for r in records] == [2, 3, 4, 5]  # the delayed start: nothing adversarial before step 2
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("d_loss", "g_adv", "g_feat", "loss")), r
        assert r["g_feat"] > 0
    before, after = _disc_state(run.checkpoints / "step_0000003"), _disc_state(run.checkpoints / "step_0000006")
    weights = sorted(k for k in after if k.startswith("model.disc."))
    assert weights == sorted(k for k in before if k.startswith("model.disc.")) and weights
    assert any(k.startswith("optim.disc_optim.") for k in after)
    assert any(not torch.equal(before[k], after[k]) for k in weights)  # steps 3..5 moved the discriminator
    # the discriminator is training state only: the export is the codec alone
    assert set(load_weights(folder).state_dict) == set(WaveCodec(stage.codec).state_dict())

    # crash after step 3 (the discriminator has had one update): the resumed run restores it and its Adam
    # state, and ends exactly where the whole run ended
    final_model = {k: v for k, v in _checkpoint(run.checkpoints / "step_0000006").items()
                   if k.startswith("model.model.")}
    shutil.rmtree(run.path / "tokenizer")
    shutil.rmtree(run.checkpoints / "step_0000006")
    train_audio_tokenizer(stage, manifest, manifest, run)
    resumed = _checkpoint(run.checkpoints / "step_0000006")
    for k, v in after.items():
        assert torch.equal(resumed[k], v), k
    for k, v in final_model.items():
        assert torch.equal(resumed[k], v), k
