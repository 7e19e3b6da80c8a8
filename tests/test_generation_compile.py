"""The shape-static decode step: a tensor ``cache_pos`` gives the same logits as the int path and the full forward,
and ``torch.compile`` builds ONE graph that serves every position with the same tokens as eager decoding.

Tolerance: cached vs full forward logits agree to 1e-4 (atol and rtol), eager or compiled: the cached step sums
attention over a different key range (the whole static cache, unwritten slots masked) and inductor fuses and
reorders fp32 reductions, so the last bits differ; the tiny model's logits are O(10), and a real disagreement
(a wrong slot, a leaked pad, a missing mask) is O(1).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from anyloom.generation.config import GenerationConfig
from anyloom.generation.constraints import GrammarConfig, StreamGrammar
from anyloom.generation.engine import (
    CACHE_BUCKET,
    compiled_decode_step,
    decode_one_token,
    generate,
    left_pad,
    new_cache,
    prefill,
    use_compile,
)
from anyloom.generation.sampling import GREEDY, ModalitySampling, SamplingConfig
from anyloom.sequences.interleave import parse_stream
from anyloom.sequences.vocab import Vocabulary
from anyloom.transformer.model import ModelConfig, Transformer

TOL = {"atol": 1e-4, "rtol": 1e-4}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, one torch thread


def tiny(seed: int = 0) -> tuple[Transformer, Vocabulary]:
    v = Vocabulary.build(24, 16, 8, 3, (2, 3))
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=v.size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                      attention="sdpa")
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.output.weight.mul_(20)  # logits far from uniform: greedy near-ties are rare
    return model, v


def teacher_forced(model: Transformer, v: Vocabulary, step, tensor_pos: bool, slots: int):
    """Ragged prompts, then each row fed its own continuation: the logits after every prefix, and the rows."""
    g = torch.Generator().manual_seed(1)
    lengths, total = [3, 9, 6], 16
    seqs = [torch.randint(0, v.size, (total,), generator=g) for _ in lengths]
    batch = left_pad([s[:n].tolist() for s, n in zip(seqs, lengths)], v.pad)
    T = batch.tokens.shape[1]
    kv = new_cache(model, len(lengths), slots)
    with torch.no_grad():
        cached = [prefill(model, batch.tokens, batch.doc_ids, batch.positions, kv)]
        for i in range(total - min(lengths)):
            nxt = torch.tensor([s[n + i].item() if n + i < total else v.pad for s, n in zip(seqs, lengths)])
            pos = torch.tensor(T + i) if tensor_pos else T + i
            cached.append(step(model, nxt[:, None], kv, pos))
    return cached, seqs, lengths


def assert_matches_full_forward(model, cached, seqs, lengths) -> None:
    total = len(seqs[0])
    with torch.no_grad():
        for r, (s, n) in enumerate(zip(seqs, lengths)):
            full = model.logits(model(s[None])).squeeze(0).float()  # (total, V): unpadded, no cache
            for i in range(total - n + 1):
                if n - 1 + i < total:
                    torch.testing.assert_close(cached[i][r], full[n - 1 + i], **TOL)


def test_tensor_cache_pos_matches_int_path_and_full_forward():
    model, v = tiny()
    by_int, seqs, lengths = teacher_forced(model, v, decode_one_token, tensor_pos=False, slots=40)
    by_tensor, _, _ = teacher_forced(model, v, decode_one_token, tensor_pos=True, slots=40)
    for a, b in zip(by_int, by_tensor):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert_matches_full_forward(model, by_tensor, seqs, lengths)


def test_compiled_decode_compiles_once_and_matches_eager():
    """One compile for this whole module (compiling is slow on a busy CPU): logits, greedy tokens, seeded
    sampling and the grammar, all through the same (rows=3, slots=CACHE_BUCKET) graph; then one more after the
    weights change."""
    model, v = tiny()
    torch._dynamo.reset()
    counters.clear()
    step = compiled_decode_step(model)

    cached, seqs, lengths = teacher_forced(model, v, step, tensor_pos=True, slots=CACHE_BUCKET)
    assert_matches_full_forward(model, cached, seqs, lengths)

    grammar = StreamGrammar(v, GrammarConfig(max_audio_frames=4))
    prompts = [[v.bos, 1, 2], [v.bos, v.boi], [v.bos, v.boa, v.audio_token(3, 0)]]
    greedy = ModalitySampling.uniform(GREEDY)
    eager = generate(model, prompts, grammar, 30, greedy, compile="never")
    compiled = generate(model, prompts, grammar, 30, greedy, compile="always")
    assert compiled.sequences == eager.sequences
    assert compiled.finished == eager.finished

    warm = ModalitySampling.uniform(SamplingConfig(temperature=1.5))
    run = lambda seed: generate(model, prompts, grammar, 30, warm, torch.Generator().manual_seed(seed),
                                compile="always").sequences
    first = run(7)
    assert run(7) == first  # same seed, same output
    assert run(8) != first  # the seed matters
    for prompt, seq in zip(prompts, first):
        parse_stream(prompt + seq, v, strict=True)  # constrained output parses

    # every call above ran ~30 steps at different slots: one graph, no recompile per position
    # ... and on the CPU the weights are frozen into it, while every call's cache is new: caches are inputs
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert sum(counters["recompiles"].values()) == 0, dict(counters["recompiles"])
    assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] > 0  # the frozen linears were repacked

    # the same weights keep their step; weights changed in place (an optimizer step) get a new graph, not stale ones
    assert compiled_decode_step(model) is step
    with torch.no_grad():
        model.output.weight.copy_(torch.randn(model.output.weight.shape, generator=torch.Generator().manual_seed(3))
                                  * 20)
    assert compiled_decode_step(model) is not step
    changed = generate(model, prompts, grammar, 30, greedy, compile="never")
    assert changed.sequences != eager.sequences  # the change shows in the output
    assert generate(model, prompts, grammar, 30, greedy, compile="always").sequences == changed.sequences

    # each (rows, cache length) gets a graph of its own, never a recompile: a batch job's many shapes do not run
    # into dynamo's recompile limit (a hard error under fullgraph)
    with torch._dynamo.config.patch(recompile_limit=1):
        two_rows = generate(model, prompts[:2], grammar, 30, greedy, compile="always")
    assert two_rows.sequences == changed.sequences[:2]


def test_compile_modes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_compile("auto", cpu) and use_compile("auto", cuda)
    assert use_compile("always", cpu) and not use_compile("never", cuda)
    with pytest.raises(ValueError, match="compile='sometimes'"):
        use_compile("sometimes", cpu)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="compile"):
        GenerationConfig(compile="yes")  # type: ignore[arg-type]
