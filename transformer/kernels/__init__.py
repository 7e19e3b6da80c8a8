"""Fused kernels: Triton implementations registered as torch custom ops, each next to a PyTorch fallback with
the same API. Triton is imported inside ``try`` by each module; without it the fallbacks still work."""

from __future__ import annotations

import torch


def register_bf16_autocast(op: str) -> None:
    """Under autocast, cast the custom op's floating-point inputs to bf16, as autocast casts SDPA's and F.linear's.

    Custom ops see no autocast by themselves: QK-norm's fp32 weight left q and k in fp32 under bf16 autocast, and the
    attention kernel took its slow fp32 path (8x slower training on an H200, docs/BENCHMARKS.md "On a GPU"). bf16 is
    the only mixed precision the trainer uses (training.parallel.autocast_context).
    """
    for device_type in ("cuda", "cpu"):
        torch.library.register_autocast(op, device_type, torch.bfloat16)
