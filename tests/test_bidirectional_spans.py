"""Bidirectional condition spans (prefix-LM reading of given images/audio): the rule, the loader, no leak of a
trained target, cached decoding == full forward, and the reranker's scoring document."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from anyloom.generation.constraints import StreamGrammar
from anyloom.generation.engine import decode_one_token, generate, left_pad, new_cache, prefill
from anyloom.generation.rerank import reverse_log_likelihood
from anyloom.generation.sampling import GREEDY, ModalitySampling
from anyloom.sequences.interleave import AudioIds, ImageIds, TextIds, bidirectional_span_ids, encode_document
from anyloom.sequences.mixture import ItemList, MixtureConfig, TaskMixture
from anyloom.sequences.packing import PackedLoader
from anyloom.sequences.vocab import Vocabulary, VocabularyError
from anyloom.transformer.model import ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread


def vocab(bidirectional: tuple[str, ...] = ("image",), row_end: bool = False) -> Vocabulary:
    return Vocabulary.build(24, 16, 8, 1, (2, 3), image_row_end=row_end, bidirectional=bidirectional)


def tiny_model(vocab_size: int) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                      attention="sdpa")
    return Transformer(cfg).eval()


def items(n: int = 6) -> ItemList:
    rng = np.random.default_rng(0)
    return ItemList([[TextIds(rng.integers(0, 24, 3)), ImageIds(rng.integers(0, 16, (2, 3))),
                      AudioIds(rng.integers(0, 8, (1, 4)))] for _ in range(n)])


# ---- the vocabulary field ---------------------------------------------------------------------------------------


def test_vocab_field_round_trips_and_old_files_still_load():
    v = vocab(("image", "audio"))
    assert Vocabulary.from_json(v.to_json()) == v
    plain = vocab(())
    data = json.loads(plain.to_json())
    assert "bidirectional" not in data  # unset: the file (and every fingerprint of it) is as before the field
    assert Vocabulary.from_dict(data) == plain
    with pytest.raises(VocabularyError, match="bidirectional"):
        vocab(("video",))
    with pytest.raises(VocabularyError, match="bidirectional"):
        Vocabulary.from_dict({**data, "bidirectional": "image"})


# ---- the rule ---------------------------------------------------------------------------------------------------


def test_span_rule_marks_given_image_codes_only():
    v = vocab(("image",), row_end=True)
    i2t = encode_document([ImageIds(np.arange(6).reshape(2, 3)), TextIds(np.array([1, 2]))], v, loss=[False, True])
    t2i = encode_document([TextIds(np.array([1, 2])), ImageIds(np.arange(6).reshape(2, 3))], v, loss=[False, True])
    tokens = torch.from_numpy(np.concatenate([i2t.ids, t2i.ids]))[None]
    given = ~torch.from_numpy(np.concatenate([i2t.loss_mask, t2i.loss_mask]))[None]
    spans = bidirectional_span_ids(v, tokens, given)[0]
    n = len(i2t)
    codes = torch.from_numpy(v.is_image(i2t.ids) | (i2t.ids == v.row_end))
    assert spans[:n].tolist() == codes.long().tolist()  # the condition's codes and row ends: span 1, markers 0
    assert int(codes.sum()) == 6 + 2
    assert not spans[n:].any()  # a trained (target) image stays causal
    assert bidirectional_span_ids(vocab(()), tokens, given) is None
    # two given images are two spans; audio is only read bidirectionally when listed
    two = encode_document([ImageIds(np.zeros((2, 3), np.int64)), ImageIds(np.ones((2, 3), np.int64)),
                           AudioIds(np.zeros((1, 4), np.int64)), TextIds(np.array([3]))], v,
                          loss=[False, False, False, True])
    ids, giv = torch.from_numpy(two.ids)[None], ~torch.from_numpy(two.loss_mask)[None]
    assert set(bidirectional_span_ids(v, ids, giv)[0].tolist()) == {0, 1, 2}
    assert set(bidirectional_span_ids(vocab(("image", "audio")), ids, giv)[0].tolist()) == {0, 1, 2, 3}


def test_loader_spans_follow_the_documents_loss():
    v = vocab()
    mix = TaskMixture(items(), v, MixtureConfig(tasks={"i2t": 1.0, "t2i": 1.0}, cfg_dropout=0.0))
    loader = PackedLoader(mix, 32, 4, seed=0, span_rule=functools.partial(bidirectional_span_ids, v))
    seen = 0
    for _ in range(3):
        b = next(loader)
        image = torch.from_numpy(v.is_image(b.tokens.numpy()))
        in_span = b.span_ids > 0
        assert not (in_span & ~image).any()  # only image codes
        # a code in a span never predicts a trained target: its own document trains no token of that image
        assert not (in_span & b.loss_mask).any()
        # trained image codes (targets of the step before) are never in a span
        trained_inputs = torch.zeros_like(b.loss_mask)
        trained_inputs[:, 1:] = b.loss_mask[:, :-1]
        assert not (in_span & trained_inputs).any()
        seen += int(in_span.sum())
    assert seen > 0
    assert next(PackedLoader(mix, 32, 4, seed=0)).span_ids is None


def test_no_trained_prediction_sees_its_future():
    """Perturbing every token after a trained position leaves that position's logits unchanged, spans on."""
    v = vocab(("image", "audio"))
    mix = TaskMixture(items(), v, MixtureConfig(tasks={"i2t": 1.0, "t2i": 1.0, "a2t": 1.0}, cfg_dropout=0.0))
    b = next(PackedLoader(mix, 48, 2, seed=1, span_rule=functools.partial(bidirectional_span_ids, v)))
    assert (b.span_ids > 0).any()
    model = tiny_model(v.size)
    with torch.no_grad():
        base = model.logits(model(b.tokens, b.doc_ids, b.positions, span_ids=b.span_ids))
        for r, p in b.loss_mask.nonzero().tolist()[::5]:
            tokens = b.tokens.clone()
            tokens[r, p + 1:] = (tokens[r, p + 1:] + 1) % 24  # other text ids: spans of the rest may change too
            spans = bidirectional_span_ids(v, tokens, b.span_ids > 0)
            out = model.logits(model(tokens, b.doc_ids, b.positions, span_ids=spans))
            torch.testing.assert_close(out[r, : p + 1], base[r, : p + 1])


# ---- generation and reranking -----------------------------------------------------------------------------------


def test_cached_prefill_with_spans_matches_full_forward():
    v = vocab()
    model = tiny_model(v.size)
    prompts = [encode_document([ImageIds(np.arange(6).reshape(2, 3) % 16)], v, eos=False).ids.tolist(),
               [v.bos, 3, 4]]
    batch = left_pad(prompts, v.pad)
    spans = bidirectional_span_ids(v, batch.tokens, batch.valid)
    assert (spans[0] > 0).sum() == 6 and not spans[1].any()
    kv = new_cache(model, 2, batch.tokens.shape[1] + 4)
    logits = [prefill(model, batch.tokens, batch.doc_ids, batch.positions, kv, spans)]
    nxt = torch.tensor([[5], [6]])
    logits.append(decode_one_token(model, nxt, kv, batch.tokens.shape[1]))
    for r, p in enumerate(prompts):
        full = torch.tensor([p + [int(nxt[r])]])
        sp = bidirectional_span_ids(v, full, torch.tensor([[True] * len(p) + [False]]))
        ref = model.logits(model(full, span_ids=sp))[0, -2:].float()
        torch.testing.assert_close(torch.stack([logits[0][r], logits[1][r]]), ref, atol=1e-5, rtol=1e-5)
    # the spans change what the model predicts (they are not a no-op), and generate() uses them
    causal = model.logits(model(torch.tensor([prompts[0]])))[0, -1].float()
    assert not torch.allclose(causal, logits[0][0], atol=1e-4)
    grammar = StreamGrammar(v)
    out = generate(model, prompts[:1], grammar, 3, ModalitySampling.uniform(GREEDY))
    state = grammar.state_after_prompts(batch.tokens[:1], batch.valid[:1])
    allowed = grammar.mask(state, remaining=3)[0]
    assert out.sequences[0][0] == int(logits[0][0][: v.size].masked_fill(~allowed, float("-inf")).argmax())


def test_rerank_scores_the_candidate_as_a_condition():
    v = vocab()
    model = tiny_model(v.size)
    cand, prompt = ImageIds(np.arange(6).reshape(2, 3)), [TextIds(np.array([3, 4, 5]))]
    score = float(reverse_log_likelihood(model, v, [cand], [prompt])[0])
    doc = encode_document([cand, *prompt], v, loss=[False, True])
    ids = torch.from_numpy(doc.ids)[None]
    spans = bidirectional_span_ids(v, ids[:, :-1], ~torch.from_numpy(doc.loss_mask)[None, :-1])
    logp = torch.log_softmax(model.logits(model(ids[:, :-1], span_ids=spans)).double(), -1)[0]
    want = sum(float(logp[t - 1, ids[0, t]]) for t in range(1, ids.shape[1]) if doc.loss_mask[t])
    assert score == pytest.approx(want, abs=1e-4)
