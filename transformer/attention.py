"""One attention function, several backends, one mask rule.

Axis legend: B batch, Hq query heads, Hk key/value heads (GQA: Hq = G * Hk), Tq query length, Tk key length,
D head dim.

The mask rule every backend implements:

    query i (sitting at key index ``q_start + i``) may attend key j  iff
        q_doc[b, i] == k_doc[b, j]                       (never across packed documents)
        and (j <= q_start + i                            (causal ...)
             or (span_q[b, i] == span_k[b, j] > 0))      (... except inside one bidirectional span, optional)

``q_start`` is non-zero only for KV-cache decoding, where keys are the cached prefix plus the new tokens. It may
be a 0-d int64 tensor (a compiled decode step): then the keys are the whole static cache, the rule is built from
tensors only, and nothing checks its value on the host (the ``sdpa`` and ``flex`` backends take it).
Every query can see at least itself (its own key carries its own doc id), so no row is fully masked.

Backends:

- ``triton``: ours (``anyloom.transformer.kernels.flash_attention``); skips key blocks whose document range
  cannot overlap the query block. Runs on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (slow; tests only).
  No bidirectional spans.
- ``xformers``: ``memory_efficient_attention`` with ``BlockDiagonalCausalMask.from_seqlens``; CUDA only
  (xformers has no CPU kernels) and needs documents to be contiguous runs of equal doc ids; no spans, no cache.
- ``flex``: FlexAttention with a block mask built from the rule above. On CPU it has no backward (torch refuses),
  so use it there for inference only.
- ``sdpa``: ``F.scaled_dot_product_attention``; ``is_causal`` when the rule reduces to plain causal, otherwise
  a dense boolean (B, 1, Tq, Tk) mask.
- ``auto``: CUDA -> triton (sdpa when spans are given); CPU -> sdpa (training and inference: the flash SDPA
  kernel on CPU is fast and FlexAttention would need a compile per shape and cannot train).

``force_backend(name)`` overrides every call inside a ``with`` block (tests use it to compare backends).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Backend = Literal["auto", "triton", "xformers", "flex", "sdpa"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "xformers", "flex", "sdpa")

_forced: str | None = None


@contextlib.contextmanager
def force_backend(name: Backend) -> Iterator[None]:
    """Inside this block every ``attention`` call uses ``name`` whatever its caller asked for."""
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {', '.join(BACKENDS)}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def triton_available(device: torch.device) -> bool:
    """Triton kernels run on CUDA, or on CPU in the interpreter (``TRITON_INTERPRET=1``, set before import)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: Backend, device: torch.device, has_spans: bool) -> str:
    """The backend a call will use: the forced one, else ``backend`` with ``auto`` resolved for ``device``."""
    name = _forced or backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name != "auto":
        return name
    if device.type == "cuda" and not has_spans and triton_available(device):
        return "triton"
    return "sdpa"


def build_mask(
    q_doc: Tensor,
    k_doc: Tensor,
    q_start: int | Tensor = 0,
    q_span: Tensor | None = None,
    k_span: Tensor | None = None,
) -> Tensor:
    """The dense boolean mask of the rule in the module docstring: (B, Tq, Tk), True = may attend."""
    tq, tk = q_doc.shape[1], k_doc.shape[1]
    qi = torch.arange(tq, device=q_doc.device)[:, None] + q_start
    kj = torch.arange(tk, device=q_doc.device)[None, :]
    allowed = (kj <= qi)[None]  # (1, Tq, Tk)
    if q_span is not None:
        assert k_span is not None
        same_span = (q_span[:, :, None] == k_span[:, None, :]) & (q_span[:, :, None] > 0)
        allowed = allowed | same_span
    return allowed & (q_doc[:, :, None] == k_doc[:, None, :])  # (B, Tq, Tk)


LOW_PRECISION = {torch.bfloat16, torch.float16}


def attends_in(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype attention computes in for keys and values of ``dtype`` on ``device`` (``_sdpa``): fp32 for low
    precision on the CPU, ``dtype`` elsewhere. A KV cache kept in it is read as it is, not cast at every step."""
    return torch.float32 if device.type == "cpu" and dtype in LOW_PRECISION else dtype


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_doc: Tensor | None = None,
    k_doc: Tensor | None = None,
    *,
    q_start: int | Tensor = 0,
    q_span: Tensor | None = None,
    k_span: Tensor | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """Masked multi-head attention (see the module docstring for the rule and the backends).

    q: (B, Hq, Tq, D); k, v: (B, Hk, Tk, D) with Hq a multiple of Hk (GQA); q_doc (B, Tq) and k_doc (B, Tk)
    integer document ids (None = one document; k_doc defaults to q_doc); q_span/k_span optional (B, Tq)/(B, Tk)
    ids of bidirectional spans (0 = not in a span). Returns (B, Hq, Tq, D) in q's dtype.
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention expects q (B,Hq,Tq,D) and k, v (B,Hk,Tk,D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} must be a multiple of key/value heads {k.shape[1]}")
    static = isinstance(q_start, Tensor)  # a tensor start: keys are the whole static cache (module docstring)
    if not static and q_start + q.shape[2] > k.shape[2]:
        raise ValueError(f"q_start {q_start} + Tq {q.shape[2]} exceeds Tk {k.shape[2]}")
    if (q_span is None) != (k_span is None):
        if k_span is None and q_span is not None and not static and q_start == 0 and q.shape[2] == k.shape[2]:
            k_span = q_span
        else:
            raise ValueError("give both q_span and k_span (or neither)")
    if k_doc is None:
        k_doc = q_doc
    if q_doc is not None and k_doc is not None and k_doc.shape[1] != k.shape[2]:
        raise ValueError(f"k_doc has length {k_doc.shape[1]} but there are {k.shape[2]} keys")
    # auto never picks triton for a tensor q_start: the kernel takes the start as a launch constant
    name = resolve_backend(backend, q.device, q_span is not None or static)
    if static and name in ("triton", "xformers"):
        raise NotImplementedError(f"attention backend {name!r} needs an int q_start; a tensor one (static-cache "
                                  "decoding) runs on 'sdpa' or 'flex'")
    if name == "sdpa":
        return _sdpa(q, k, v, q_doc, k_doc, q_start, q_span, k_span)
    if name == "flex":
        return _flex(q, k, v, q_doc, k_doc, q_start, q_span, k_span)
    if name == "xformers":
        return _xformers(q, k, v, q_doc, k_doc, q_start, q_span)
    if name == "triton":
        if q_span is not None:
            raise NotImplementedError("the triton attention kernel has no bidirectional spans; use sdpa or flex")
        from anyloom.transformer.kernels.flash_attention import flash_attention

        b, _, tq, _ = q.shape
        if q_doc is None:
            q_doc = torch.zeros(b, tq, dtype=torch.int32, device=q.device)
            k_doc = torch.zeros(b, k.shape[2], dtype=torch.int32, device=q.device)
        return flash_attention(q, k, v, q_doc, k_doc, q_start=q_start)
    raise AssertionError(name)


def _sdpa(q, k, v, q_doc, k_doc, q_start, q_span, k_span) -> Tensor:
    if q.device.type == "cpu" and (torch.is_autocast_enabled("cpu") or LOW_PRECISION & {q.dtype, k.dtype, v.dtype}):
        # PyTorch's CPU flash-attention kernel is slower in bf16 than in fp32 (its backward ~2.4x, measured with
        # bf16 autocast on an AMX CPU: docs/BENCHMARKS.md), so low precision attends in fp32 there (``attends_in``)
        with torch.autocast("cpu", enabled=False):
            return _sdpa(q.float(), k.float(), v.float(), q_doc, k_doc, q_start, q_span, k_span).to(q.dtype)
    gqa = q.shape[1] != k.shape[1]
    if q_doc is None and q_span is None and isinstance(q_start, int) and q_start == 0 and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    b, tq, tk = q.shape[0], q.shape[2], k.shape[2]
    if q_doc is None:
        q_doc = torch.zeros(b, tq, dtype=torch.long, device=q.device)
        k_doc = torch.zeros(b, tk, dtype=torch.long, device=q.device)
    mask = build_mask(q_doc, k_doc, q_start, q_span, k_span)[:, None]  # (B, 1, Tq, Tk)
    if tq == 1 and isinstance(q_start, Tensor) and q.device.type == "cpu":
        return _one_query(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def _one_query(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """One query per row over a whole static cache (a compiled CPU decode step) as products and a masked softmax,
    which inductor fuses: the CPU flash kernel's per-call setup cost more than its work here (0.2 ms a call at 16
    rows and 128 slots, docs/BENCHMARKS.md). GQA groups the query heads of one key head, without copying keys."""
    b, hq, _, d = q.shape
    hk = k.shape[1]
    scores = q.reshape(b, hk, hq // hk, d) @ k.transpose(-1, -2) * d**-0.5  # (B, Hk, G, Tk)
    scores = scores.masked_fill(~mask, float("-inf"))  # mask (B, 1, 1, Tk)
    return (scores.softmax(-1) @ v).reshape(b, hq, 1, d)


# FlexAttention is only fast compiled; tests switch this off to check the mask logic in eager mode, since a
# cold compile on 2 busy CPU cores can take minutes.
FLEX_COMPILE = True
_flex_compiled = None


def _flex(q, k, v, q_doc, k_doc, q_start, q_span, k_span) -> Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _flex_compiled
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise NotImplementedError("FlexAttention has no backward on CPU; train with backend 'sdpa' there")
    if FLEX_COMPILE and _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    run = _flex_compiled if FLEX_COMPILE else flex_attention
    b, tq, tk = q.shape[0], q.shape[2], k.shape[2]
    if q_doc is None:
        q_doc = torch.zeros(b, tq, dtype=torch.long, device=q.device)
        k_doc = torch.zeros(b, tk, dtype=torch.long, device=q.device)

    def mask_mod(bi, hi, qi, kj):
        allowed = kj <= qi + q_start
        if q_span is not None:
            allowed = allowed | ((q_span[bi, qi] == k_span[bi, kj]) & (q_span[bi, qi] > 0))
        return allowed & (q_doc[bi, qi] == k_doc[bi, kj])

    block_mask = create_block_mask(mask_mod, b, None, tq, tk, device=q.device)
    return run(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def _xformers(q, k, v, q_doc, k_doc, q_start, q_span) -> Tensor:
    if q.device.type != "cuda":
        raise NotImplementedError("xformers has no CPU attention kernels; use backend 'sdpa' or 'auto' on CPU")
    if q_span is not None or q_start != 0 or q.shape[2] != k.shape[2]:
        raise NotImplementedError("the xformers backend handles packed training/prefill only (no spans, no cache)")
    try:
        from xformers.ops import fmha
    except ImportError as e:
        raise ImportError("attention backend 'xformers' needs the xformers package (pip install xformers)") from e
    from einops import rearrange

    b, hq, t, d = q.shape
    hk = k.shape[1]
    if q_doc is None:
        seqlens = [t] * b
    else:
        # Documents must be contiguous runs; each run becomes one block of the block-diagonal mask.
        seqlens = []
        for row in q_doc.tolist():
            start = 0
            for i in range(1, t + 1):
                if i == t or row[i] != row[start]:
                    seqlens.append(i - start)
                    start = i
    bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(seqlens)
    qx = rearrange(q, "b (k g) t d -> 1 (b t) k g d", k=hk)  # (1, B*T, Hk, G, D)
    kx = rearrange(k, "b k t d -> 1 (b t) k 1 d").expand(-1, -1, -1, hq // hk, -1)
    vx = rearrange(v, "b k t d -> 1 (b t) k 1 d").expand(-1, -1, -1, hq // hk, -1)
    out = fmha.memory_efficient_attention(qx, kx, vx, attn_bias=bias)
    return rearrange(out, "1 (b t) k g d -> b (k g) t d", b=b)
