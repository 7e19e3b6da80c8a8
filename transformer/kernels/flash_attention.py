"""Flash attention in Triton with document masking, GQA and block skipping; forward and backward.

Axis legend: B batch, Hq query heads, Hk key/value heads (G = Hq // Hk queries share one key head), Tq / Tk
query / key lengths, D head dim; BM / BN query / key block sizes.

The mask is the rule of ``anyloom.transformer.attention``: query i (at key index ``q_start + i``) sees key j iff
j <= q_start + i and q_doc[i] == k_doc[j]. Two kinds of blocks are never touched: key blocks after the query
block (causality bounds the loop) and key blocks holding only documents that end before the query block's first
one (the loop starts at a per-block bound computed on the host from (B, n_blocks) tables of doc-id minima and
maxima), so a batch of packed short documents costs about the sum of their squares, not the square of the row.
The loop body has no branch, so Triton can software-pipeline its loads (``num_stages``).

Forward (per query block): online softmax over key blocks, keeps the row log-sum-exp for the backward.
Backward: delta = rowsum(dO * O); one kernel per key block accumulates dK and dV over the query blocks (and over
the G query heads of its key head, so GQA needs no atomics); one kernel per query block accumulates dQ.

Registered as torch custom ops ``anyloom::flash_attn_fwd`` / ``anyloom::flash_attn_bwd`` (``triton_op`` +
``wrap_triton``) with fake implementations, autograd and bf16 autocast (``register_bf16_autocast``). The load
and mask code the three kernels share is in ``_key_block`` / ``_query_block`` (both via ``_load_pair``) /
``_visible``; Triton inlines them (the same PTX instruction counts and shared memory as the hand-inlined kernels:
triton 3.9, sm_90, bf16, d64 and d128).
``flash_attention_reference`` is the PyTorch fallback with the same API. Runs on CUDA, or on CPU under
``TRITON_INTERPRET=1`` (then every tensor is read as fp32: the interpreter's bf16 arithmetic is wrong in triton 3.9).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from anyloom.transformer.kernels import register_bf16_autocast
from anyloom.transformer.kernels.tuning import Tile, tile_for, tuned_tiles

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch reference still works; flash_attention raises a clear error
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def flash_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, q_doc: Tensor, k_doc: Tensor, q_start: int = 0
) -> Tensor:
    """Same API as :func:`flash_attention`, in PyTorch (dense mask + SDPA)."""
    from anyloom.transformer.attention import build_mask

    mask = build_mask(q_doc, k_doc, q_start)[:, None]  # (B, 1, Tq, Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def _block_doc_min_max(q_doc: Tensor, k_doc: Tensor, bm: int, bn: int) -> tuple[Tensor, Tensor]:
    """(B, n_query_blocks) smallest doc id of each block of ``bm`` queries and (B, n_key_blocks) largest doc id of
    each block of ``bn`` keys (the padding of a last partial block ignored): all the block bounds need."""
    big = torch.iinfo(torch.int32).max

    def per_block(doc: Tensor, block: int, fill: int) -> Tensor:
        b, t = doc.shape
        n = -(-t // block)
        return F.pad(doc, (0, n * block - t), value=fill).view(b, n, block)  # (B, n, block)

    return per_block(q_doc, bm, big).amin(-1), per_block(k_doc, bn, -big).amax(-1)


# Default (BM, BN, num_warps, num_stages) per kernel and head-dim bucket (the smallest bucket >= the head dim).
# 64 and 128: the fastest of 6 candidates each on an H200 (triton 3.6; docs/BENCHMARKS.md). 256: not measured,
# sized to fit shared memory. Tiles measured on the GPU at hand (``python scripts/bench_gpu.py --only tune``)
# replace them through the tuning file (``anyloom.transformer.kernels.tuning``).
CONFIGS: dict[str, dict[int, Tile]] = {
    "fwd": {64: (64, 64, 4, 3), 128: (64, 64, 4, 3), 256: (64, 32, 8, 2)},
    "bwd": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (32, 32, 8, 1)},
}


def _config(kind: str, d: int, f32: bool, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BM, BN, BD, num_warps, num_stages) for ``kind`` ("fwd" | "bwd") at head dim d on ``device``: the tuning
    file's tile for this GPU where it has one, else ``CONFIGS``; one config, no autotune
    (multi-config autotune fails in the interpreter). fp32 inputs (a correctness path, not a fast one) run
    unpipelined: pipelined fp32 tiles at head dim 128 need more shared memory than a Hopper SM has."""
    bd = max(16, triton.next_power_of_2(d))
    if INTERPRET:
        return 16, 16, bd, 1, 1
    tuned = tuned_tiles("flash_attention", _gpu_name(device)).get(kind, {})
    bm, bn, warps, stages = tile_for(CONFIGS[kind], tuned, bd)
    return bm, bn, bd, warps, 1 if f32 else stages


@functools.cache
def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _first_key_block(qmin: Tensor, kmax: Tensor) -> Tensor:
    """(B, n_query_blocks) int32: the first key block whose largest doc id reaches the query block's smallest.

    Key blocks before it hold only documents that end before any of the query block's start, so no query of
    the block sees them (any doc-id layout; with packed, non-decreasing ids every block after it is needed).
    """
    reach = kmax[:, None, :] >= qmin[:, :, None]  # (B, n_qb, n_kb)
    first = reach.to(torch.int32).argmax(-1)
    return torch.where(reach.any(-1), first, kmax.shape[1]).to(torch.int32).contiguous()


def _end_query_block(qmin: Tensor, kmax: Tensor) -> Tensor:
    """(B, n_key_blocks) int32: one past the last query block whose smallest doc id is <= the key block's largest.

    Query blocks from there on hold only documents that start after all of the key block's: none sees it.
    """
    within = qmin[:, None, :] <= kmax[:, :, None]  # (B, n_kb, n_qb)
    end = qmin.shape[1] - within.flip(-1).to(torch.int32).argmax(-1)
    return torch.where(within.any(-1), end, 0).to(torch.int32).contiguous()


if triton is not None:

    @triton.jit
    def _load_pair(A, B, off, mask, F32: tl.constexpr):
        """Two same-layout (rows, BD) tiles at ``off`` (zeros where masked), read as fp32 in the F32 path."""
        a = tl.load(A + off, mask=mask, other=0.0)
        b = tl.load(B + off, mask=mask, other=0.0)
        if F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return a, b

    @triton.jit
    def _key_block(K, V, KDOC, b, hk, offs_k, offs_d, d_ok, Tk, s_kb, s_kh, s_kt, F32: tl.constexpr):
        """k, v (BN, BD) and the doc ids of keys ``offs_k`` of key head ``hk`` (fp32 in the F32 path)."""
        k_ok = offs_k < Tk
        kv_off = b * s_kb + hk * s_kh + offs_k[:, None] * s_kt + offs_d[None, :]
        k, v = _load_pair(K, V, kv_off, k_ok[:, None] & d_ok[None, :], F32)
        kdoc = tl.load(KDOC + b * Tk + offs_k, mask=k_ok, other=0)
        return k, v, kdoc, k_ok, kv_off

    @triton.jit
    def _query_block(Q, DO, QDOC, LSE, DELTA, b, h, Hq, offs_m, offs_d, d_ok, Tq, s_qb, s_qh, s_qt,
                     F32: tl.constexpr):
        """What the backward needs of queries ``offs_m`` of head ``h``: q, dO (BM, BD), doc ids, lse, delta."""
        m_ok = offs_m < Tq
        q_off = b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :]
        q, do = _load_pair(Q, DO, q_off, m_ok[:, None] & d_ok[None, :], F32)
        qdoc = tl.load(QDOC + b * Tq + offs_m, mask=m_ok, other=0)
        lse = tl.load(LSE + (b * Hq + h) * Tq + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + (b * Hq + h) * Tq + offs_m, mask=m_ok, other=0.0)
        return q, do, qdoc, lse, delta, m_ok, q_off

    @triton.jit
    def _visible(offs_m, m_ok, qdoc, offs_k, k_ok, kdoc, q_start):
        """(BM, BN) the module's mask rule: causal (query i at key index q_start + i) and the same document."""
        ok = (offs_k[None, :] <= offs_m[:, None] + q_start) & (qdoc[:, None] == kdoc[None, :])
        return ok & k_ok[None, :] & m_ok[:, None]

    @triton.jit
    def _fwd_kernel(
        Q, K, V, OUT, LSE, QDOC, KDOC, KLO,
        s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_ob, s_oh, s_ot,
        Hq, G, Tq, Tk, q_start, n_qb,
        D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, F32: tl.constexpr,
        SCALE: tl.constexpr, PREC: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // Hq
        h = bh % Hq
        hk = h // G
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = tl.arange(0, BN)
        offs_d = tl.arange(0, BD)
        m_ok = offs_m < Tq
        d_ok = offs_d < D
        q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if F32:
            q = q.to(tl.float32)
        qdoc = tl.load(QDOC + b * Tq + offs_m, mask=m_ok, other=0)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, BD], tl.float32)
        lo = tl.load(KLO + b * n_qb + pid_m)  # first key block whose doc range reaches this block's
        hi = tl.minimum(q_start + tl.minimum((pid_m + 1) * BM, Tq), Tk)  # causal: keys [0, hi)
        for kb in range(lo, tl.cdiv(hi, BN)):
            offs_k = kb * BN + offs_n
            k, v, kdoc, k_ok, _ = _key_block(K, V, KDOC, b, hk, offs_k, offs_d, d_ok, Tk, s_kb, s_kh, s_kt, F32)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * SCALE  # (BM, BN)
            s = tl.where(_visible(offs_m, m_ok, qdoc, offs_k, k_ok, kdoc, q_start), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            p = tl.exp(s - m_use[:, None])
            alpha = tl.exp(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        l_use = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_use[:, None]
        tl.store(OUT + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        tl.store(LSE + bh * Tq + offs_m, m_i + tl.log(l_use), mask=m_ok)

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, QDOC, KDOC, QEND,
        s_qb, s_qh, s_qt, s_kb, s_kh, s_kt,
        Hq, Hk, G, Tq, Tk, q_start, n_kb,
        D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, F32: tl.constexpr,
        SCALE: tl.constexpr, PREC: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        bhk = tl.program_id(1)
        b = bhk // Hk
        hk = bhk % Hk
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_m0 = tl.arange(0, BM)
        offs_d = tl.arange(0, BD)
        d_ok = offs_d < D
        k, v, kdoc, k_ok, kv_off = _key_block(K, V, KDOC, b, hk, offs_n, offs_d, d_ok, Tk, s_kb, s_kh, s_kt, F32)
        dk = tl.zeros([BN, BD], tl.float32)
        dv = tl.zeros([BN, BD], tl.float32)
        lo = tl.maximum(pid_n * BN - q_start, 0) // BM  # causal: earlier queries never see this block
        hi = tl.load(QEND + b * n_kb + pid_n)  # query blocks from hi on start after this block's documents
        for g in range(0, G):
            h = hk * G + g
            for mb in range(lo, hi):
                offs_m = mb * BM + offs_m0
                q, do, qdoc, lse, delta, m_ok, _ = _query_block(Q, DO, QDOC, LSE, DELTA, b, h, Hq, offs_m, offs_d,
                                                                d_ok, Tq, s_qb, s_qh, s_qt, F32)
                s = tl.dot(q, tl.trans(k), input_precision=PREC) * SCALE  # (BM, BN)
                ok = _visible(offs_m, m_ok, qdoc, offs_n, k_ok, kdoc, q_start)
                p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        tl.store(DK + kv_off, (dk * SCALE).to(DK.dtype.element_ty), mask=k_ok[:, None] & d_ok[None, :])
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=k_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, QDOC, KDOC, KLO,
        s_qb, s_qh, s_qt, s_kb, s_kh, s_kt,
        Hq, G, Tq, Tk, q_start, n_qb,
        D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, F32: tl.constexpr,
        SCALE: tl.constexpr, PREC: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // Hq
        h = bh % Hq
        hk = h // G
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = tl.arange(0, BN)
        offs_d = tl.arange(0, BD)
        d_ok = offs_d < D
        q, do, qdoc, lse, delta, m_ok, q_off = _query_block(Q, DO, QDOC, LSE, DELTA, b, h, Hq, offs_m, offs_d, d_ok,
                                                            Tq, s_qb, s_qh, s_qt, F32)
        dq = tl.zeros([BM, BD], tl.float32)
        lo = tl.load(KLO + b * n_qb + pid_m)
        hi = tl.minimum(q_start + tl.minimum((pid_m + 1) * BM, Tq), Tk)
        for kb in range(lo, tl.cdiv(hi, BN)):
            offs_k = kb * BN + offs_n
            k, v, kdoc, k_ok, _ = _key_block(K, V, KDOC, b, hk, offs_k, offs_d, d_ok, Tk, s_kb, s_kh, s_kt, F32)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * SCALE
            ok = _visible(offs_m, m_ok, qdoc, offs_k, k_ok, kdoc, q_start)
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        tl.store(DQ + q_off, (dq * SCALE).to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])

    @torch.library.triton_op("anyloom::flash_attn_fwd", mutates_args=())
    def _flash_fwd(
        q: Tensor, k: Tensor, v: Tensor, q_doc: Tensor, k_doc: Tensor, q_start: int
    ) -> tuple[Tensor, Tensor]:
        b, hq, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        f32 = INTERPRET or q.dtype == torch.float32
        bm, bn, bd, warps, stages = _config("fwd", d, f32, q.device)
        o = torch.empty_like(q)
        lse = torch.empty((b, hq, tq), dtype=torch.float32, device=q.device)
        klo = _first_key_block(*_block_doc_min_max(q_doc, k_doc, bm, bn))
        grid = (triton.cdiv(tq, bm), b * hq)
        torch.library.wrap_triton(_fwd_kernel)[grid](
            q, k, v, o, lse, q_doc, k_doc, klo,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            hq, hq // hk, tq, tk, q_start, klo.shape[1],
            D=d, BM=bm, BN=bn, BD=bd, F32=f32, SCALE=1.0 / math.sqrt(d), PREC="ieee" if f32 else "tf32",
            num_warps=warps, num_stages=stages,
        )
        return o, lse

    @_flash_fwd.register_fake
    def _(q, k, v, q_doc, k_doc, q_start):
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.triton_op("anyloom::flash_attn_bwd", mutates_args=())
    def _flash_bwd(
        do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, q_doc: Tensor, k_doc: Tensor,
        q_start: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, hq, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        f32 = INTERPRET or q.dtype == torch.float32
        bm, bn, bd, warps, stages = _config("bwd", d, f32, q.device)
        delta = (do.float() * o.float()).sum(-1).contiguous()  # (B, Hq, Tq)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        qmin, kmax = _block_doc_min_max(q_doc, k_doc, bm, bn)
        qend, klo = _end_query_block(qmin, kmax), _first_key_block(qmin, kmax)
        consts = dict(D=d, BM=bm, BN=bn, BD=bd, F32=f32, SCALE=1.0 / math.sqrt(d), PREC="ieee" if f32 else "tf32",
                      num_warps=warps, num_stages=stages)
        torch.library.wrap_triton(_bwd_dkdv_kernel)[(triton.cdiv(tk, bn), b * hk)](
            q, k, v, do, lse, delta, dk, dv, q_doc, k_doc, qend,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            hq, hk, hq // hk, tq, tk, q_start, qend.shape[1], **consts,
        )
        torch.library.wrap_triton(_bwd_dq_kernel)[(triton.cdiv(tq, bm), b * hq)](
            q, k, v, do, lse, delta, dq, q_doc, k_doc, klo,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            hq, hq // hk, tq, tk, q_start, klo.shape[1], **consts,
        )
        return dq, dk, dv

    @_flash_bwd.register_fake
    def _(do, q, k, v, o, lse, q_doc, k_doc, q_start):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def _setup_context(ctx, inputs, output):
        q, k, v, q_doc, k_doc, q_start = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse, q_doc, k_doc)
        ctx.q_start = q_start

    def _backward(ctx, do, _dlse):
        q, k, v, o, lse, q_doc, k_doc = ctx.saved_tensors
        dq, dk, dv = _flash_bwd(do.contiguous(), q, k, v, o, lse, q_doc, k_doc, ctx.q_start)
        return dq, dk, dv, None, None, None

    _flash_fwd.register_autograd(_backward, setup_context=_setup_context)
    register_bf16_autocast("anyloom::flash_attn_fwd")


def flash_attention(q: Tensor, k: Tensor, v: Tensor, q_doc: Tensor, k_doc: Tensor, q_start: int = 0) -> Tensor:
    """Document-masked causal attention. q (B, Hq, Tq, D); k, v (B, Hk, Tk, D); q_doc (B, Tq), k_doc (B, Tk) ints.

    Query i sits at key index ``q_start + i`` (KV-cache decoding). Returns (B, Hq, Tq, D) in q's dtype.
    """
    if triton is None:
        raise ImportError("the triton attention backend needs the triton package; use backend 'sdpa'")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("Triton kernels run on CUDA, or on CPU only with TRITON_INTERPRET=1 set before import")
    if q.shape[-1] > 256:
        raise ValueError(f"head dim {q.shape[-1]} > 256 is not supported by the triton attention kernel")
    o, _ = _flash_fwd(q.contiguous(), k.contiguous(), v.contiguous(), q_doc.to(torch.int32).contiguous(),
                      k_doc.to(torch.int32).contiguous(), int(q_start))
    return o
