"""Linear + log-sum-exp over a large vocabulary without materialising the (N, V) fp32 logits.

Axis legend: N tokens (batch and time flattened), D model dim, V vocabulary, C a vocabulary chunk.

``linear_lse(h, w, targets)`` returns, per token, the log-sum-exp of ``h @ w.T``, the logit of the target and
the argmax. Cross-entropy is ``lse - target_logit`` and the z-loss is ``lse ** 2``, so the caller combines them
in plain PyTorch and autograd hands this op two gradients, d/dlse and d/dtarget_logit, from which the backward
rebuilds d/dlogits = softmax * g_lse + onehot(target) * g_tgt one chunk at a time.

Backends (same API, same results):

- ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``): one program per block of tokens walks the vocabulary in
  blocks with an online log-sum-exp (forward); the backward recomputes each (tokens x vocab) tile and adds its
  contributions to dh and dw with atomics. Registered as the custom op ``anyloom::linear_lse``.
- ``torch``: the same algorithm as an autograd Function over vocabulary chunks of ``chunk_size`` (CPU training
  uses this: peak extra memory is N x chunk_size fp32 instead of N x V).
- ``naive``: full logits + logsumexp: the reference the tests compare against.
- ``auto``: triton where it can run, else torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

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
        from anyloom.transformer.kernels.fused_ce_triton import triton_linear_lse

        lse, tgt, amax = triton_linear_lse(h, w, targets)
        return LseOutput(lse, tgt, amax)
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
        c = ctx.chunk_size
        g_lse = torch.zeros_like(lse) if g_lse is None else g_lse.float()
        g_tgt = torch.zeros_like(lse) if g_tgt is None else g_tgt.float()
        dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        dw = torch.empty(w.shape, dtype=torch.float32, device=w.device)
        rows = torch.arange(h.shape[0], device=h.device)
        for c0 in range(0, w.shape[0], c):
            wc = w[c0 : c0 + c]
            dlogits = torch.exp((h @ wc.t()).float() - lse[:, None]) * g_lse[:, None]  # (N, C)
            in_chunk = (targets >= c0) & (targets < c0 + wc.shape[0])
            dlogits[rows[in_chunk], targets[in_chunk] - c0] += g_tgt[in_chunk]
            dlogits = dlogits.to(h.dtype)
            dh += (dlogits @ wc).float()
            dw[c0 : c0 + c] = (dlogits.t() @ h).float()
        return dh.to(h.dtype), dw.to(w.dtype), None, None
