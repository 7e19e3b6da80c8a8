"""Fused RMSNorm in Triton, forward and backward: y = x / sqrt(mean(x^2) + eps) * w over the last dim.

Axis legend: N rows (all leading dims flattened), D normalised dim.

Forward: one program per row block computes the row's inverse RMS in fp32, writes y and keeps rstd (N,) for the
backward. Backward: with x̂ = x * rstd and g = dy * w, dx = rstd * (g - x̂ * mean(g * x̂)); dw = sum over rows of
dy * x̂, accumulated per program into a (programs, D) fp32 buffer and summed in PyTorch (no atomics).

Registered as torch custom ops ``anyloom::rms_norm_fwd`` / ``anyloom::rms_norm_bwd`` with fake implementations
and autograd. ``rms_norm_reference`` is the PyTorch fallback with the same API (and the same numerics as
``anyloom.transformer.model.RMSNorm``: statistics in fp32, normalised x cast back before the weight).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ROWS = 4  # rows per program: enough work per program, small enough for wide rows


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """PyTorch RMSNorm with the same API as :func:`rms_norm`."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


if triton is not None:

    @triton.jit
    def _fwd_kernel(X, W, Y, RSTD, N, D, EPS: tl.constexpr, ROWS: tl.constexpr, BD: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BD)
        ok = (rows[:, None] < N) & (cols[None, :] < D)
        x = tl.load(X + rows[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + EPS)  # EPS constexpr: fp32 math (a float arg can be fp64)
        y = x * rstd[:, None] * w[None, :]
        tl.store(Y + rows[:, None] * D + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)
        tl.store(RSTD + rows, rstd, mask=rows < N)

    @triton.jit
    def _bwd_kernel(DY, X, W, RSTD, DX, DW_PART, N, D, ROWS: tl.constexpr, BD: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BD)
        ok = (rows[:, None] < N) & (cols[None, :] < D)
        x = tl.load(X + rows[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < N, other=0.0)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / D)[:, None])
        tl.store(DX + rows[:, None] * D + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)
        tl.store(DW_PART + pid * D + cols, tl.sum(dy * xhat, axis=0), mask=cols < D)

    @torch.library.triton_op("anyloom::rms_norm_fwd", mutates_args=())
    def _rms_fwd(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        n, d = x.shape
        y = torch.empty_like(x)
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
        torch.library.wrap_triton(_fwd_kernel)[(triton.cdiv(n, ROWS),)](
            x, weight, y, rstd, n, d, EPS=eps, ROWS=ROWS, BD=triton.next_power_of_2(d)
        )
        return y, rstd

    @_rms_fwd.register_fake
    def _(x, weight, eps):
        return torch.empty_like(x), x.new_empty(x.shape[:1], dtype=torch.float32)

    @torch.library.triton_op("anyloom::rms_norm_bwd", mutates_args=())
    def _rms_bwd(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
        n, d = x.shape
        programs = triton.cdiv(n, ROWS)
        dx = torch.empty_like(x)
        dw_part = torch.empty((programs, d), dtype=torch.float32, device=x.device)
        torch.library.wrap_triton(_bwd_kernel)[(programs,)](
            dy, x, weight, rstd, dx, dw_part, n, d, ROWS=ROWS, BD=triton.next_power_of_2(d)
        )
        return dx, dw_part.sum(0).to(weight.dtype)

    @_rms_bwd.register_fake
    def _(dy, x, weight, rstd):
        return torch.empty_like(x), torch.empty_like(weight)

    def _setup_context(ctx, inputs, output):
        x, weight, _eps = inputs
        ctx.save_for_backward(x, weight, output[1])

    def _backward(ctx, dy, _drstd):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_bwd(dy.contiguous(), x, weight, rstd)
        return dx, dw, None

    _rms_fwd.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim of x (..., D) with weight (D,); Triton on CUDA or under TRITON_INTERPRET=1."""
    if triton is None:
        raise ImportError("fused_rmsnorm needs the triton package; set model.fused_rmsnorm=false")
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("fused_rmsnorm runs on CUDA (or on CPU with TRITON_INTERPRET=1 set before import); "
                           "set model.fused_rmsnorm=false on this device")
    shape = x.shape
    y, _ = _rms_fwd(x.reshape(-1, shape[-1]).contiguous(), weight.contiguous(), float(eps))  # (N, D)
    return y.view(shape)
