"""Generation core: cached decode == full forward, constrained streams always parse, CFG, seeds, sampling."""

from __future__ import annotations

import pytest
import torch

from anyloom.generation.cfg import GuidanceConfig
from anyloom.generation.constraints import GrammarConfig, GrammarError, StreamGrammar
from anyloom.generation.engine import decode_one_token, generate, left_pad, new_cache, prefill
from anyloom.generation.sampling import (
    GREEDY,
    ModalitySampling,
    RowParams,
    SamplingConfig,
    filter_logits,
    sample,
)
from anyloom.sequences.interleave import parse_stream
from anyloom.sequences.vocab import Vocabulary, VocabularyError
from anyloom.transformer.model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread


def tiny_model(vocab_size: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256,
                      attention="sdpa")
    model = Transformer(cfg).eval()
    # larger-than-init weights so logits are far from uniform (sampling differences become visible)
    with torch.no_grad():
        model.output.weight.mul_(20)
    return model


def vocab(pattern: str = "flat", row_end: bool = False) -> Vocabulary:
    return Vocabulary.build(24, 16, 8, 3, (2, 3), image_row_end=row_end, audio_pattern=pattern)


# ---- cached decoding == full forward ----------------------------------------------------------------------------


def test_cached_decode_matches_full_forward_with_ragged_batch():
    v = vocab()
    model = tiny_model(v.size)
    g = torch.Generator().manual_seed(1)
    lengths, total = [3, 9, 6], 16  # prompt lengths differ; each row then decodes to 16 tokens in all
    seqs = [torch.randint(0, v.size, (total,), generator=g) for _ in lengths]
    prompts = [s[:n].tolist() for s, n in zip(seqs, lengths)]
    batch = left_pad(prompts, v.pad)
    T = batch.tokens.shape[1]
    steps = total - min(lengths)
    kv = new_cache(model, len(prompts), T + steps)
    cached = [prefill(model, batch.tokens, batch.doc_ids, batch.positions, kv)]  # logits after each prompt
    # teacher forcing: row r is fed its own continuation; rows past their sequence are fed pad (ignored below)
    for i in range(steps):
        nxt = torch.tensor([s[n + i].item() if n + i < total else v.pad for s, n in zip(seqs, lengths)])
        cached.append(decode_one_token(model, nxt[:, None], kv, T + i))
    for r, (s, n) in enumerate(zip(seqs, lengths)):
        full = model.logits(model(s[None])).squeeze(0)  # (total, V): unpadded, no cache
        for i in range(total - n + 1):
            if n - 1 + i >= total:
                break
            torch.testing.assert_close(cached[i][r], full[n - 1 + i].float(), atol=1e-4, rtol=1e-4)


# ---- constrained decoding: every stream parses ---------------------------------------------------------------


def check_stream(ids: list[int], v: Vocabulary, max_frames: int) -> dict:
    """An independent reader of the grammar (not the one under test): counts spans, asserts their contents."""
    counts = {"image": 0, "audio": 0, "eos": 0}
    i, h, w, Q = 0, *v.image_grid, v.audio_num_codebooks
    while i < len(ids):
        t = ids[i]
        if v.is_text(t):
            i += 1
        elif t == v.eos:
            assert i == len(ids) - 1, "tokens after eos"
            counts["eos"] += 1
            i += 1
        elif t == v.boi:
            body = []
            i += 1
            while ids[i] != v.eoi:
                body.append(ids[i])
                i += 1
            i += 1
            expected = []
            for _ in range(h):
                expected += ["img"] * w + (["row"] if v.image_row_end else [])
            got = ["img" if v.is_image(x) else "row" if x == v.row_end else v.describe(x) for x in body]
            assert got == expected
            counts["image"] += 1
        elif t == v.boa:
            body = []
            i += 1
            while ids[i] != v.eoa:
                body.append(ids[i])
                i += 1
            i += 1
            assert len(body) % Q == 0 and body, f"audio span of {len(body)} tokens is not whole steps of {Q}"
            steps = len(body) // Q
            frames = steps - (Q - 1) if v.audio_pattern == "delay" else steps
            assert 1 <= frames <= max_frames
            for k, x in enumerate(body):
                s, q = divmod(k, Q)
                f = s - q if v.audio_pattern == "delay" else s
                if 0 <= f < frames:
                    assert v.is_audio(x) and v.audio_level(x) == q, f"slot {k}: {v.describe(x)} not level {q}"
                else:
                    assert x == v.audio_pad, f"slot {k}: {v.describe(x)} should be audio_pad"
            counts["audio"] += 1
        else:
            raise AssertionError(f"unexpected {v.describe(t)} at {i}")
    return counts


@pytest.mark.parametrize("pattern,row_end", [("flat", False), ("flat", True), ("delay", False), ("delay", True)])
def test_constrained_streams_always_parse(pattern, row_end):
    v = vocab(pattern, row_end)
    model = tiny_model(v.size)
    # random weights rarely choose to open spans: bias the output towards the specials so every branch runs
    with torch.no_grad():
        model.output.weight[v.special_offset :].mul_(0)
        model.output.weight[v.boi].copy_(model.norm.weight * 0.5)
        model.output.weight[v.boa].copy_(model.norm.weight * 0.5)
        model.output.weight[v.audio_pad].copy_(model.norm.weight * 0.2)
    g = StreamGrammar(v, GrammarConfig(max_audio_frames=5))
    gen = torch.Generator().manual_seed(0)
    hot = ModalitySampling.uniform(SamplingConfig(temperature=3.0))
    totals = {"image": 0, "audio": 0, "eos": 0}
    prompts = [[v.bos], [v.bos, 3, 4], [v.bos, 5, v.boi], [v.bos, v.boa], [v.bos, 1, v.boi, *[v.image_offset] * 2]]
    state = g.state_after_prompts(*(lambda b: (b.tokens, b.valid))(left_pad(prompts, v.pad)))
    shortest = int(g.tokens_to_close(state).max())
    with pytest.raises(ValueError, match="needs .* more tokens to close"):
        generate(model, prompts, g, shortest - 1)
    for budget in (shortest, 23, 60):  # small budgets force early ends; all streams must still be complete
        out = generate(model, prompts * 4, g, budget, hot, gen)
        for prompt, seq in zip(prompts * 4, out.sequences):
            assert len(seq) <= budget
            counts = check_stream(prompt[1:] + seq, v, 5)
            parse_stream(prompt + seq, v, strict=True)  # the sequences module's own reader agrees
            for k in totals:
                totals[k] += counts[k]
    assert totals["image"] > 5 and totals["audio"] > 5 and totals["eos"] > 5, totals


def test_stop_after_span_and_disallowed_openers():
    v = vocab("delay")
    model = tiny_model(v.size)
    g = StreamGrammar(v, GrammarConfig(allow_image=False, allow_audio=False, stop_after_span=True, max_audio_frames=4))
    out = generate(model, [[v.bos, 2, v.boi], [v.bos, v.boa], [v.bos, 7]], g, 40,
                   ModalitySampling.uniform(SamplingConfig(1.5)), torch.Generator().manual_seed(3))
    img, aud, txt = out.sequences
    assert img[-1] == v.eoi and len(img) == v.image_span_length + 1
    assert aud[-1] == v.eoa and check_stream([v.boa] + aud, v, 4)["audio"] == 1
    assert all(v.is_text(t) for t in txt[:-1]) and (txt[-1] == v.eos or len(txt) == 40)
    assert out.finished[:2] == [True, True]


def test_model_with_padded_vocabulary():
    v = vocab()
    model = tiny_model(v.size + 13)  # embedding rounded up past the vocabulary: extra ids must never come out
    with torch.no_grad():
        model.output.weight[v.size :].fill_(0).add_(model.norm.weight.mean() * 50)  # make them the most likely
    out = generate(model, [[v.bos, 4]], StreamGrammar(v), 30, ModalitySampling.uniform(SamplingConfig(2.0)),
                   torch.Generator().manual_seed(0))
    assert max(out.sequences[0]) < v.size
    check_stream([4] + out.sequences[0], v, 256)


def test_bad_prompts_are_refused_with_the_position():
    v = vocab()
    g = StreamGrammar(v)
    model = tiny_model(v.size)
    with pytest.raises(GrammarError, match="row 1.*token 2 of the prompt.*audio"):
        generate(model, [[v.bos], [v.bos, v.boi, v.audio_token(0, 0)]], g, 4)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(model, [[v.bos, v.size + 3]], g, 4)


# ---- sampling ------------------------------------------------------------------------------------------------------


def test_same_seed_same_output_and_top_k_1_is_greedy():
    v = vocab()
    model = tiny_model(v.size)
    g = StreamGrammar(v)
    prompts = [[v.bos, 1, 2], [v.bos, v.boi], [v.bos, v.boa, v.audio_token(3, 0)]]
    warm = ModalitySampling.uniform(SamplingConfig(temperature=1.0))
    run = lambda s, seed: generate(model, prompts, g, 30, s, torch.Generator().manual_seed(seed)).sequences
    assert run(warm, 5) == run(warm, 5)
    assert run(warm, 5) != run(warm, 6)  # the seed matters (a test that could not fail would prove nothing)
    greedy = run(ModalitySampling.uniform(GREEDY), 0)
    assert run(ModalitySampling.uniform(SamplingConfig(temperature=1.0, top_k=1)), 11) == greedy
    assert run(ModalitySampling.uniform(SamplingConfig(temperature=0.7, top_p=1e-6)), 12) == greedy


def test_filter_logits_top_k_top_p_values():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    params = RowParams(torch.tensor([1.0, 1.0]), torch.tensor([0, 2]), torch.tensor([0.75, 1.0]))
    kept = torch.isfinite(filter_logits(logits, params))
    # row 0: nucleus 0.75 keeps 0.5 and 0.3 (0.5 alone is short of it); row 1: top-2 keeps 0.4 and 0.3
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    draws = torch.stack([sample(logits, params, torch.Generator().manual_seed(i)) for i in range(200)])
    assert set(draws[:, 0].tolist()) == {0, 1} and set(draws[:, 1].tolist()) == {2, 3}


def test_sample_draws_follow_the_filtered_distribution():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    n = 40_000
    logits = torch.log(probs).expand(n, -1)  # zero-probability ids are -inf, as the grammar mask leaves them
    params = RowParams(torch.ones(n), torch.zeros(n, dtype=torch.long), torch.ones(n))
    draws = sample(logits, params, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).double() / n
    assert freq[1] == 0 and freq[5] == 0  # never an id the mask removed
    torch.testing.assert_close(freq, probs.double(), atol=0.01, rtol=0)  # ~4 standard errors at n = 40k
    again = sample(logits, params, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_filter_logits_min_p_scales_with_the_top_token():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.3, 0.28, 0.22, 0.2]]))
    params = RowParams(torch.tensor([1.0, 1.0]), torch.tensor([0, 0]), torch.tensor([1.0, 1.0]),
                       torch.tensor([0.25, 0.25]))
    kept = torch.isfinite(filter_logits(logits, params))
    # threshold 0.25 x p_max: 0.125 in the confident row (drops 0.05), 0.075 in the flat one (keeps all)
    assert kept.tolist() == [[True, True, True, False], [True, True, True, True]]
    # a hotter temperature flattens the distribution, so the same min_p keeps more
    hot = RowParams(torch.tensor([4.0, 1.0]), torch.tensor([0, 0]), torch.tensor([1.0, 1.0]), torch.tensor([0.25, 0.0]))
    assert torch.isfinite(filter_logits(logits, hot)).all()
    with pytest.raises(ValueError, match="min_p"):
        SamplingConfig(min_p=1.0)


def test_per_modality_sampling_applies_to_the_rows_modality():
    v = vocab()
    model = tiny_model(v.size)
    g = StreamGrammar(v, GrammarConfig(stop_after_span=True))
    mixed = ModalitySampling(text=SamplingConfig(temperature=5.0), image=GREEDY, audio=SamplingConfig(5.0))
    greedy = ModalitySampling.uniform(GREEDY)
    img = lambda s, seed: generate(model, [[v.bos, v.boi]], g, 10, s, torch.Generator().manual_seed(seed)).sequences
    assert img(mixed, 1) == img(mixed, 2) == img(greedy, 0)  # image rows use image sampling: greedy here


# ---- classifier-free guidance -------------------------------------------------------------------------------


def test_cfg_scale_one_equals_no_cfg_and_other_scales_change_images():
    v = vocab()
    model = tiny_model(v.size)
    g = StreamGrammar(v, GrammarConfig(stop_after_span=True))
    cond = [[v.bos, 3, 5, 7, v.boi], [v.bos, 2, v.boa]]
    uncond = [[v.bos, v.boi], [v.bos, v.boa]]
    s = ModalitySampling.uniform(SamplingConfig(temperature=1.0))
    plain = generate(model, cond, g, 12, s, torch.Generator().manual_seed(4)).sequences
    one = generate(model, cond, g, 12, s, torch.Generator().manual_seed(4), GuidanceConfig(1.0, 1.0), uncond)
    assert one.sequences == plain
    # guidance actually mixes in the unconditional rows: at scale 0 the result is the unconditional stream
    zero = generate(model, cond[:1], g, 12, ModalitySampling.uniform(GREEDY), None,
                    GuidanceConfig(image_scale=0.0), uncond[:1]).sequences
    uncond_alone = generate(model, uncond[:1], g, 12, ModalitySampling.uniform(GREEDY)).sequences
    assert zero == uncond_alone
    strong = generate(model, cond[:1], g, 12, ModalitySampling.uniform(GREEDY), None,
                      GuidanceConfig(image_scale=3.0), uncond[:1]).sequences
    greedy_plain = generate(model, cond[:1], g, 12, ModalitySampling.uniform(GREEDY)).sequences
    assert strong != greedy_plain
    with pytest.raises(ValueError, match="unconditional prompt"):
        generate(model, cond, g, 4, s, None, GuidanceConfig(2.0, 1.0), None)


@pytest.mark.parametrize("pattern", ["flat", "delay"])
def test_cfg_for_audio_spans(pattern):
    """Audio guidance uses the audio scale only: at audio scale 0 the speech is the unconditional stream's, at 3
    it differs from the unguided one, and an image scale leaves speech alone; the first guided step's choice is
    the argmax of cond + (s - 1) * (cond - uncond) computed here from two plain forwards."""
    v = vocab(pattern)
    model = tiny_model(v.size)
    g = StreamGrammar(v, GrammarConfig(stop_after_span=True, max_audio_frames=4))
    cond, uncond = [[v.bos, 3, 5, 7, 2, v.boa]], [[v.bos, v.boa]]
    greedy = ModalitySampling.uniform(GREEDY)

    def run(prompts, guidance=None, un=None):
        return generate(model, prompts, g, 40, greedy, None, guidance, un).sequences

    plain = run(cond)
    assert run(cond, GuidanceConfig(audio_scale=0.0), uncond) == run(uncond)
    assert run(cond, GuidanceConfig(image_scale=3.0), uncond) == plain  # an image scale never touches speech
    with torch.no_grad():
        last = [model.logits(model(torch.tensor([p])))[0, -1] for p in (cond[0], uncond[0])]
    allowed = g.mask(g.state_after_prompts(torch.tensor(cond), torch.ones(1, len(cond[0]), dtype=torch.bool)))[0]
    scale = 8.0
    guided = last[0] + (scale - 1.0) * (last[0] - last[1])
    first = int(guided.masked_fill(~allowed, float("-inf")).argmax())
    assert first != int(last[0].masked_fill(~allowed, float("-inf")).argmax())  # guidance changes this choice
    out = run(cond, GuidanceConfig(audio_scale=scale), uncond)
    assert out[0][0] == first and out != plain


def test_min_text_tokens_refuses_an_empty_caption():
    v = vocab()
    model = tiny_model(v.size)
    logits = model.logits  # a model that wants to stop right after the image (as after a t2i document)
    model.logits = lambda h: logits(h).index_add(-1, torch.tensor([v.eos]), torch.full((*h.shape[:-1], 1), 100.0))
    prompt = [v.bos, v.boi, *([v.image_token(3)] * v.image_tokens_per_image), v.eoi]
    greedy = ModalitySampling.uniform(SamplingConfig(0.0))
    plain = generate(model, [prompt], StreamGrammar(v, GrammarConfig(allow_image=False, allow_audio=False)), 10, greedy)
    assert plain.sequences[0] == [v.eos]
    g = StreamGrammar(v, GrammarConfig(allow_image=False, allow_audio=False, min_text_tokens=2))
    out = generate(model, [prompt], g, 10, greedy)
    seq = out.sequences[0]
    assert all(v.is_text(t) for t in seq[:2]) and seq[2] == v.eos, seq


def test_samples_share_one_prefill_and_equal_repeated_prompts():
    """``samples=n`` copies each prompt's prefilled cache rows instead of recomputing them: the draws equal those
    of the prompts repeated n times (same generator, same row order), with and without guidance, ragged prompts."""
    v = vocab()
    model = tiny_model(v.size)
    g = StreamGrammar(v, GrammarConfig(stop_after_span=True))
    cond = [[v.bos, 3, 5, 7, v.boi], [v.bos, 2, v.boa], [v.bos, 4, 6, v.boi]]
    uncond = [[v.bos, v.boi], [v.bos, v.boa], [v.bos, v.boi]]
    s = ModalitySampling.uniform(SamplingConfig(temperature=1.0))
    n = 3
    rep = lambda rows: [r for r in rows for _ in range(n)]  # noqa: E731
    for guidance, un in ((None, None), (GuidanceConfig(2.0, 1.5), uncond)):
        shared = generate(model, cond, g, 12, s, torch.Generator().manual_seed(8), guidance, un, samples=n)
        repeated = generate(model, rep(cond), g, 12, s, torch.Generator().manual_seed(8), guidance,
                            rep(un) if un else None)
        assert shared.sequences == repeated.sequences
        assert shared.finished == repeated.finished and shared.prompt_lengths == repeated.prompt_lengths
        assert len({tuple(x) for x in shared.sequences[:n]}) > 1  # the samples of one prompt differ
    with pytest.raises(ValueError, match="samples must be >= 1"):
        generate(model, cond, g, 12, s, samples=0)


def test_kv_cache_select_rows_copies_every_buffer():
    v = vocab()
    model = tiny_model(v.size)
    batch = left_pad([[v.bos, 3, 5], [v.bos, v.boi]], v.pad)
    kv = new_cache(model, 2, 16)
    prefill(model, batch.tokens, batch.doc_ids, batch.positions, kv)
    rows = torch.tensor([1, 1, 0])
    picked = kv.select_rows(rows)
    for src, dst in zip(kv.layers, picked.layers):
        assert torch.equal(dst.k, src.k[rows]) and torch.equal(dst.v, src.v[rows])
    for name in ("doc_ids", "span_ids", "next_pos", "grid_next"):
        assert torch.equal(getattr(picked, name), getattr(kv, name)[rows])
    step = torch.tensor([[7], [7], [7]])
    out = decode_one_token(model, step, picked, 3)
    ref = decode_one_token(model, step[:2], kv, 3)  # row order of kv: [0, 1]
    torch.testing.assert_close(out[2], ref[0], rtol=1e-5, atol=1e-5)  # the copies continue as their sources
    torch.testing.assert_close(out[0], ref[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=0)


def test_image_layout_with_fixed_prefix_and_suffix():
    """An imported model's image layout (Emu3: boi, size text, marker, rows closed by row ends, end-of-frame, eoi):
    constrained decoding writes the fixed ids itself, the stream parses back to the codes, and a wrong fixed id
    in a stream is named."""
    base = vocab(row_end=True)
    v = Vocabulary.build(base.text_size, base.image_codebook_size, 0, 0, base.image_grid, image_row_end=True,
                         image_prefix=(5, 6, 7), image_suffix=(9,))
    assert Vocabulary.from_json(v.to_json()) == v
    assert "image_prefix" not in base.to_dict()  # older vocabularies keep their files
    model = tiny_model(v.size)
    g = StreamGrammar(v, GrammarConfig(allow_image=False, allow_audio=False, stop_after_span=True))
    out = generate(model, [[v.bos, 2, v.boi]] * 3, g, v.image_span_length + 1,
                   ModalitySampling.uniform(SamplingConfig(2.0)), torch.Generator().manual_seed(1))
    h, w = v.image_grid
    for seq in out.sequences:
        assert seq[:3] == [5, 6, 7] and seq[-2:] == [9, v.eoi]
        parsed = parse_stream([v.bos, 2, v.boi, *seq], v, strict=True).segments
        assert parsed[-1].codes.shape == (h, w)
        bad = [v.bos, 2, v.boi, *seq]
        bad[4] = 8
        with pytest.raises(ValueError, match="expected text:6 of the image layout, found text:8"):
            parse_stream(bad, v, strict=True)
    with pytest.raises(VocabularyError, match="image_prefix must list text ids"):
        Vocabulary.build(base.text_size, 4, 0, 0, (2, 2), image_prefix=(base.text_size,))


def test_a_bf16_model_decodes_from_an_fp32_cache_on_the_cpu():
    # generation.precision bf16: bf16 weights, but the CPU attends in fp32, so the cache stays fp32 (read as it is,
    # not cast whole every step); the int and the tensor (static) slot paths both cast the new keys into it
    v = vocab()
    model = tiny_model(v.size).to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    seq = torch.randint(0, v.size, (12,), generator=g)
    full = model.logits(model(seq[None])).squeeze(0).float()  # (12, V)
    for static in (False, True):
        kv = new_cache(model, 1, 16)
        assert kv.layers[0].k.dtype == torch.float32
        logits = [prefill(model, seq[None, :6], torch.zeros(1, 6, dtype=torch.long), torch.arange(6)[None], kv)]
        for i in range(6, 11):
            pos = torch.tensor(i) if static else i
            logits.append(decode_one_token(model, seq[None, i:i + 1], kv, pos))
        got = torch.cat(logits)  # (6, V): after tokens 5..10
        # bf16 matmuls either way; the cache and attention in fp32 differ from the full forward by bf16 rounding
        torch.testing.assert_close(got, full[5:11], atol=0.15, rtol=0.05)
        assert got.argmax(-1).tolist() == full[5:11].argmax(-1).tolist()
