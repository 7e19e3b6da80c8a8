"""The decoding engine: a static preallocated KV cache and small compile-able steps (gpt-fast style).

- :func:`prefill` runs the (left-padded) prompts through the model once, filling cache slots [0, T);
- :func:`decode_one_token` feeds one token per row at slot ``cache_pos`` and returns the next logits;
- :func:`decode_n_tokens` is the loop: guidance -> grammar mask -> per-modality sampling -> stop conditions ->
  streaming callback -> next step.
- :func:`generate` puts them together for a batch of prompts of different lengths.

Batched prompts of different lengths are LEFT-padded (the model's KV-cache contract): pad slots carry doc id -1
and real tokens doc id 0 with positions from 0, so no real token ever attends to a pad, and every row's next
token lands in the same cache slot. Rows stop independently (eos, or the end of the span with
``stop_after_span``); finished rows write ``pad`` until every row is done or the budget runs out.

``prefill`` and ``decode_one_token`` are small functions with no state of their own. In eager mode the decode
loop passes the slot (``cache_pos``) as an int and attention reads only the slots written so far. A compiled step
gets it as a 0-d int64 tensor, so its shapes depend only on (rows, cache length): keys span the whole static
cache with unwritten slots masked (``transformer/kv_cache.py``), and one graph compiled by
:func:`compiled_decode_step` serves every position. ``compile`` (``generate``'s argument, the recipe's
``generation.compile``) picks it; compiling costs a one-off graph build per (rows, cache length), and the cache
length is rounded up to a multiple of ``CACHE_BUCKET`` so calls with nearby prompt lengths share a graph.

Axis legend: B rows (2B with classifier-free guidance: conditional rows first), T prompt length, V vocabulary.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch._inductor.config as inductor_config

from anyloom.generation.cfg import GuidanceConfig, guide
from anyloom.generation.constraints import GrammarState, StreamGrammar
from anyloom.generation.sampling import ModalitySampling, params_for_modality, sample
from anyloom.sequences.interleave import bidirectional_span_ids
from anyloom.transformer.attention import attends_in
from anyloom.transformer.kv_cache import KVCache
from anyloom.transformer.model import Transformer

PAD_DOC = -1  # doc id of left-padding slots: real tokens (doc 0) never attend to them

# "always" / "never" compile the decode step; "auto" compiles on the devices where it was measured to pay
CompileMode = Literal["auto", "always", "never"]
COMPILE_MODES: tuple[str, ...] = ("auto", "always", "never")
AUTO_COMPILE_DEVICES: tuple[str, ...] = ("cuda",)


@dataclass
class PaddedPrompts:
    tokens: torch.Tensor  # (B, T) int64, left-padded with the vocabulary's pad id
    valid: torch.Tensor  # (B, T) bool, True on real tokens
    doc_ids: torch.Tensor  # (B, T) int64, PAD_DOC on padding, 0 on real tokens
    positions: torch.Tensor  # (B, T) int64, 0.. per row from its first real token (0 on padding)
    lengths: torch.Tensor  # (B,) real prompt lengths


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> PaddedPrompts:
    """Left-pad prompts of different lengths into one batch (see the module docstring)."""
    if not prompts:
        raise ValueError("no prompts given")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty; every prompt needs at least bos")
    T = max(lengths)
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        valid[i, T - len(p) :] = True
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    positions = (torch.arange(T)[None, :] - (T - lengths_t)[:, None]).clamp(min=0)  # (B, T)
    doc_ids = torch.where(valid, 0, PAD_DOC)
    return PaddedPrompts(tokens.to(device), valid.to(device), doc_ids.to(device), positions.to(device),
                         lengths_t.to(device))


def new_cache(model: Transformer, batch: int, max_len: int) -> KVCache:
    """A static cache sized for ``batch`` rows of ``max_len`` slots, on the model's device, in the dtype attention
    computes in for its weights (``attends_in``: fp32 on the CPU whatever the weights, their dtype elsewhere)."""
    cfg = model.cfg
    p = model.tok_embeddings.weight
    return KVCache(batch, max_len, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, dtype=attends_in(p.dtype, p.device),
                   device=p.device)


def prefill(model: Transformer, tokens: torch.Tensor, doc_ids: torch.Tensor, positions: torch.Tensor,
            kv_cache: KVCache, span_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Prompts (B, T) into cache slots [0, T) -> logits of the next token (B, V) fp32.

    ``span_ids`` (B, T): the prompt's bidirectional spans (``bidirectional_span_ids``), kept in the cache so that
    every later token sees them as the training documents' conditions were seen."""
    hidden = model(tokens, doc_ids, positions, span_ids=span_ids, kv_cache=kv_cache, cache_pos=0)  # (B, T, D)
    return model.logits(hidden[:, -1:]).squeeze(1).float()


def decode_one_token(model: Transformer, token: torch.Tensor, kv_cache: KVCache,
                     cache_pos: int | torch.Tensor) -> torch.Tensor:
    """One token per row (B, 1) at slot ``cache_pos`` (doc id and position continue the cache) -> (B, V) fp32.

    ``cache_pos`` as a 0-d int64 tensor keeps every shape fixed across steps (what compiling needs)."""
    hidden = model(token, kv_cache=kv_cache, cache_pos=cache_pos)  # (B, 1, D)
    return model.logits(hidden).squeeze(1).float()


StepFn = Callable[[Transformer, torch.Tensor, KVCache, "int | torch.Tensor"], torch.Tensor]

CACHE_BUCKET = 64  # compiled decoding rounds the cache length up to this, so nearby lengths share one graph
_compiled_step: StepFn | None = None
# CPU: per model, (the weights version its step froze, the step)
_frozen_steps: weakref.WeakKeyDictionary[Transformer, tuple[tuple[tuple[int, int], ...], StepFn]] = (
    weakref.WeakKeyDictionary())


def compiled_decode_step(model: Transformer) -> StepFn:
    """``decode_one_token`` under ``torch.compile`` (whole graph, static shapes).

    Dynamo keeps one graph per (model, rows, cache length) and guards on shapes only, never on the value of the
    tensor ``cache_pos``; a graph break or a per-position recompile would be a bug (tests count compiles).

    For a ``model`` on the CPU, the step is built for that model's weights as they are now, frozen into the
    graph (inductor's ``freezing``): inductor folds them as constants and repacks each linear layer's weight for
    the CPU's GEMM library (MKL's packed format for fp32; the same bits, and 1.4-1.8x faster on the few-row
    matmuls of a decode step, docs/BENCHMARKS.md). A frozen graph would keep serving the weights it saw, so a
    step is kept per model and weights version (every parameter's storage and in-place version counter): after
    an optimizer step or a ``load_state_dict`` the next call builds a new graph, never one with stale weights.
    Elsewhere (CUDA) one step built once per process serves every model and reads the weights at every call.
    """
    global _compiled_step
    if model.tok_embeddings.weight.device.type != "cpu":
        if _compiled_step is None:
            _compiled_step = torch.compile(decode_one_token, dynamic=False, fullgraph=True)
        return _compiled_step
    version = tuple((p.data_ptr(), p._version) for p in model.parameters())
    kept = _frozen_steps.get(model)
    if kept is None or kept[0] != version:
        kept = (version, _frozen_step())
        _frozen_steps[model] = kept
    return kept[1]


def _frozen_step() -> StepFn:
    """A compiled ``decode_one_token`` that freezes the weights it is traced with, one graph per (rows, cache
    length). Each graph comes from its own copy of the function's code: dynamo keeps graphs, and counts
    recompiles against its limit, per code object, so any number of shapes compile (a batch job meets many) and
    each frozen step has graphs and weights of its own. Freezing is read when dynamo traces (parameters become
    constants) as well as when inductor compiles, so the flag is set around the call that builds a graph, not
    passed as a compile option; ``cpp_wrapper`` makes the graph's launcher C++ (a decode step is mostly launch
    overhead). Later calls run the built graph without the patch (19 us a call, ~2% of a batch-1 step)."""
    graphs: dict[tuple[int, int], Callable] = {}

    def step(model: Transformer, token: torch.Tensor, kv_cache: KVCache, cache_pos: int | torch.Tensor):
        shape = (token.shape[0], kv_cache.max_len)
        compiled = graphs.get(shape)
        if compiled is None:
            code = decode_one_token.__code__.replace()
            fn = types.FunctionType(code, decode_one_token.__globals__, decode_one_token.__name__)
            compiled = torch.compile(fn, dynamic=False, fullgraph=True)
            with torch.no_grad(), inductor_config.patch(freezing=True, cpp_wrapper=True):
                logits = compiled(model, token, kv_cache, cache_pos)  # traces and builds the frozen graph
            graphs[shape] = compiled
            return logits
        with torch.no_grad():
            return compiled(model, token, kv_cache, cache_pos)

    return step


def use_compile(compile: CompileMode, device: torch.device) -> bool:
    """Whether ``compile`` ("auto" / "always" / "never") compiles the decode step on ``device``."""
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile={compile!r}: expected one of {', '.join(COMPILE_MODES)}")
    return compile == "always" or (compile == "auto" and device.type in AUTO_COMPILE_DEVICES)


@dataclass
class StepEvent:
    """What the streaming callback receives after every step (conditional rows only)."""

    step: int  # 0-based index of the generated token
    tokens: torch.Tensor  # (B,) the ids just written (pad for rows that were already done)
    modality: torch.Tensor  # (B,) TEXT / IMAGE / AUDIO of those ids (as decided by the grammar)
    done: torch.Tensor  # (B,) rows finished after this step


@dataclass
class Decoded:
    tokens: torch.Tensor  # (B, N) generated ids, pad after a row finished
    finished: torch.Tensor  # (B,) bool: the row stopped by itself (eos / end of span), not by the budget
    state: GrammarState  # the grammar state after the last step


@torch.no_grad()
def decode_n_tokens(
    model: Transformer,
    kv_cache: KVCache,
    logits: torch.Tensor,
    cache_pos: int,
    state: GrammarState,
    grammar: StreamGrammar,
    n: int,
    sampling: ModalitySampling,
    generator: torch.Generator | None = None,
    guidance: GuidanceConfig | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    step_fn: StepFn = decode_one_token,
    static: bool = False,
) -> Decoded:
    """Sample up to ``n`` tokens per row starting from ``logits`` (B, V) (or (2B, V) with guidance).

    The grammar gets the remaining budget, so every row's stream is complete (spans closed) within ``n``.
    ``step_fn`` replaces :func:`decode_one_token` (same signature), e.g. the compiled step or an instrumented
    one. It gets the slot as a Python int, so attention reads only the slots written so far; with ``static`` it
    gets a 0-d int64 tensor and attention reads the whole cache (fixed shapes: what a compiled step needs).
    """
    device = logits.device
    table = sampling.as_tensors(device)
    guided = guidance is not None and guidance.active
    scales = guidance.scales(device) if guided else None
    B = state.mode.shape[0]
    pad, vocab_size = grammar.vocab.pad, grammar.vocab.size
    out = torch.full((B, n), pad, dtype=torch.long, device=device)
    # 0-d with ``static``: one compiled graph for every slot; an int: attention over the filled prefix only
    pos: int | torch.Tensor = torch.tensor(cache_pos, dtype=torch.long, device=device) if static else cache_pos
    written = 0
    for i in range(n):
        modality = state.modality()
        # ids past the vocabulary (a model with a padded embedding) are never legal: drop them before the mask
        logits = logits[:, :vocab_size]
        step_logits = guide(logits, modality, scales) if guided else logits  # (B, V)
        allowed = grammar.mask(state, remaining=n - i)  # (B, V)
        step_logits = step_logits.masked_fill(~allowed, float("-inf"))
        token = sample(step_logits, params_for_modality(table, modality), generator)  # (B,)
        was_done = state.done
        token = torch.where(was_done, pad, token)
        state = grammar.advance(state, token, active=~was_done)
        out[:, i] = token
        written = i + 1
        if on_step is not None:
            on_step(StepEvent(i, token, modality, state.done))
        if bool(state.done.all()) or i == n - 1:
            break
        feed = torch.cat([token, token]) if guided else token  # both twins follow the same stream
        logits = step_fn(model, feed[:, None], kv_cache, pos)
        pos = pos + 1  # (a new tensor when static: the step may hold on to its input)
    return Decoded(out[:, :written], state.done.clone(), state)


@dataclass
class GenerationOutput:
    sequences: list[list[int]]  # per row: the generated ids (no prompt, no trailing pad)
    finished: list[bool]  # per row: stopped by itself (eos / end of span) rather than by the budget
    prompt_lengths: list[int]


@torch.no_grad()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    grammar: StreamGrammar,
    max_new_tokens: int,
    sampling: ModalitySampling | None = None,
    generator: torch.Generator | None = None,
    guidance: GuidanceConfig | None = None,
    uncond_prompts: Sequence[Sequence[int]] | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
    compile: CompileMode = "auto",
    samples: int = 1,
) -> GenerationOutput:
    """Continue each prompt (token ids, starting with bos) under ``grammar``; see the module docstring.

    With ``guidance`` active, ``uncond_prompts`` (one per prompt: the same request with the condition dropped)
    run as the second half of the batch. ``compile`` decides whether the decode step runs compiled
    (:func:`use_compile`); the tokens are the same either way up to fp32 rounding (tests compare greedy runs).
    ``samples`` continues each prompt that many times (output rows i * samples ... (i + 1) * samples - 1 belong
    to prompt i) from one prefill: the prompt's cache rows are copied, not recomputed (the prefill of long image
    or speech prompts is most of the cost of sampling several short texts from each).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    sampling = sampling if sampling is not None else ModalitySampling()
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model.tok_embeddings.weight.device
    guided = guidance is not None and guidance.active
    B = len(prompts)
    rows = list(prompts)
    if guided:
        if uncond_prompts is None or len(uncond_prompts) != B:
            raise ValueError("classifier-free guidance needs one unconditional prompt per prompt (uncond_prompts)")
        rows += list(uncond_prompts)
    batch = left_pad(rows, grammar.vocab.pad, device)
    T = batch.tokens.shape[1]
    if T + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_seq_len {model.cfg.max_seq_len}")
    bad = (batch.tokens < 0) | (batch.tokens >= model.cfg.vocab_size)
    if bool(bad.any()):
        r, t = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"prompt row {r % B} holds id {int(batch.tokens[r, t])} outside the model's vocabulary "
                         f"[0, {model.cfg.vocab_size})")
    state = grammar.state_after_prompts(batch.tokens[:B], batch.valid[:B])
    if bool(state.done.any()):
        r = int(state.done.nonzero()[0, 0])
        raise ValueError(f"prompt {r} already ends the stream (eos); nothing to generate")
    need = grammar.tokens_to_close(state)
    if int(need.max()) > max_new_tokens:
        r = int(need.argmax())
        raise ValueError(f"prompt {r} leaves a span open that needs {int(need[r])} more tokens to close, but "
                         f"max_new_tokens is {max_new_tokens}")
    compiled = use_compile(compile, device)
    slots = T + max_new_tokens
    if compiled:  # one graph per cache length: round it up so that nearby prompt lengths share a graph
        slots = -(-slots // CACHE_BUCKET) * CACHE_BUCKET
    kv = new_cache(model, batch.tokens.shape[0], slots)
    spans = bidirectional_span_ids(grammar.vocab, batch.tokens, batch.valid)  # a prompt is given, never trained
    logits = prefill(model, batch.tokens, batch.doc_ids, batch.positions, kv, spans)
    if samples > 1:  # conditional rows first, then their unconditional twins, each prompt's samples side by side
        rows_of = torch.arange(batch.tokens.shape[0], device=device).repeat_interleave(samples)
        kv, logits = kv.select_rows(rows_of), logits.index_select(0, rows_of)
        state = state.repeat_rows(samples)
    decoded = decode_n_tokens(model, kv, logits, T, state, grammar, max_new_tokens, sampling, generator,
                              guidance if guided else None, on_step,
                              compiled_decode_step(model) if compiled else decode_one_token, static=compiled)
    sequences = []
    for r in range(B * samples):
        ids = decoded.tokens[r].tolist()
        while ids and ids[-1] == grammar.vocab.pad:
            ids.pop()
        sequences.append(ids)
    return GenerationOutput(sequences, decoded.finished.tolist(),
                            batch.lengths[:B].repeat_interleave(samples).tolist())
