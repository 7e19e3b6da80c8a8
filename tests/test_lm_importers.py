"""Importers of HF-format Llama / Chameleon / Emu3 language models: logits parity with transformers.

Tiny random models are built offline from transformers configs, saved with ``save_pretrained`` (safetensors +
config.json) and imported. Norm weights are randomised too (they are ones at init, which would hide a norm
that is mapped to the wrong place).
"""

from __future__ import annotations

import json

import pytest
import torch
from pretrained_fixtures import EMU3_VQ, V, randomise_norms, text_kwargs

from anyloom.transformer.importers import import_chameleon, import_emu3, import_llama
from anyloom.transformer.kv_cache import KVCache

TOL = 1e-4  # fp32 logits, max abs difference


def _tokens(exclude: range | None = None) -> torch.Tensor:
    tokens = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(6))
    if exclude is not None:
        tokens[(tokens >= exclude.start) & (tokens < exclude.stop)] = 40
    return tokens


def _chameleon(tmp_path, swin_norm: bool):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vocab_map = {"<image>": 10, **{f"IMGIMG{chr(65 + i)}Z": 20 + i for i in range(8)}}
    cfg = ChameleonConfig(**text_kwargs(swin_norm=swin_norm), vocabulary_map=vocab_map, image_token_id=10,
                          vq_config=dict(embed_dim=8, num_embeddings=8, base_channels=32, channel_multiplier=[1, 1],
                                         latent_channels=8, resolution=16))
    torch.manual_seed(0)
    model = ChameleonForConditionalGeneration(cfg).eval()
    randomise_norms(model)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("swin_norm", [False, True])
def test_chameleon_parity(tmp_path, swin_norm):
    hf = _chameleon(tmp_path, swin_norm)
    imported = import_chameleon(tmp_path)
    assert imported.config.qk_norm_type == "layernorm_per_head" and imported.config.norm_reorder == swin_norm
    assert any("vqmodel" in k for k in imported.skipped)
    ours = imported.model.eval()
    tokens = _tokens(exclude=range(10, 11))
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits
        got = ours.logits(ours(tokens))
    text_cols = torch.ones(V, dtype=torch.bool)
    text_cols[20:28] = False  # HF sets image-code logits to the dtype minimum; ours leave them raw
    assert (got[..., text_cols] - ref[..., text_cols]).abs().max() <= TOL


def test_emu3_parity(tmp_path):
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    vocab_map = {"<image>": 1, "<|extra_200|>": 2, **{f"<|visual token {i:06d}|>": 3 + i for i in range(8)}}
    cfg = Emu3Config(
        text_config=text_kwargs(pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vq_config=EMU3_VQ,
        vocabulary_map=vocab_map,
    )
    torch.manual_seed(0)
    hf = Emu3ForConditionalGeneration(cfg).eval()
    randomise_norms(hf)
    hf.save_pretrained(tmp_path)
    ours = import_emu3(tmp_path).model.eval()
    tokens = _tokens()
    with torch.no_grad():
        assert (ours.logits(ours(tokens)) - hf(input_ids=tokens).logits).abs().max() <= TOL


def _llama(tmp_path, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**text_kwargs(rope_theta=500.0, **extra))).eval()
    randomise_norms(hf)
    hf.save_pretrained(tmp_path)
    return hf


def test_llama_parity_and_cached_greedy_decode_matches_hf_generate(tmp_path):
    hf = _llama(tmp_path)
    imported = import_llama(tmp_path)
    assert imported.config.rope_theta == 500.0 and not imported.config.qk_norm
    ours = imported.model.eval()
    tokens = _tokens()
    with torch.no_grad():
        assert (ours.logits(ours(tokens)) - hf(input_ids=tokens).logits).abs().max() <= TOL
        # greedy decoding through our static KV cache gives HF generate's tokens
        prompt = tokens[:1, :6]
        expected = hf.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 6:]
        cfg = imported.config
        kv = KVCache(1, 16, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
        nxt = ours.logits(ours(prompt, kv_cache=kv, cache_pos=0))[:, -1].argmax(-1, keepdim=True)
        got = [nxt]
        for step in range(5):
            nxt = ours.logits(ours(nxt, kv_cache=kv, cache_pos=6 + step))[:, -1].argmax(-1, keepdim=True)
            got.append(nxt)
    assert torch.equal(torch.cat(got, 1)[0], expected)


def test_unsupported_config_names_the_key(tmp_path):
    _llama(tmp_path, attention_bias=True)
    with pytest.raises(ValueError, match="'attention_bias': true is not supported"):
        import_llama(tmp_path)


def test_wrong_family_and_missing_files_are_clear(tmp_path):
    _llama(tmp_path)
    with pytest.raises(ValueError, match="is not a chameleon model"):
        import_chameleon(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        import_llama(empty)
