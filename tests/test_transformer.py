"""The transformer on CPU: loss equivalence, document masking, attention backends, KV cache, init, sizes.

(Triton kernels are checked in tests/test_kernels.py, in the interpreter.)
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import anyloom.transformer.attention as attn
from anyloom.config import ConfigError, build
from anyloom.recipes.schema import Recipe
from anyloom.transformer.kv_cache import KVCache
from anyloom.transformer.model import ModelConfig, Transformer, grid_index
from anyloom.transformer.sizes import SIZES, model_config, param_count

DEBUG = model_config("debug", vocab_size=97, max_seq_len=64, ce_chunk_size=24, attention="sdpa")


def _model(cfg: ModelConfig = DEBUG, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg)


def _loss_and_grads(model: Transformer, tokens, targets, mask):
    model.zero_grad()
    out = model.loss(model(tokens), targets, mask)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tie", [False, True])
def test_fused_ce_matches_naive_loss_and_grads(tie):
    cfg = replace(DEBUG, tie_embeddings=tie, z_loss_weight=0.05)
    model = _model(cfg)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (2, 13), generator=gen)
    targets = torch.randint(0, 97, (2, 13), generator=gen)
    mask = torch.rand(2, 13, generator=gen) > 0.3
    targets[~mask] = -100  # masked targets may hold anything
    fused, g_fused = _loss_and_grads(model, tokens, targets, mask)
    model.cfg = replace(cfg, fused_ce=False)
    naive, g_naive = _loss_and_grads(model, tokens, targets, mask)
    # the plain definition, from full logits
    logits = model.logits(model(tokens)).float()
    ce = F.cross_entropy(logits[mask], targets[mask])
    z = torch.logsumexp(logits[mask], -1).pow(2).mean()
    assert torch.allclose(fused.ce, ce, atol=1e-5) and torch.allclose(naive.ce, ce, atol=1e-5)
    assert torch.allclose(fused.z_loss, z, atol=1e-4)
    assert torch.allclose(fused.loss, ce + 0.05 * z, atol=1e-4)
    assert torch.allclose(fused.token_loss, naive.token_loss, atol=1e-5)
    assert (fused.token_loss[~mask] == 0).all() and not fused.token_loss.requires_grad
    assert torch.equal(fused.correct, (logits.argmax(-1) == targets) & mask)
    for name in g_naive:
        assert torch.allclose(g_fused[name], g_naive[name], atol=1e-6), name


def test_loss_rejects_out_of_vocab_targets():
    model = _model()
    tokens = torch.randint(0, 97, (1, 5))
    targets = tokens.clone()
    targets[0, 3] = 97
    with pytest.raises(ValueError, match=r"target 97 at \(row 0, col 3\)"):
        model.loss(model(tokens), targets, torch.ones(1, 5, dtype=torch.bool))


def test_compiled_loss_matches_eager_and_still_checks_targets():
    # parallel.compile_loss: model.loss under torch.compile(dynamic=True) gives the eager loss, gradients and
    # per-token outputs, for masks of different sizes, and still names a target outside the vocabulary
    from anyloom.training.parallel import apply_compile_loss

    cfg = replace(DEBUG, z_loss_weight=0.05)
    eager, compiled = _model(cfg), _model(cfg)
    apply_compile_loss(compiled)
    assert set(compiled.state_dict()) == set(eager.state_dict())
    gen = torch.Generator().manual_seed(2)
    for keep in (0.3, 0.6, 0.9):
        tokens = torch.randint(0, 97, (2, 13), generator=gen)
        targets = torch.randint(0, 97, (2, 13), generator=gen)
        mask = torch.rand(2, 13, generator=gen) < keep
        targets[~mask] = -100
        want, g_want = _loss_and_grads(eager, tokens, targets, mask)
        got, g_got = _loss_and_grads(compiled, tokens, targets, mask)
        assert torch.allclose(got.loss, want.loss, atol=1e-5)
        assert torch.allclose(got.token_loss, want.token_loss, atol=1e-5)
        assert torch.equal(got.correct, want.correct)
        for name in g_want:
            assert torch.allclose(g_got[name], g_want[name], atol=1e-5), name
    targets[0, 3], mask[0, 3] = 97, True
    with pytest.raises(ValueError, match=r"target 97 at \(row 0, col 3\)"):
        compiled.loss(compiled(tokens), targets, mask)


def test_packed_documents_equal_separate_sequences():
    model = _model().eval()
    tokens = torch.randint(0, 97, (1, 17))
    doc = torch.tensor([[0] * 6 + [1] * 4 + [2] * 7])
    pos = torch.tensor([list(range(6)) + list(range(4)) + list(range(7))])
    with torch.no_grad():
        packed = model(tokens, doc, pos)
        for lo, hi in ((0, 6), (6, 10), (10, 17)):
            alone = model(tokens[:, lo:hi])
            assert torch.allclose(packed[:, lo:hi], alone, atol=1e-5)


def _qkv(b=2, hq=4, hk=2, t=23, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, t, d, generator=g), torch.randn(b, hk, t, d, generator=g),
            torch.randn(b, hk, t, d, generator=g))


def test_mask_rule_with_spans():
    doc = torch.tensor([[0, 0, 0, 0, 1, 1]])
    span = torch.tensor([[0, 1, 1, 0, 2, 2]])
    mask = attn.build_mask(doc, doc, 0, span, span)[0].int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # inside span 1: sees the later token of its span
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1],  # new document: nothing before, its own span both ways
        [0, 0, 0, 0, 1, 1],
    ])
    assert torch.equal(mask, expected)


def test_flex_matches_sdpa_forward(monkeypatch):
    monkeypatch.setattr(attn, "FLEX_COMPILE", False)  # mask logic in eager; compile only changes speed
    q, k, v = _qkv()
    doc = torch.zeros(2, 23, dtype=torch.long)
    doc[0, 9:] = 1
    doc[1, 3:] = 1
    doc[1, 17:] = 2
    span = torch.zeros_like(doc)
    span[0, 11:16] = 1
    for spans in (None, span):
        out = attn.attention(q, k, v, doc, q_span=spans, backend="flex")
        ref = attn.attention(q, k, v, doc, q_span=spans, backend="sdpa")
        assert torch.allclose(out, ref, atol=1e-5)


def test_flex_refuses_backward_on_cpu():
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="no backward on CPU"):
        attn.attention(q.requires_grad_(), k, v, backend="flex")


def test_sdpa_causal_fast_path_equals_dense_mask():
    q, k, v = _qkv()
    one_doc = torch.zeros(2, 23, dtype=torch.long)
    assert torch.allclose(attn.attention(q, k, v, backend="sdpa"), attn.attention(q, k, v, one_doc, backend="sdpa"),
                          atol=1e-6)


def test_cpu_sdpa_attends_low_precision_in_fp32():
    # bf16 inputs (or bf16 autocast) on the CPU: the kernel runs on the fp32 values, the result comes back in q's dtype
    q, k, v = (t.bfloat16() for t in _qkv())
    doc = torch.tensor([[0] * 10 + [1] * 13, [0] * 23])
    ref = attn.attention(q.float(), k.float(), v.float(), doc, backend="sdpa")
    out = attn.attention(q, k, v, doc, backend="sdpa")
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = attn.attention(q.float(), k.float(), v.float(), doc, backend="sdpa")
    assert mixed.dtype == torch.float32 and torch.equal(mixed, ref)  # autocast did not cast SDPA's inputs down


def test_backend_selection_and_override():
    cpu = torch.device("cpu")
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert attn.resolve_backend("auto", cpu, has_spans=False) == "sdpa"
    assert attn.resolve_backend("auto", cpu, has_spans=True) == "sdpa"
    with attn.force_backend("flex"):
        assert attn.resolve_backend("sdpa", cpu, has_spans=False) == "flex"
    assert attn.resolve_backend("sdpa", cpu, has_spans=False) == "sdpa"
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="xformers has no CPU"):
        attn.attention(q, k, v, backend="xformers")
    with pytest.raises(ValueError, match="unknown attention backend"):
        with attn.force_backend("fast"):
            pass


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter makes triton run on CPU")
def test_triton_backend_on_cpu_says_why_it_cannot_run():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        attn.attention(q, k, v, backend="triton")


CACHE_CONFIGS = {
    "gqa_rms_qknorm": DEBUG,
    "chameleon_style": replace(DEBUG, qk_norm_type="layernorm_per_head", norm_reorder=True, n_kv_heads=4),
    "no_qknorm_tied": replace(DEBUG, qk_norm=False, tie_embeddings=True),
}


@pytest.mark.parametrize("name", list(CACHE_CONFIGS))
def test_cached_decode_equals_full_forward_with_left_padding(name):
    cfg = CACHE_CONFIGS[name]
    model = _model(cfg).eval()
    gen = torch.Generator().manual_seed(3)
    lens, steps = [7, 4, 1], 4
    seqs = [torch.randint(0, 97, (n + steps,), generator=gen) for n in lens]
    width = max(lens)
    prompt = torch.zeros(3, width, dtype=torch.long)
    doc = torch.full((3, width), -1)  # pads: doc id -1, only visible to each other
    pos = torch.zeros(3, width, dtype=torch.long)
    for i, n in enumerate(lens):
        prompt[i, width - n :] = seqs[i][:n]
        doc[i, width - n :] = 0
        pos[i, width - n :] = torch.arange(n)
    kv = KVCache(3, 32, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    with torch.no_grad():
        full = [model.logits(model(s[None]))[0] for s in seqs]  # each row alone, no padding
        # prefill in two chunks (exercises appending to a non-empty cache), then one token per step
        first = model.logits(model(prompt[:, :3], doc[:, :3], pos[:, :3], kv_cache=kv, cache_pos=0))
        rest = model.logits(model(prompt[:, 3:], doc[:, 3:], pos[:, 3:], kv_cache=kv, cache_pos=3))
        prefill = torch.cat([first, rest], 1)
        for i, n in enumerate(lens):
            assert torch.allclose(prefill[i, width - n :], full[i][:n], atol=1e-5)
        for s in range(steps - 1):
            nxt = torch.stack([seqs[i][n + s] for i, n in enumerate(lens)])[:, None]
            step = model.logits(model(nxt, kv_cache=kv, cache_pos=width + s))  # doc id and position from cache
            for i, n in enumerate(lens):
                assert torch.allclose(step[i, 0], full[i][n + s], atol=1e-5), (name, i, s)


def test_cache_overflow_is_a_clear_error():
    model = _model().eval()
    kv = KVCache(1, 4, DEBUG.n_layers, DEBUG.n_kv_heads, DEBUG.head_dim)
    with pytest.raises(ValueError, match=r"cache slots \[3, 5\) do not fit a cache of 4"):
        model(torch.zeros(1, 2, dtype=torch.long), kv_cache=kv, cache_pos=3)


def test_meta_init_then_to_empty_matches_documented_init():
    cfg = replace(DEBUG, n_layers=8, dim=128, n_heads=4, n_kv_heads=4, ffn_dim=256, init_std=0.02)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert model.layers[0].attention.wq.weight.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    reference = _model(cfg)
    assert torch.equal(model.rope_cos, reference.rope_cos) and torch.equal(model.rope_sin, reference.rope_sin)
    block = model.layers[3]
    assert abs(block.attention.wq.weight.std().item() - 0.02) < 0.002
    assert abs(block.feed_forward.w2.weight.std().item() - 0.02 / 4) < 0.0005  # 0.02 / sqrt(2 * 8)
    assert torch.equal(block.attention_norm.weight, torch.ones(128))
    out = model(torch.randint(0, 97, (1, 9)))
    assert torch.isfinite(out).all()


def test_named_sizes_parameter_counts():
    # the table in transformer/sizes.py, at vocabulary 65,536
    expected = {"debug": 8_487_296, "world-small": 17_581_440, "world-tiny": 36_768_512, "150M": 151_022_336,
                "1B": 1_107_365_888, "7B": 7_013_150_720}
    assert set(expected) == set(SIZES)
    for name, count in expected.items():
        assert param_count(model_config(name, 65536)) == count, name
    # and the meta count equals a real model's count
    assert param_count(DEBUG) == sum(p.numel() for p in _model().parameters())


def test_recipe_has_a_typed_model_section():
    recipe = build(Recipe, {"model": {"dim": 128, "n_heads": 4, "attention": "sdpa"}})
    assert recipe.model.dim == 128 and recipe.model.attention == "sdpa"
    with pytest.raises(ConfigError, match="did you mean 'model.n_layers'"):
        build(Recipe, {"model": {"n_layer": 2}})
    with pytest.raises(ConfigError, match="'triton2' is not one of"):
        build(Recipe, {"model": {"attention": "triton2"}})
    with pytest.raises(ConfigError, match="divisible by n_heads"):
        build(Recipe, {"model": {"dim": 100, "n_heads": 3}})


GRID = replace(DEBUG, grid_positions=True, grid_token_range=(10, 40), grid_start_token=90, grid_size=6)


def _grid_reference(row: list[int], carry: int = -1) -> tuple[list[int], int]:
    """The grid-position rule token by token: count grid tokens since a start token; anything else breaks."""
    out, run = [], carry
    for tok in row:
        if tok == GRID.grid_start_token:
            out.append(-1)
            run = 0
        elif 10 <= tok < 40:
            out.append(run if 0 <= run < GRID.grid_size else -1)
            run = run + 1 if run >= 0 else -1
        else:
            out.append(-1)
            run = -1
    return out, run


def test_grid_index_matches_the_token_by_token_rule():
    gen = torch.Generator().manual_seed(0)
    choices = torch.tensor([1, 90, 11, 12, 13, 25, 39, 40, 5])  # text, start, grid ids, the first id past the range
    for _ in range(200):
        t = int(torch.randint(1, 24, (1,), generator=gen))
        rows = choices[torch.randint(0, len(choices), (3, t), generator=gen)]
        carry = torch.randint(-1, 8, (3,), generator=gen)  # includes runs already past grid_size
        index, nxt = grid_index(rows, GRID, carry)
        for i in range(3):
            want, want_next = _grid_reference(rows[i].tolist(), int(carry[i]))
            assert index[i].tolist() == want, (rows[i].tolist(), int(carry[i]))
            assert int(nxt[i]) == want_next, (rows[i].tolist(), int(carry[i]))


@pytest.mark.parametrize("static", [False, True])
def test_grid_positions_cached_decode_equals_full_forward(static):
    """Prefill ending inside an image, then one token per step (int and tensor cache_pos): the cache carries
    each row's grid cell, so logits match the full forward; the grid embedding changes them (it is used)."""
    model = _model(GRID).eval()
    rows = torch.tensor([[1, 2, 90, 11, 12, 13, 14, 15, 16, 17, 3, 90, 20, 21],
                         [1, 90, 30, 31, 32, 4, 5, 90, 33, 34, 35, 36, 37, 38]])
    split = 5  # both rows are inside an image here
    kv = KVCache(2, 16, GRID.n_layers, GRID.n_kv_heads, GRID.head_dim)
    with torch.no_grad():
        full = model.logits(model(rows))
        plain = _model(replace(GRID, grid_positions=False)).eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("grid_")})
        assert not torch.allclose(plain.logits(plain(rows)), full, atol=1e-3)
        got = [model.logits(model(rows[:, :split], kv_cache=kv, cache_pos=0))]
        for s in range(split, rows.shape[1]):
            pos = torch.tensor(s) if static else s
            got.append(model.logits(model(rows[:, s : s + 1], kv_cache=kv, cache_pos=pos)))
        assert torch.allclose(torch.cat(got, 1), full, atol=1e-5)
        # a new prompt written from slot 0 starts with no run open, whatever the cache held before
        again = model.logits(model(rows[:, 3:8], kv_cache=kv, cache_pos=0))
        assert torch.allclose(again, model.logits(model(rows[:, 3:8])), atol=1e-5)


def test_grid_positions_need_their_vocabulary_fields():
    with pytest.raises(ValueError, match="the LM stage fills them from the vocabulary"):
        Transformer(replace(DEBUG, grid_positions=True))


def test_lm_stage_fills_grid_fields_from_the_vocabulary():
    from anyloom.sequences.vocab import Vocabulary
    from anyloom.training.chain import lm_model_config

    vocab = Vocabulary.build(24, 16, 8, 1, (2, 3))
    cfg = lm_model_config(replace(DEBUG, grid_positions=True), vocab)
    assert (cfg.vocab_size, cfg.grid_token_range, cfg.grid_start_token, cfg.grid_size) == (
        vocab.size, vocab.image_range, vocab.boi, 6)
    Transformer(cfg)  # a valid grid configuration
    assert lm_model_config(DEBUG, vocab).grid_size == 0  # off: nothing filled
    with pytest.raises(ValueError, match="row ends break the run"):
        lm_model_config(replace(DEBUG, grid_positions=True), Vocabulary.build(24, 16, 8, 1, (2, 3), image_row_end=True))


FACTORS = replace(DEBUG, grid_token_range=(10, 46), code_factors=(4, 3, 3))


def test_code_factors_add_each_digit_vector_like_fsq_numbers_its_codes():
    from vector_quantize_pytorch import FSQ

    model = _model(FACTORS)
    codes = torch.arange(36)
    digits = FSQ(levels=[4, 3, 3]).indices_to_level_indices(codes)  # (36, 3): the quantizer's own numbering
    offsets = torch.tensor([0, 4, 7])
    tables = (model.code_factor_in.weight, model.code_factor_out.weight)
    for weight, own, table in ((model.embedding_weight, model.tok_embeddings.weight, tables[0]),
                               (model.output_weight, model.output.weight, tables[1])):
        expect = own[10:46] + table[digits + offsets].sum(1)
        assert torch.allclose(weight[10:46], expect) and torch.equal(weight[:10], own[:10])
        assert torch.equal(weight[46:], own[46:])
    tokens = torch.tensor([[1, 12, 39, 50]])
    assert torch.allclose(model(tokens), _with_embedding(model, tokens))
    # a loss on one code moves the digit vectors every code with those digits shares
    out = model.loss(model(tokens), torch.tensor([[12, 39, 50, 3]]), torch.tensor([[False, True, False, False]]))
    out.loss.backward()
    touched = (model.code_factor_out.weight.grad.abs().sum(1) > 0).nonzero().squeeze(1).tolist()
    assert touched == sorted((digits + offsets).unique().tolist())  # the softmax reaches every digit value
    assert model.code_factor_in.weight.grad[(digits[2] + offsets)].abs().sum() > 0  # code 12 was read
    with torch.device("meta"):
        meta = Transformer(FACTORS)
    meta.to_empty(device="cpu")
    meta.init_weights()  # rebuilds the digit rows, as FSDP's meta init needs
    assert torch.equal(meta.code_digits, model.code_digits)
    tied = _model(replace(FACTORS, tie_embeddings=True))
    assert tied.code_factor_out is None and torch.equal(tied.output_weight, tied.embedding_weight)


def _with_embedding(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """The forward pass with the factorised embedding looked up by hand (the reference for the test above)."""
    x = model.embedding_weight[tokens]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    cos, sin = model.rope_cos[positions], model.rope_sin[positions]
    for block in model.layers:
        x = block(x, cos, sin, None, None)
    return model.norm(x)


def test_code_factors_cached_decode_equals_full_forward():
    model = _model(FACTORS).eval()
    rows = torch.tensor([[1, 2, 90, 11, 12, 13, 14, 15, 16, 17, 3, 90, 20, 21]])
    kv = KVCache(1, 16, FACTORS.n_layers, FACTORS.n_kv_heads, FACTORS.head_dim)
    with torch.no_grad():
        full = model.logits(model(rows))
        got = [model.logits(model(rows[:, :5], kv_cache=kv, cache_pos=0))]
        got += [model.logits(model(rows[:, s : s + 1], kv_cache=kv, cache_pos=s)) for s in range(5, rows.shape[1])]
    assert torch.allclose(torch.cat(got, 1), full, atol=1e-5)


def test_code_factor_sums_are_reused_without_gradients_until_a_parameter_changes():
    model = _model(FACTORS)
    with torch.no_grad():
        first = model.embedding_weight
        assert model.embedding_weight is first and model.output_weight is model.output_weight  # formed once
        assert torch.equal(first, model._factor(model.tok_embeddings.weight, model.code_factor_in))
        model.code_factor_in.weight[0].add_(1.0)  # an optimizer step or a load writes in place: a new version
        moved = model.embedding_weight
        assert moved is not first and torch.equal(moved, model._factor(model.tok_embeddings.weight,
                                                                        model.code_factor_in))
        model.load_state_dict(_model(FACTORS).state_dict())
        assert torch.equal(model.embedding_weight, model._factor(model.tok_embeddings.weight, model.code_factor_in))
    trained = model.embedding_weight  # with gradients: formed anew, so they flow to the tables
    assert trained.requires_grad and trained is not model.embedding_weight


def test_code_factors_are_checked_and_filled_by_the_lm_stage():
    from anyloom.sequences.vocab import Vocabulary
    from anyloom.training.chain import lm_model_config

    for bad in ((4, 8), (36, 1)):
        with pytest.raises(ValueError, match="must multiply to the number of code ids"):
            Transformer(replace(FACTORS, code_factors=bad))
    with pytest.raises(ValueError, match="the LM stage fills the range"):
        Transformer(replace(DEBUG, code_factors=(4, 4)))
    vocab = Vocabulary.build(24, 16, 8, 1, (2, 3))
    cfg = lm_model_config(replace(DEBUG, code_factors=(4, 4)), vocab)
    assert cfg.grid_token_range == vocab.image_range and cfg.grid_size == 0
    Transformer(cfg)
    with pytest.raises(ValueError, match="must multiply"):
        lm_model_config(replace(DEBUG, code_factors=(4, 2)), vocab)
