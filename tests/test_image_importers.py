"""Emu3 and Chameleon VQ importers: parity with tiny random transformers models built offline."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from anyloom.tokenizers.base import DecoderUnavailableError, ImageTokenizer
from anyloom.tokenizers.image_import_chameleon import ChameleonVQTokenizer, import_chameleon_vq
from anyloom.tokenizers.image_import_emu3 import Emu3VQTokenizer, import_emu3_vq
from anyloom.tokenizers.image_importers import import_image_tokenizer

transformers = pytest.importorskip("transformers")  # a dev dependency; parity needs the reference


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random init leaves norms at 1/0 and BatchNorm stats at 0/1; move them so parity covers them too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and ("norm" in name or "running" in name):
                t.add_(torch.rand(t.shape, generator=g) * 0.5)  # positive: running_var stays > 0


def _save_hf(folder, model, config: dict, prefix: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sd = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    if prefix:
        sd["model.embed_tokens.weight"] = torch.zeros(4, 4)  # an LM tensor the importer must ignore
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))


def _emu3_reference(seed: int = 0):
    from transformers.models.emu3.configuration_emu3 import Emu3VQVAEConfig
    from transformers.models.emu3.modeling_emu3 import Emu3VQVAE

    torch.manual_seed(seed)
    cfg = Emu3VQVAEConfig(codebook_size=64, embed_dim=4, latent_channels=4, temporal_downsample_factor=2,
                          base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[1],
                          hidden_size=64, num_attention_heads=2)
    ref = Emu3VQVAE(cfg).eval()
    _perturb(ref, seed)
    return ref, cfg


def test_emu3_parity(tmp_path):
    ref, cfg = _emu3_reference()
    _save_hf(tmp_path / "emu3", ref, cfg.to_dict())
    ours = import_emu3_vq(tmp_path / "emu3", image_size=(16, 16))
    assert isinstance(ours, ImageTokenizer) and ours.grid == (8, 8) and ours.codebook_size == 64
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    normalized = ((images + 1) / 2 - ours.mean) / ours.std
    with torch.no_grad():
        ref_codes = torch.stack(ref.encode(normalized, image_sizes=torch.tensor([[16, 16]] * 3)).image_tokens)
        ref_images = ref.decode(ref_codes)
    codes = ours.encode(images).codes
    assert codes.dtype == torch.int64 and len(codes.unique()) > 3  # a degenerate map would prove little
    assert torch.equal(codes, ref_codes)
    assert (ours.decode_raw(codes) - ref_images).abs().max().item() <= 1e-4
    decoded = ours.decode(codes)
    torch.testing.assert_close(decoded, ((ref_images * ours.std + ours.mean) * 2 - 1).clamp(-1, 1), atol=1e-4, rtol=0)
    ours.save(tmp_path / "saved")
    assert torch.equal(Emu3VQTokenizer.load(tmp_path / "saved").encode(images).codes, ref_codes)
    with pytest.raises(ValueError, match="not a saved ChameleonVQTokenizer"):
        ChameleonVQTokenizer.load(tmp_path / "saved")
    # the whole-model layout (vq_config + model.vqmodel. prefix) imports to the same weights
    _save_hf(tmp_path / "full", ref, {"model_type": "emu3", "vq_config": cfg.to_dict()}, prefix="model.vqmodel.")
    full = import_image_tokenizer(tmp_path / "full", image_size=(16, 16))
    assert isinstance(full, Emu3VQTokenizer) and torch.equal(full.encode(images).codes, ref_codes)
    # save / load round trip of our own format
    ours.save(tmp_path / "saved")
    again = Emu3VQTokenizer.load(tmp_path / "saved")
    assert torch.equal(again.decode(codes), decoded)


def _chameleon_reference(seed: int = 0):
    from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    torch.manual_seed(seed)
    cfg = ChameleonVQVAEConfig(embed_dim=8, num_embeddings=64, latent_channels=8, resolution=16, base_channels=32,
                               channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[8])
    ref = ChameleonVQVAE(cfg).eval()
    _perturb(ref, seed)
    return ref, cfg


def test_chameleon_parity(tmp_path):
    ref, cfg = _chameleon_reference()
    _save_hf(tmp_path / "cham", ref, cfg.to_dict())
    ours = import_chameleon_vq(tmp_path / "cham")
    assert ours.grid == (8, 8) and ours.image_size == (16, 16) and ours.codebook_size == 64
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ref_out = ref.encode(images)
    ref_codes = ref_out.image_tokens.view(3, 8, 8)
    codes = ours.encode(images).codes
    assert len(codes.unique()) > 3
    assert torch.equal(codes, ref_codes)
    with torch.no_grad():
        assert (ours.encoder(images) - ref_out.last_hidden_state).abs().max().item() <= 1e-4
    with pytest.raises(DecoderUnavailableError, match="no decoder weights"):
        ours.decode(codes)
    _save_hf(tmp_path / "full", ref, {"model_type": "chameleon", "vq_config": cfg.to_dict()}, prefix="model.vqmodel.")
    full = import_image_tokenizer(tmp_path / "full")
    assert isinstance(full, ChameleonVQTokenizer) and torch.equal(full.encode(images).codes, ref_codes)
    ours.save(tmp_path / "saved")
    assert torch.equal(ChameleonVQTokenizer.load(tmp_path / "saved").encode(images).codes, ref_codes)


def test_importers_fail_clearly(tmp_path):
    ref, cfg = _chameleon_reference()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        import_chameleon_vq(tmp_path / "nothing")
    _save_hf(tmp_path / "other", ref, {"model_type": "llama"})
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        import_chameleon_vq(tmp_path / "other")
    # a config that disagrees with the weights: every mismatched shape is reported, nothing is loaded
    bad = cfg.to_dict() | {"num_embeddings": 128}
    _save_hf(tmp_path / "shape", ref, bad)
    with pytest.raises(ValueError, match=r"other shapes .*quantize\.embedding\.weight"):
        import_chameleon_vq(tmp_path / "shape")
    # a missing tensor is named
    sd = {k: v for k, v in ref.state_dict().items() if k != "quant_conv.weight"}
    (tmp_path / "missing").mkdir()
    save_file(sd, str(tmp_path / "missing" / "model.safetensors"))
    (tmp_path / "missing" / "config.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(ValueError, match=r"missing .*quant_conv\.weight"):
        import_chameleon_vq(tmp_path / "missing")
    # a config without a required key names it
    partial = cfg.to_dict()
    del partial["embed_dim"]
    _save_hf(tmp_path / "nokey", ref, partial)
    with pytest.raises(ValueError, match="missing 'embed_dim'"):
        import_chameleon_vq(tmp_path / "nokey")
    ref_e, cfg_e = _emu3_reference()
    _save_hf(tmp_path / "emu3", ref_e, cfg_e.to_dict() | {"hidden_size": 32})
    with pytest.raises(ValueError, match="hidden_size 32 must equal"):
        import_emu3_vq(tmp_path / "emu3", image_size=(16, 16))
