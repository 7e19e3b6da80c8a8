"""Meta's original Chameleon layout (Anole's release) and Chameleon's VQGAN decoder, checked offline.

A tiny random HF ``ChameleonForConditionalGeneration`` is written out in Meta's layout by inverting transformers'
conversion (names, RoPE row order, one q/k LayerNorm per tensor-parallel shard, the shards themselves), then read
back: the HF-named tensors must equal the model's and our Transformer's logits the model's. The VQGAN checkpoint
holds an HF ``ChameleonVQVAE``'s encoder (so codes can be compared with the HF import) and a random decoder, which
is checked against a functional taming-style forward written from the key names.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from anyloom.pretrained.meta_chameleon import import_meta_lm, is_meta_chameleon, read_meta_chameleon
from anyloom.tokenizers.base import DecoderUnavailableError
from anyloom.tokenizers.image_import_chameleon import (
    ChameleonVQConfig,
    ChameleonVQTokenizer,
    import_chameleon_vq,
    import_chameleon_vqgan,
    read_chameleon_vqgan,
)

transformers = pytest.importorskip("transformers")  # a dev dependency; parity needs the reference

V, D, H, K, LAYERS = 64, 32, 4, 2, 2
E = D // H
TOL = 1e-4
IMAGE_TOKEN = 10


def _vocab() -> dict[str, int]:
    """Chameleon's special names at plausible ids, a few words, 8 image-code names; the rest reserved."""
    names = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<racm3:break>": 4, "<eoss>": 5,
             "<reserved08707>": IMAGE_TOKEN}
    names |= {w: 11 + i for i, w in enumerate(["two", "red", "circles", "a", "blue", "square", "on", "the", "left"])}
    names |= {f"IMGIMG{chr(65 + i)}Z": 20 + i for i in range(8)}
    taken = set(names.values())
    return names | {f"<reserved{i:05d}>": i for i in range(V) if i not in taken}


def _hf_vocab() -> dict[str, int]:
    vocab = _vocab()
    vocab["<image>"] = vocab.pop("<reserved08707>")
    return vocab


# ------------------------------------------------------------------------------------------ the VQGAN

VQ_YAML = {"model": {"target": "taming.models.vqgan.VQModel", "params": {
    "embed_dim": 8, "n_embed": 64,
    "ddconfig": {"double_z": False, "z_channels": 8, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
                 "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0},
    "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                   "params": {"disc_start": 0, "codebook_weight": 1.0}},
}}}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Norms start at 1 / 0; move them so the checks cover them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and "norm" in name:
                t.add_(torch.rand(t.shape, generator=g) * 0.5)


def _hf_vq():
    from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import ChameleonVQVAE

    torch.manual_seed(0)
    cfg = ChameleonVQVAEConfig(embed_dim=8, num_embeddings=64, latent_channels=8, resolution=16, base_channels=32,
                               channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[8])
    ref = ChameleonVQVAE(cfg).eval()
    _perturb(ref, 0)
    return ref, cfg


def _vqgan_state(ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The HF VQ's tensors (encoder, codebook, convs) + a random decoder + two training-loss tensors."""
    torch.manual_seed(1)
    full = ChameleonVQTokenizer(ChameleonVQConfig.from_taming(VQ_YAML["model"]["params"], "vqgan.yaml"))
    _perturb(full, 1)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state |= {k: v.clone() for k, v in full.state_dict().items() if k.startswith("decoder.")}
    state["loss.logvar"] = torch.zeros(())
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    return state


def _write_vqgan(folder, state: dict, config: dict = VQ_YAML, extra: dict | None = None) -> tuple:
    folder.mkdir(parents=True, exist_ok=True)
    ckpt, yml = folder / "vqgan.ckpt", folder / "vqgan.yaml"
    torch.save({"state_dict": state, "global_step": 10, **(extra or {})}, ckpt)
    yml.write_text(yaml.safe_dump(config))
    return ckpt, yml


def _gn(x, sd, p):
    return F.group_norm(x, 32, sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-6)


def _conv(x, sd, p, pad):
    return F.conv2d(x, sd[f"{p}.weight"], sd[f"{p}.bias"], padding=pad)


def _res(x, sd, p):
    h = _conv(F.silu(_gn(x, sd, f"{p}.norm1")), sd, f"{p}.conv1", 1)
    h = _conv(F.silu(_gn(h, sd, f"{p}.norm2")), sd, f"{p}.conv2", 1)
    return (_conv(x, sd, f"{p}.nin_shortcut", 0) if f"{p}.nin_shortcut.weight" in sd else x) + h


def _attn(x, sd, p):
    b, c, h, w = x.shape
    n = _gn(x, sd, f"{p}.norm")
    q, k, v = (_conv(n, sd, f"{p}.{m}", 0).reshape(b, c, h * w) for m in "qkv")  # (B, C, N)
    weights = torch.softmax(q.transpose(1, 2) @ k * c**-0.5, dim=-1)  # (B, N_q, N_k)
    return x + _conv((v @ weights.transpose(1, 2)).reshape(b, c, h, w), sd, f"{p}.proj_out", 0)


def _reference_decode(sd: dict, codes: torch.Tensor, levels: int, blocks: int) -> torch.Tensor:
    """taming's VQModel.decode written out from the checkpoint's key names (unclamped)."""
    h = _conv(sd["quantize.embedding.weight"][codes].permute(0, 3, 1, 2), sd, "post_quant_conv", 0)
    h = _conv(h, sd, "decoder.conv_in", 1)
    h = _res(_attn(_res(h, sd, "decoder.mid.block_1"), sd, "decoder.mid.attn_1"), sd, "decoder.mid.block_2")
    for i in reversed(range(levels)):
        for j in range(blocks + 1):
            h = _res(h, sd, f"decoder.up.{i}.block.{j}")
            if f"decoder.up.{i}.attn.{j}.q.weight" in sd:
                h = _attn(h, sd, f"decoder.up.{i}.attn.{j}")
        if i:
            h = _conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"decoder.up.{i}.upsample.conv", 1)
    return _conv(F.silu(_gn(h, sd, "decoder.norm_out")), sd, "decoder.conv_out", 1)


def test_vqgan_encodes_like_the_hf_import_and_decodes(tmp_path):
    ref, cfg = _hf_vq()
    state = _vqgan_state(ref)
    ckpt, yml = _write_vqgan(tmp_path / "meta", state)
    read = read_chameleon_vqgan(ckpt, yml)
    meta = read.tokenizer
    assert read.skipped == ["loss.discriminator.main.0.weight", "loss.logvar"]
    assert meta.cfg.has_decoder and meta.grid == (8, 8) and meta.image_size == (16, 16) and meta.codebook_size == 64
    assert not any(k.startswith("decoder.up.0.attn.") for k in state) and "decoder.up.1.attn.1.q.weight" in state

    (tmp_path / "hf").mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg.to_dict()))
    hf = import_chameleon_vq(tmp_path / "hf")
    assert hf.decoder is None and not hf.cfg.has_decoder

    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    codes = meta.encode(images).codes
    assert len(codes.unique()) > 3  # a degenerate map would prove little
    assert torch.equal(codes, hf.encode(images).codes)
    with torch.no_grad():
        assert torch.equal(codes, ref.encode(images).image_tokens.view(3, 8, 8))

    decoded = meta.decode(codes)
    assert decoded.shape == (3, 3, 16, 16) and decoded.dtype == torch.float32
    assert decoded.min() >= -1 and decoded.max() <= 1
    assert torch.equal(decoded, meta.decode(codes))  # deterministic
    with torch.no_grad():
        raw = _reference_decode(state, codes, levels=2, blocks=1)
    assert ((raw > -1) & (raw < 1)).float().mean() > 0.2  # not all clamped away: the comparison means something
    torch.testing.assert_close(decoded, raw.clamp(-1, 1), atol=1e-5, rtol=0)
    assert meta.decode(codes[:, :4, :4]).shape == (3, 3, 8, 8)  # convolutional: other grids decode too
    with pytest.raises(DecoderUnavailableError, match="no decoder weights.*vqgan.ckpt"):
        hf.decode(codes)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\)"):
        meta.decode(codes + 64)


def test_vqgan_save_load_round_trips_both_variants(tmp_path):
    ref, cfg = _hf_vq()
    meta = import_chameleon_vqgan(*_write_vqgan(tmp_path / "meta", _vqgan_state(ref)))
    codes = torch.randint(0, 64, (2, 8, 8), generator=torch.Generator().manual_seed(3))
    meta.save(tmp_path / "saved")
    again = ChameleonVQTokenizer.load(tmp_path / "saved")
    assert again.cfg == meta.cfg and again.cfg.has_decoder
    assert torch.equal(again.decode(codes), meta.decode(codes))

    # an encoder-only tokenizer saved before has_decoder / out_channels existed still loads, without a decoder
    (tmp_path / "hf").mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg.to_dict()))
    import_chameleon_vq(tmp_path / "hf").save(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    assert config.pop("has_decoder") is False and config.pop("out_channels") == 3
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    old = ChameleonVQTokenizer.load(tmp_path / "old")
    assert old.decoder is None and not any(k.startswith("decoder.") for k in old.state_dict())
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    assert torch.equal(old.encode(images).codes, meta.encode(images).codes)


class _TrainerState:
    """Stands for the Lightning objects some checkpoints pickle: loading one would need to run code."""


def test_vqgan_errors_name_the_file_and_key(tmp_path):
    ref, _ = _hf_vq()
    state = _vqgan_state(ref)
    missing = {k: v for k, v in state.items() if k != "decoder.up.0.block.1.conv2.weight"}
    ckpt, yml = _write_vqgan(tmp_path / "missing", missing)
    with pytest.raises(ValueError, match=r"vqgan\.ckpt: .*missing .*decoder\.up\.0\.block\.1\.conv2\.weight"):
        import_chameleon_vqgan(ckpt, yml)

    stray = state | {"decoder.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected .*decoder\.extra\.weight"):
        import_chameleon_vqgan(*_write_vqgan(tmp_path / "stray", stray))

    ckpt, yml = _write_vqgan(tmp_path / "pickled", state, extra={"trainer": _TrainerState()})
    with pytest.raises(ValueError, match=r"pickled/vqgan\.ckpt: cannot be read with torch\.load\(weights_only=True\)"):
        import_chameleon_vqgan(ckpt, yml)

    config = json.loads(json.dumps(VQ_YAML))
    del config["model"]["params"]["ddconfig"]["z_channels"]
    ckpt, yml = _write_vqgan(tmp_path / "nokey", state, config)
    with pytest.raises(ValueError, match=r"nokey/vqgan\.yaml:model\.params\.ddconfig: config is missing 'z_channels'"):
        import_chameleon_vqgan(ckpt, yml)

    config = json.loads(json.dumps(VQ_YAML))
    config["model"]["params"]["n_embed"] = 128
    with pytest.raises(ValueError, match=r"other shapes .*quantize\.embedding\.weight"):
        import_chameleon_vqgan(*_write_vqgan(tmp_path / "shape", state, config))


# --------------------------------------------------------------------------------------- the language model


def _hf_chameleon(swin_norm: bool, shards: int):
    """A tiny random HF Chameleon whose per-head q/k norms agree within each of ``shards`` groups of heads (what
    Meta's layout, one LayerNorm per tensor-parallel shard, can hold)."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    cfg = ChameleonConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=LAYERS,
                          num_attention_heads=H, num_key_value_heads=K, swin_norm=swin_norm,
                          vocabulary_map=_hf_vocab(), image_token_id=IMAGE_TOKEN, bos_token_id=0, eos_token_id=2,
                          pad_token_id=1,
                          vq_config=dict(embed_dim=8, num_embeddings=8, base_channels=32, channel_multiplier=[1, 1],
                                         latent_channels=8, resolution=16))
    torch.manual_seed(0)
    model = ChameleonForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and "vqmodel" not in name:
                center = 1.0 if name.endswith("weight") else 0.0
                p.copy_(center + 0.3 * torch.randn(p.shape, generator=g))
                if "q_norm" in name or "k_norm" in name:
                    group = p.shape[0] // shards
                    p.copy_(p[::group].repeat_interleave(group, 0))  # (heads, E): one row per shard
    return model


def _to_meta_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half rows back to Meta's interleaved pairs (the inverse of the converter's ``permute``)."""
    return w.view(heads, 2, w.shape[0] // heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def _to_meta_norm(row: torch.Tensor) -> torch.Tensor:
    return row.view(2, -1).t().reshape(-1)


def _write_meta(root, hf, shards: int, swin_norm: bool, vq_state: dict) -> None:
    """``hf`` in Meta's layout under ``root``: models/7b (``shards`` tensor-parallel files), tokenizer/."""
    sd = hf.state_dict()
    split = {0: lambda t, s: t.chunk(shards, 0)[s], 1: lambda t, s: t.chunk(shards, 1)[s], None: lambda t, s: t}
    model_dir = root / "models" / "7b"
    model_dir.mkdir(parents=True)
    for s in range(shards):
        out: dict = {"rope.freqs": None} if shards == 1 else {}  # Anole's file carries this placeholder
        out["tok_embeddings.weight"] = split[1](sd["model.embed_tokens.weight"], s)
        out["norm.weight"] = sd["model.norm.weight"]
        out["output.weight"] = split[0](sd["lm_head.weight"], s)
        for i in range(LAYERS):
            hf_layer, meta_layer = f"model.layers.{i}.", f"layers.{i}."
            wq = _to_meta_rows(sd[hf_layer + "self_attn.q_proj.weight"], H)
            wk = _to_meta_rows(sd[hf_layer + "self_attn.k_proj.weight"], K)
            for name, t, how in (("attention.wq", wq, 0), ("attention.wk", wk, 0),
                                 ("attention.wv", sd[hf_layer + "self_attn.v_proj.weight"], 0),
                                 ("attention.wo", sd[hf_layer + "self_attn.o_proj.weight"], 1),
                                 ("feed_forward.w1", sd[hf_layer + "mlp.gate_proj.weight"], 0),
                                 ("feed_forward.w2", sd[hf_layer + "mlp.down_proj.weight"], 1),
                                 ("feed_forward.w3", sd[hf_layer + "mlp.up_proj.weight"], 0),
                                 ("attention_norm", sd[hf_layer + "input_layernorm.weight"], None),
                                 ("ffn_norm", sd[hf_layer + "post_attention_layernorm.weight"], None)):
                out[f"{meta_layer}{name}.weight"] = split[how](t, s).clone()
            for qk, heads in (("q", H), ("k", K)):
                for part in ("weight", "bias"):
                    rows = sd[f"{hf_layer}self_attn.{qk}_norm.{part}"]  # (heads, E)
                    out[f"{meta_layer}attention.{qk}_normalization.{part}"] = _to_meta_norm(rows[s * heads // shards])
        name = "consolidated.pth" if shards == 1 else f"consolidated.{s:02d}.pth"
        torch.save({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()}, model_dir / name)
    params = {"model_parallel_size": shards, "model": {
        "dim": D, "n_layers": LAYERS, "n_heads": H, "n_kv_heads": K, "vocab_size": V, "multiple_of": 32,
        "ffn_dim_multiplier": 0.75, "norm_eps": 1e-5, "rope_theta": 10000.0, "qk_normalization": True,
        "swin_norm": swin_norm}}  # 0.75 * int(8 * 32 / 3) = 63.75 -> 63 -> 64, the intermediate size
    (model_dir / "params.json").write_text(json.dumps(params))

    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel(vocab=_vocab(), unk_token="<unk>"))
    tok.add_special_tokens(["<s>", "</s>", "<pad>", "<racm3:break>", "<eoss>", "<reserved08707>"])
    (root / "tokenizer").mkdir()
    tok.save(str(root / "tokenizer" / "text_tokenizer.json"))
    _write_vqgan(root / "tokenizer", vq_state)


@pytest.mark.parametrize("shards,swin_norm", [(1, False), (2, True)])
def test_meta_layout_matches_the_hf_model(tmp_path, shards, swin_norm):
    hf = _hf_chameleon(swin_norm, shards)
    ref_vq, _ = _hf_vq()
    _write_meta(tmp_path, hf, shards, swin_norm, _vqgan_state(ref_vq))
    assert is_meta_chameleon(tmp_path) and not is_meta_chameleon(tmp_path / "models")

    meta = read_meta_chameleon(tmp_path)
    hf_sd = {k: v for k, v in hf.state_dict().items() if not k.startswith("model.vqmodel.")}
    assert set(meta.tensors) == set(hf_sd)
    for key, value in hf_sd.items():
        assert torch.equal(meta.tensors[key], value), key
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "swin_norm", "bos_token_id",
                "eos_token_id", "pad_token_id", "vocabulary_map", "image_token_id"):
        expected = getattr(hf.config, key)
        got = meta.hf_config["vocabulary_map"]["<image>"] if key == "image_token_id" else meta.hf_config[key]
        assert got == expected, key
    assert meta.hf_config["rope_theta"] == 10000.0 and meta.hf_config["model_type"] == "chameleon"
    assert meta.tokenizer_file == tmp_path / "tokenizer" / "text_tokenizer.json"
    assert meta.vq is not None and meta.vq.decoder is not None
    loss_keys = ["vqgan.ckpt:loss.discriminator.main.0.weight", "vqgan.ckpt:loss.logvar"]
    assert meta.skipped == (["consolidated.pth:rope.freqs"] if shards == 1 else []) + loss_keys

    imported = import_meta_lm(tmp_path)
    assert imported.config.norm_reorder == swin_norm and imported.config.qk_norm_type == "layernorm_per_head"
    ours = imported.model.eval()
    tokens = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(6))
    tokens[tokens == IMAGE_TOKEN] = 11  # HF wants pixel values for the image placeholder
    with torch.no_grad():
        ref = hf.lm_head(hf.model(input_ids=tokens).last_hidden_state)  # all columns: HF's forward masks image codes
        got = ours.logits(ours(tokens))
    assert (got - ref).abs().max() <= TOL


def test_meta_layout_errors_name_the_file_and_key(tmp_path):
    hf = _hf_chameleon(False, 1)
    ref_vq, _ = _hf_vq()
    _write_meta(tmp_path, hf, 1, False, _vqgan_state(ref_vq))
    pth = tmp_path / "models" / "7b" / "consolidated.pth"
    good = torch.load(pth, weights_only=True)

    torch.save({k: v for k, v in good.items() if k != "layers.1.attention.k_normalization.bias"}, pth)
    with pytest.raises(KeyError, match=r"consolidated\.pth: missing 'layers\.1\.attention\.k_normalization\.bias'"):
        read_meta_chameleon(tmp_path)
    torch.save(good | {"layers.0.attention.wqkv.weight": torch.zeros(1)}, pth)
    with pytest.raises(KeyError, match=r"unexpected entries .*layers\.0\.attention\.wqkv\.weight"):
        read_meta_chameleon(tmp_path)
    torch.save(good | {"layers.0.feed_forward.w1.weight": torch.zeros(96, D)}, pth)
    with pytest.raises(ValueError, match=r"'layers\.0\.feed_forward\.w1\.weight' has shape \(96, 32\); params\.json "
                                         r"implies \(64, 32\)"):
        read_meta_chameleon(tmp_path)
    torch.save(good | {"trainer": _TrainerState()}, pth)
    with pytest.raises(ValueError, match=r"consolidated\.pth: cannot be read with torch\.load\(weights_only=True\)"):
        read_meta_chameleon(tmp_path)
    torch.save(good, pth)

    params_file = tmp_path / "models" / "7b" / "params.json"
    params = json.loads(params_file.read_text())
    params_file.write_text(json.dumps(params | {"model": params["model"] | {"qk_normalization": False}}))
    with pytest.raises(ValueError, match=r"params\.json: 'qk_normalization' is false"):
        read_meta_chameleon(tmp_path)
    params_file.write_text(json.dumps(params | {"model": {k: v for k, v in params["model"].items() if k != "dim"}}))
    with pytest.raises(ValueError, match=r"params\.json: missing 'dim'"):
        read_meta_chameleon(tmp_path)
    params_file.write_text(json.dumps(params))

    (tmp_path / "models" / "30b").mkdir()
    with pytest.raises(ValueError, match=r"several model folders \['30b', '7b'\]"):
        read_meta_chameleon(tmp_path)
    assert read_meta_chameleon(tmp_path, size="7b").hf_config["hidden_size"] == D
    (tmp_path / "models" / "30b").rmdir()
    (tmp_path / "models" / "7b" / "consolidated.01.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="both consolidated.pth and numbered shards"):
        read_meta_chameleon(tmp_path)
    (tmp_path / "models" / "7b" / "consolidated.01.pth").unlink()
    (tmp_path / "tokenizer" / "vqgan.yaml").unlink()
    with pytest.raises(FileNotFoundError, match=r"vqgan\.yaml: missing beside vqgan\.ckpt"):
        read_meta_chameleon(tmp_path)
    (tmp_path / "tokenizer" / "vqgan.ckpt").unlink()
    assert read_meta_chameleon(tmp_path).vq is None  # the LM alone is a valid folder
