"""Importers: tiny random transformers models saved as HF folders, imported, and compared (codes + audio)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from anyloom.tokenizers.audio_codec import WaveCodec  # noqa: E402
from anyloom.tokenizers.audio_importers import import_encodec  # noqa: E402
from anyloom.tokenizers.base import AudioTokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

def _randomize_codebooks(model: torch.nn.Module, seed: int) -> None:
    """transformers initialises codebooks to zeros; give every buffer named ``embed`` random entries."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("codebook.embed"):
                buf.copy_(torch.randn(buf.shape, generator=g))


def _wave(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length) / 16000
    tone = torch.sin(2 * torch.pi * 440 * t) * 0.4
    return (tone + 0.2 * torch.randn(batch, length, generator=g)).clamp(-0.95, 0.95)


@pytest.mark.parametrize("causal, norm", [(True, "weight_norm"), (False, "time_group_norm")])
def test_encodec_parity(tmp_path, causal, norm):
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(0)
    cfg = EncodecConfig(
        sampling_rate=16000, audio_channels=1, hidden_size=16, num_filters=4, upsampling_ratios=[4, 2],
        num_residual_layers=1, codebook_size=16, target_bandwidths=[8.0, 16.0], use_causal_conv=causal,
        norm_type=norm, num_lstm_layers=1, compress=2,
    )
    ref = EncodecModel(cfg).eval()
    _randomize_codebooks(ref, 1)
    ref.save_pretrained(tmp_path / "encodec")
    assert json.loads((tmp_path / "encodec" / "config.json").read_text())["model_type"] == "encodec"

    ours = import_encodec(tmp_path / "encodec")
    assert isinstance(ours, AudioTokenizer) and isinstance(ours, WaveCodec)
    assert ours.num_codebooks == 2 and ours.codebook_size == 16 and ours.frame_rate == 2000.0

    wave = _wave(2, 403)  # not a multiple of the hop: exercises the extra padding
    with torch.no_grad():
        ref_codes = ref.encode(wave[:, None], bandwidth=16.0).audio_codes[0]  # (B, Q, F)
        ref_audio = ref.decode(ref_codes[None], [None]).audio_values[:, 0]
    codes = ours.encode(wave, 16000).codes
    assert torch.equal(codes, ref_codes)
    audio = ours.decode(codes)
    assert audio.shape == ref_audio.shape
    assert (audio - ref_audio).abs().max() <= 1e-4

    # a lower bandwidth keeps the first level only, like transformers
    low = import_encodec(tmp_path / "encodec", bandwidth=8.0)
    with torch.no_grad():
        ref_low = ref.encode(wave[:, None], bandwidth=8.0).audio_codes[0]
    assert torch.equal(low.encode(wave, 16000).codes, ref_low)

    # and the import survives our own save/load
    reloaded = WaveCodec.load(ours.save(tmp_path / "ours"))
    assert torch.equal(reloaded.encode(wave, 16000).codes, ref_codes)


def test_encodec_refuses_what_it_cannot_run(tmp_path):
    from transformers import EncodecConfig, EncodecModel

    cfg = EncodecConfig(audio_channels=2, hidden_size=8, num_filters=2, upsampling_ratios=[2], codebook_size=4,
                        normalize=True, chunk_length_s=1.0, overlap=0.01)
    EncodecModel(cfg).save_pretrained(tmp_path / "stereo")
    with pytest.raises(ValueError, match="mono"):
        import_encodec(tmp_path / "stereo")
    with pytest.raises(ValueError, match="model_type"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "config.json").write_text('{"model_type": "dac"}')
        import_encodec(tmp_path / "other")


def _tiny_dac(tmp_path, weight_norm: bool):
    from transformers import DacConfig, DacModel

    torch.manual_seed(0)
    cfg = DacConfig(encoder_hidden_size=4, downsampling_ratios=[2, 4], decoder_hidden_size=16,
                    upsampling_ratios=[4, 2], hidden_size=12, n_codebooks=3, codebook_size=16, codebook_dim=4,
                    sampling_rate=16000)
    ref = DacModel(cfg).eval()
    with torch.no_grad():  # transformers' init (std 0.02, zero biases) gives one code everywhere: re-draw all
        g = torch.Generator().manual_seed(3)
        for name, p in ref.named_parameters():
            if name.endswith("alpha"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.2 - 0.1)
            else:  # conv weights (He-style scale) and codebooks
                fan_in = p[0].numel() if p.ndim == 3 else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    if weight_norm:
        ref.apply_weight_norm()
    ref.save_pretrained(tmp_path / "dac")
    return ref


@pytest.mark.parametrize("weight_norm", [False, True])
def test_dac_parity(tmp_path, weight_norm):
    from anyloom.tokenizers.audio_dac import DacCodec
    from anyloom.tokenizers.audio_importers import import_dac

    ref = _tiny_dac(tmp_path, weight_norm)
    ours = import_dac(tmp_path / "dac")
    assert isinstance(ours, AudioTokenizer)
    assert ours.num_codebooks == 3 and ours.frame_rate == 2000.0
    wave = _wave(2, 400, seed=1)  # whole frames (hop 8)
    with torch.no_grad():
        out = ref.encode(wave[:, None])
        ref_audio = ref.decode(audio_codes=out.audio_codes).audio_values
    codes = ours.encode(wave, 16000).codes
    assert torch.equal(codes, out.audio_codes)
    audio = ours.decode(codes)
    assert audio.shape == ref_audio.shape and (audio - ref_audio).abs().max() <= 1e-4
    assert len(set(codes[:, 0].flatten().tolist())) > 1  # the check is not trivially satisfied
    # fewer levels: the prefix of the codes, like transformers' n_quantizers
    two = import_dac(tmp_path / "dac", num_codebooks=2)
    with torch.no_grad():
        ref_two = ref.encode(wave[:, None], n_quantizers=2).audio_codes
    assert torch.equal(two.encode(wave, 16000).codes, ref_two)
    from anyloom.generation.pipeline import load_tokenizer  # save/load through the pipeline's kind registry

    reloaded = load_tokenizer("audio", ours.save(tmp_path / "ours"))
    assert isinstance(reloaded, DacCodec) and torch.equal(reloaded.encode(wave, 16000).codes, codes)
