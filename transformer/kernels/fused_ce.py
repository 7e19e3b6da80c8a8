"""Linear + log-sum-exp over a large vocabulary without materialising the (N, V) fp32 logits.

Axis legend: N tokens (batch and time flattened), D model dim, V vocabulary, C a vocabulary chunk.

``linear_lse(h, w, targets)`` returns, per token, the log-sum-exp of ``h @ w.T``, the logit of the target and
the argmax. Cross-entropy is ``lse - target_logit`` and the z-loss is ``lse ** 2``, so the caller combines them
in plain PyTorch and autograd hands this op two gradients, d/dlse and d/dtarget_logit, from which the backward
rebuilds d/dlogits = softmax * g_lse + onehot(target) * g_tgt one chunk at a time.

Backends (same API, same results):

- ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``): one program per block of tokens walks the vocabulary in
  blocks with an online log-sum-exp (forward); the backward is the ``torch`` one (cuBLAS matmuls over vocabulary
  chunks of ``chunk_size``). A Triton backward that recomputed each (tokens x vocab) tile and added into dh and dw
  with fp32 atomics was removed: it made N*V*D*(1/BM + 1/BV) atomic adds (N=16k, V=32k, D=2048: 2.6e10 adds,
  ~200 GB of read-modify-write, ~50 ms at HBM speed, against ~10 ms for the 6*N*V*D matmul FLOPs on an H200),
  and its fp32 variant needed more shared memory than an H200 has. The forward is the custom op
  ``anyloom::linear_lse_fwd``, registered for bf16 autocast like F.linear.
- ``torch``: the same algorithm as an autograd Function over vocabulary chunks of ``chunk_size`` (CPU training
  uses this: peak extra memory is N x chunk_size fp32 instead of N x V).
- ``naive``: full logits + logsumexp: the reference the tests compare against.
- ``auto``: triton where it can run, else torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from anyloom.transformer.kernels import register_bf16_autocast

try:
    import triton
    import triton.language as tl
except ImportError:  # the chunked PyTorch path still works
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

Backend = Literal["auto", "triton", "torch", "naive"]


@dataclass
class LseOutput:
    lse: Tensor  # (N,) fp32, log-sum-exp of the logits (differentiable)
    target_logit: Tensor  # (N,) fp32, logit of the target id (differentiable)
    argmax: Tensor  # (N,) int64, first index of the largest logit (not differentiable)


def linear_lse(
    h: Tensor, w: Tensor, targets: Tensor, *, chunk_size: int = 8192, backend: Backend = "auto"
) -> LseOutput:
    """Per-token log-sum-exp, target logit and argmax of ``h @ w.T``; h (N, D), w (V, D), targets (N,) in [0, V)."""
    if h.ndim != 2 or w.ndim != 2 or h.shape[1] != w.shape[1] or targets.shape != (h.shape[0],):
        raise ValueError(f"linear_lse expects h (N,D), w (V,D), targets (N,); got {tuple(h.shape)}, "
                         f"{tuple(w.shape)}, {tuple(targets.shape)}")
    if backend == "auto":
        from anyloom.transformer.attention import triton_available

        backend = "triton" if triton_available(h.device) else "torch"
    if backend == "naive":
        return naive_linear_lse(h, w, targets)
    if backend == "torch":
        lse, tgt, amax = _ChunkedLinearLse.apply(h, w, targets, chunk_size)
        return LseOutput(lse, tgt, amax)
    if backend == "triton":
        if triton is None:
            raise ImportError("the triton fused-CE backend needs the triton package; use backend 'torch'")
        if h.device.type != "cuda" and not INTERPRET:
            raise RuntimeError("Triton kernels run on CUDA, or on CPU only with TRITON_INTERPRET=1 set before import")
        lse, tgt, amax = _lse_fwd(h.contiguous(), w.contiguous(), targets.to(torch.int32).contiguous(), chunk_size)
        return LseOutput(lse, tgt, amax.long())
    raise ValueError(f"unknown fused CE backend {backend!r}; expected auto, triton, torch or naive")


def naive_linear_lse(h: Tensor, w: Tensor, targets: Tensor) -> LseOutput:
    """Reference: the full (N, V) fp32 logits."""
    logits = (h @ w.t()).float()  # (N, V)
    lse = torch.logsumexp(logits, dim=-1)
    tgt = logits.gather(1, targets[:, None]).squeeze(1)
    return LseOutput(lse, tgt, logits.argmax(dim=-1))


class _ChunkedLinearLse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, targets: Tensor, chunk_size: int):
        n, v = h.shape[0], w.shape[0]
        m = torch.full((n,), float("-inf"), device=h.device)  # running max
        s = torch.zeros(n, device=h.device)  # running sum of exp(logit - m)
        amax = torch.zeros(n, dtype=torch.long, device=h.device)
        tgt = torch.zeros(n, device=h.device)
        for c0 in range(0, v, chunk_size):
            logits = (h @ w[c0 : c0 + chunk_size].t()).float()  # (N, C)
            cmax, carg = logits.max(dim=-1)
            m_new = torch.maximum(m, cmax)
            s = s * torch.exp(m - m_new) + torch.exp(logits - m_new[:, None]).sum(-1)
            amax = torch.where(cmax > m, carg + c0, amax)  # strict: ties keep the earlier (first) index
            m = m_new
            in_chunk = (targets >= c0) & (targets < c0 + logits.shape[1])
            local = (targets - c0).clamp(0, logits.shape[1] - 1)
            tgt = torch.where(in_chunk, logits.gather(1, local[:, None]).squeeze(1), tgt)
        lse = m + torch.log(s)
        ctx.save_for_backward(h, w, targets, lse)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(amax)
        return lse, tgt, amax

    @staticmethod
    def backward(ctx, g_lse: Tensor, g_tgt: Tensor, _g_amax: Tensor):
        h, w, targets, lse = ctx.saved_tensors
        dh, dw = _chunked_backward(h, w, targets, lse, g_lse, g_tgt, ctx.chunk_size)
        return dh, dw, None, None


def _chunked_backward(h: Tensor, w: Tensor, targets: Tensor, lse: Tensor, g_lse: Tensor | None,
                      g_tgt: Tensor | None, chunk_size: int) -> tuple[Tensor, Tensor]:
    """dh, dw from d/dlse and d/dtarget_logit, rebuilding d/dlogits one (N, C) vocabulary chunk at a time."""
    g_lse = torch.zeros_like(lse) if g_lse is None else g_lse.float()
    g_tgt = torch.zeros_like(lse) if g_tgt is None else g_tgt.float()
    dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    dw = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    rows = torch.arange(h.shape[0], device=h.device)
    for c0 in range(0, w.shape[0], chunk_size):
        wc = w[c0 : c0 + chunk_size]
        dlogits = torch.exp((h @ wc.t()).float() - lse[:, None]) * g_lse[:, None]  # (N, C)
        in_chunk = (targets >= c0) & (targets < c0 + wc.shape[0])
        dlogits[rows[in_chunk], targets[in_chunk] - c0] += g_tgt[in_chunk]
        dlogits = dlogits.to(h.dtype)
        dh += (dlogits @ wc).float()
        dw[c0 : c0 + chunk_size] = (dlogits.t() @ h).float()
    return dh.to(h.dtype), dw.to(w.dtype)


def _blocks() -> tuple[int, int, int, int]:
    """(BM tokens, BV vocabulary, BK model dim, num_warps): one config (autotune fails in the interpreter)."""
    return (16, 32, 32, 1) if INTERPRET else (64, 128, 64, 8)


if triton is not None:

    @triton.jit
    def _logit_tile(H, W, rows, cols, r_ok, c_ok, D, s_h, s_w, BM: tl.constexpr, BV: tl.constexpr,
                    BK: tl.constexpr, F32: tl.constexpr):
        acc = tl.zeros([BM, BV], tl.float32)
        for k0 in range(0, D, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < D
            h = tl.load(H + rows[:, None] * s_h + ks[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W + cols[:, None] * s_w + ks[None, :], mask=c_ok[:, None] & k_ok[None, :], other=0.0)
            if F32:  # fp32 means fp32: no tf32 rounding of the operands
                acc += tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(h, tl.trans(w))
        return acc  # (BM, BV) fp32 logits of this tile

    @triton.jit
    def _fwd_kernel(H, W, TGT, LSE, TLOGIT, AMAX, N, V, D, s_h, s_w,
                    BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, F32: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        r_ok = rows < N
        tgt = tl.load(TGT + rows, mask=r_ok, other=-1)
        m = tl.full([BM], float("-inf"), tl.float32)
        s = tl.zeros([BM], tl.float32)
        amax = tl.zeros([BM], tl.int32)
        t_logit = tl.zeros([BM], tl.float32)
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)
            c_ok = cols < V
            logits = _logit_tile(H, W, rows, cols, r_ok, c_ok, D, s_h, s_w, BM, BV, BK, F32)
            logits = tl.where(c_ok[None, :], logits, float("-inf"))
            cmax = tl.max(logits, axis=1)
            carg = tl.argmax(logits, axis=1, tie_break_left=True)
            m_new = tl.maximum(m, cmax)
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
            amax = tl.where(cmax > m, carg + v0, amax)  # strict: ties keep the earlier index
            m = m_new
            t_logit += tl.sum(tl.where(cols[None, :] == tgt[:, None], logits, 0.0), axis=1)
        tl.store(LSE + rows, m + tl.log(s), mask=r_ok)
        tl.store(TLOGIT + rows, t_logit, mask=r_ok)
        tl.store(AMAX + rows, amax, mask=r_ok)

    @torch.library.triton_op("anyloom::linear_lse_fwd", mutates_args=())
    def _lse_fwd(h: Tensor, w: Tensor, targets: Tensor, chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
        n, d = h.shape
        v = w.shape[0]
        bm, bv, bk, warps = _blocks()
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        t_logit = torch.empty(n, dtype=torch.float32, device=h.device)
        amax = torch.empty(n, dtype=torch.int32, device=h.device)
        torch.library.wrap_triton(_fwd_kernel)[(triton.cdiv(n, bm),)](
            h, w, targets, lse, t_logit, amax, n, v, d, h.stride(0), w.stride(0),
            BM=bm, BV=bv, BK=bk, F32=INTERPRET or h.dtype == torch.float32, num_warps=warps,
        )
        return lse, t_logit, amax

    @_lse_fwd.register_fake
    def _(h, w, targets, chunk_size):
        n = h.shape[0]
        f = h.new_empty(n, dtype=torch.float32)
        return f, torch.empty_like(f), h.new_empty(n, dtype=torch.int32)

    def _setup_context(ctx, inputs, output):
        h, w, targets, chunk_size = inputs
        ctx.save_for_backward(h, w, targets, output[0])
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(output[2])

    def _backward(ctx, g_lse, g_tgt, _g_amax):
        h, w, targets, lse = ctx.saved_tensors
        dh, dw = _chunked_backward(h, w, targets, lse, g_lse, g_tgt, ctx.chunk_size)
        return dh, dw, None, None

    _lse_fwd.register_autograd(_backward, setup_context=_setup_context)
    register_bf16_autocast("anyloom::linear_lse_fwd")
