"""Mimi importer: a tiny random transformers MimiModel saved as an HF folder, imported, and compared."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from anyloom.tokenizers.audio_importers import import_mimi  # noqa: E402
from anyloom.tokenizers.audio_mimi import MimiCodec  # noqa: E402
from anyloom.tokenizers.base import AudioTokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def tiny_mimi(tmp_path_factory):
    """(reference model, folder): 4 codebooks (1 semantic + 3 acoustic), GQA, a sliding window shorter than the
    test audio, so every part of the port is exercised."""
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(0)
    cfg = MimiConfig(
        sampling_rate=16000, hidden_size=16, num_filters=4, upsampling_ratios=[4, 2], num_residual_layers=1,
        codebook_size=16, codebook_dim=8, vector_quantization_hidden_dimension=8, num_quantizers=4,
        num_semantic_quantizers=1, upsample_groups=16, num_hidden_layers=2, intermediate_size=32,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=5,
    )
    ref = MimiModel(cfg).eval()
    # transformers' init (std 0.02 linears, zero codebooks, layer scale 0.01) leaves the transformers nearly
    # silent and one code everywhere: re-draw everything at unit scale so a wrong detail changes the output
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, b in ref.named_buffers():
            if name.endswith("embed_sum"):
                b.copy_(torch.randn(b.shape, generator=g))
            elif name.endswith("cluster_usage"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
        for name, p in ref.named_parameters():
            if p.ndim > 1:  # conv / linear weights, He-style scale
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif name.endswith((".scale", "norm.weight")):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:  # biases
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    folder = tmp_path_factory.mktemp("mimi") / "hf"
    ref.save_pretrained(folder)
    return ref, folder


def _wave(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tone = torch.sin(2 * torch.pi * 440 * torch.arange(length) / 16000) * 0.4
    return (tone + 0.2 * torch.randn(batch, length, generator=g)).clamp(-0.95, 0.95)


def test_mimi_parity(tiny_mimi, tmp_path):
    ref, folder = tiny_mimi
    ours = import_mimi(folder)
    assert isinstance(ours, AudioTokenizer) and isinstance(ours, MimiCodec)
    assert ours.num_codebooks == 4 and ours.codebook_size == 16 and ours.frame_rate == 1000.0

    wave = _wave(2, 403)  # not a multiple of the hop (16): exercises the causal extra padding; 26 frames > window
    with torch.no_grad():
        ref_codes = ref.encode(wave[:, None]).audio_codes  # (B, Q, F)
        ref_audio = ref.decode(ref_codes).audio_values[:, 0]
    codes = ours.encode(wave, 16000).codes
    assert codes.shape == (2, 4, 26) and torch.equal(codes, ref_codes)
    assert all(len(set(codes[:, q].flatten().tolist())) > 3 for q in range(4))  # not trivially one code
    audio = ours.decode(codes)
    assert audio.shape == ref_audio.shape == (2, 26 * 16)
    assert (audio - ref_audio).abs().max() <= 1e-4

    # fewer levels: a prefix of the codes (transformers' num_quantizers), and a prefix decodes like transformers
    two = import_mimi(folder, num_codebooks=2)
    with torch.no_grad():
        ref_two = ref.encode(wave[:, None], num_quantizers=2).audio_codes
        ref_two_audio = ref.decode(ref_two).audio_values[:, 0]
    assert torch.equal(two.encode(wave, 16000).codes, ref_two)
    assert (ours.decode(ref_two) - ref_two_audio).abs().max() <= 1e-4

    # causal end to end: a whole-frame prefix of the audio encodes to a prefix of the codes
    assert torch.equal(ours.encode(wave[:, :208], 16000).codes, codes[..., :13])

    # and the import survives our own save/load, also through the generation pipeline's kind registry
    from anyloom.tokenizers.registry import load_tokenizer

    reloaded = load_tokenizer("audio", ours.save(tmp_path / "ours"))
    assert isinstance(reloaded, MimiCodec) and torch.equal(reloaded.encode(wave, 16000).codes, codes)


def test_mimi_refuses_bad_checkpoints(tiny_mimi, tmp_path):
    _, folder = tiny_mimi
    state = load_file(str(folder / "model.safetensors"))
    config = (folder / "config.json").read_text()

    def write(name: str, tensors: dict[str, torch.Tensor]):
        out = tmp_path / name
        out.mkdir()
        (out / "config.json").write_text(config)
        save_file(tensors, str(out / "model.safetensors"))
        return out

    key = "encoder_transformer.layers.1.mlp.fc1.weight"
    missing = write("missing", {k: v for k, v in state.items() if k != key})
    with pytest.raises(KeyError, match="encoder_transformer.layers.1.mlp.fc1.weight"):
        import_mimi(missing)
    conv = "decoder.layers.3.block.1.conv.weight"  # a SEANet key, renamed on import: the error names the original
    wrong = write("wrong", {**state, conv: torch.zeros(3, 3, 3)})
    with pytest.raises(ValueError, match=rf"{conv}.*\(3, 3, 3\)"):
        import_mimi(wrong)
    no_conv = write("no_conv", {k: v for k, v in state.items() if not k.startswith("decoder.layers.3.block.1")})
    with pytest.raises(KeyError, match=r"decoder\.layers\.3\.block\.1\.conv"):
        import_mimi(no_conv)
    book = "quantizer.acoustic_residual_vector_quantizer.layers.1.codebook.embed_sum"
    short = write("short_book", {**state, book: torch.zeros(16, 7)})
    with pytest.raises(ValueError, match=rf"{book}.*\(16, 7\)"):
        import_mimi(short)
    extra = write("extra", {**state, "decoder.extra.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="decoder.extra.weight"):
        import_mimi(extra)
    with pytest.raises(ValueError, match="num_codebooks must be 1..4"):
        import_mimi(folder, num_codebooks=5)
