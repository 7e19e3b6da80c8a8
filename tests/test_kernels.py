"""Triton kernels vs their PyTorch fallbacks (values and gradients), run in the Triton interpreter on CPU.

TRITON_INTERPRET=1 must be set before triton is imported, and setting it for the whole test session would
change what every other test imports. So this module runs its checks once in a child process (this same file
run as a script with the variable set); each test asserts on one of the child's measured errors. Shapes are
tiny (the interpreter runs a B1 H2 T128 D32 attention forward in ~90 ms) but cover odd lengths, several
block rows, random packed-document layouts, GQA, the KV-cache offset, and a whole model step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TOL = 2e-5  # fp32 kernels vs fp32 PyTorch: both accumulate in fp32, only the summation order differs


def _random_docs(b: int, t: int, n_cuts: int, gen):
    import torch

    rows = []
    for _ in range(b):
        cuts = torch.randint(1, t, (n_cuts,), generator=gen)
        doc = torch.zeros(t, dtype=torch.long)
        for c in cuts.tolist():
            doc[c:] += 1
        rows.append(doc)
    return torch.stack(rows)  # (B, T), non-decreasing like packed documents


def _max_err(a, b) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def _child() -> dict[str, float]:
    import torch

    torch.set_num_threads(2)
    from anyloom.transformer.kernels.flash_attention import flash_attention, flash_attention_reference
    from anyloom.transformer.kernels.fused_ce import linear_lse
    from anyloom.transformer.kernels.rmsnorm import rms_norm, rms_norm_reference

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    errors: dict[str, float] = {}

    # attention: (B, Hq, Hk, T, D, cuts): GQA 2:1 with an odd length and padding of the head dim; MHA with
    # many short documents (most key blocks skipped); one document only (no skipping).
    for name, (b, hq, hk, t, d, cuts) in {
        "gqa_odd": (2, 4, 2, 37, 24, 3),
        "many_docs": (1, 2, 2, 45, 16, 8),
        "one_doc": (1, 2, 1, 33, 16, 0),
    }.items():
        q = torch.randn(b, hq, t, d, requires_grad=True)
        k = torch.randn(b, hk, t, d, requires_grad=True)
        v = torch.randn(b, hk, t, d, requires_grad=True)
        doc = _random_docs(b, t, cuts, gen)
        out = flash_attention(q, k, v, doc, doc)
        ref = flash_attention_reference(q, k, v, doc, doc)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), g)
        ref_grads = torch.autograd.grad(ref, (q, k, v), g)
        errors[f"attn_{name}_out"] = _max_err(out, ref)
        for label, a, r in zip("qkv", grads, ref_grads):
            errors[f"attn_{name}_d{label}"] = _max_err(a, r)

    # doc ids in no order (not how packing lays them out): the block bounds must still never skip a visible key
    q, k, v = (torch.randn(1, 2, 50, 16, requires_grad=True) for _ in range(3))
    doc = torch.randint(0, 3, (1, 50), generator=gen)
    out, ref = flash_attention(q, k, v, doc, doc), flash_attention_reference(q, k, v, doc, doc)
    g = torch.randn_like(out)
    errors["attn_unsorted_out"] = _max_err(out, ref)
    errors["attn_unsorted_grads"] = max(_max_err(a, r) for a, r in zip(
        torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)))

    # under bf16 autocast the triton backend casts like SDPA is cast (QK-norm's fp32 weight leaves q, k in fp32;
    # run as fp32 they took the slow fp32 kernel path: 8x slower training on an H200)
    from anyloom.transformer.attention import attention

    q, k = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16)
    v = torch.randn(1, 2, 40, 16).bfloat16()
    doc = _random_docs(1, 40, 2, gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, doc, backend="triton")
        ref = attention(q, k, v.float(), doc, backend="sdpa")
    errors["attn_autocast_not_bf16"] = float(out.dtype != torch.bfloat16)
    errors["attn_autocast_out"] = _max_err(out, ref)

    # KV-cache decoding: 3 new queries after a cached prefix; row 1 is left-padded (pads have doc id -1)
    s, t = 21, 3
    q, k, v = torch.randn(2, 4, t, 16), torch.randn(2, 2, s, 16), torch.randn(2, 2, s, 16)
    kdoc = torch.zeros(2, s, dtype=torch.long)
    kdoc[1, :5] = -1
    errors["attn_cache_offset_out"] = _max_err(
        flash_attention(q, k, v, kdoc[:, s - t :], kdoc, q_start=s - t),
        flash_attention_reference(q, k, v, kdoc[:, s - t :], kdoc, q_start=s - t),
    )

    # RMSNorm: odd row count and a non-power-of-two width
    x = torch.randn(3, 7, 48, requires_grad=True)
    w = (1 + 0.3 * torch.randn(48)).requires_grad_()
    y, r = rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5)
    g = torch.randn_like(y)
    (dx, dw), (rdx, rdw) = torch.autograd.grad(y, (x, w), g), torch.autograd.grad(r, (x, w), g)
    errors.update(rmsnorm_out=_max_err(y, r), rmsnorm_dx=_max_err(dx, rdx), rmsnorm_dw=_max_err(dw, rdw))

    # fused linear + log-sum-exp: vocabulary not a multiple of the block, ties impossible (random floats)
    n, d, vocab = 37, 40, 101
    h = torch.randn(n, d, requires_grad=True)
    wv = torch.randn(vocab, d, requires_grad=True)
    tgt = torch.randint(0, vocab, (n,))
    results = {}
    for backend in ("triton", "naive"):
        o = linear_lse(h, wv, tgt, backend=backend)
        loss = (o.lse - o.target_logit).mean() + 0.1 * o.lse.pow(2).mean()  # CE + z-loss
        results[backend] = (o, torch.autograd.grad(loss, (h, wv)))
    (o, (dh, dwv)), (ro, (rdh, rdwv)) = results["triton"], results["naive"]
    errors.update(
        ce_lse=_max_err(o.lse, ro.lse),
        ce_target_logit=_max_err(o.target_logit, ro.target_logit),
        ce_argmax_mismatches=float((o.argmax != ro.argmax).sum()),
        ce_dh=_max_err(dh, rdh),
        ce_dw=_max_err(dwv, rdwv),
    )

    # a whole model step: triton attention + fused RMSNorm + triton CE vs sdpa + PyTorch norm + naive CE
    from dataclasses import replace

    from anyloom.transformer.model import ModelConfig, Transformer

    base = ModelConfig(vocab_size=67, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64,
                       attention="sdpa", fused_ce=False, fused_rmsnorm=False, z_loss_weight=0.1)
    fused_cfg = replace(base, attention="triton", fused_ce=True, fused_rmsnorm=True)
    ref_model = Transformer(base)
    fused_model = Transformer(fused_cfg)
    fused_model.load_state_dict(ref_model.state_dict())
    tokens = torch.randint(0, 67, (2, 19), generator=gen)
    doc = _random_docs(2, 19, 2, gen)
    pos = torch.stack([torch.cat([torch.arange(int((row == i).sum())) for i in row.unique()]) for row in doc])
    mask = torch.rand(2, 19, generator=gen) > 0.2
    losses = {}
    for label, model in (("fused", fused_model), ("ref", ref_model)):
        out = model.loss(model(tokens, doc, pos), tokens.roll(-1, 1), mask)
        out.loss.backward()
        losses[label] = out
    errors["model_loss"] = abs(float(losses["fused"].loss - losses["ref"].loss))
    errors["model_token_loss"] = _max_err(losses["fused"].token_loss, losses["ref"].token_loss)
    errors["model_grads"] = max(
        _max_err(a.grad, b.grad) for a, b in zip(fused_model.parameters(), ref_model.parameters())
    )
    return errors


@pytest.fixture(scope="module")
def kernel_errors() -> dict[str, float]:
    pytest.importorskip("triton")  # an optional dependency; everything else falls back to PyTorch without it
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"interpreter child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


ATTENTION = [f"attn_{case}_{part}" for case in ("gqa_odd", "many_docs", "one_doc")
             for part in ("out", "dq", "dk", "dv")]


@pytest.mark.parametrize("name", ATTENTION + ["attn_cache_offset_out", "attn_unsorted_out", "attn_unsorted_grads",
                                  "attn_autocast_not_bf16"])
def test_flash_attention_matches_reference(kernel_errors, name):
    assert kernel_errors[name] < TOL, f"{name}: max abs error {kernel_errors[name]:.3g}"


def test_flash_attention_under_autocast_matches_bf16_sdpa(kernel_errors):
    # both round q, k, v to bf16 (ours in the cast, SDPA through autocast); outputs are bf16 (~3 digits)
    assert kernel_errors["attn_autocast_out"] < 2e-2, f"max abs error {kernel_errors['attn_autocast_out']:.3g}"


@pytest.mark.parametrize("name", ["rmsnorm_out", "rmsnorm_dx", "rmsnorm_dw"])
def test_fused_rmsnorm_matches_reference(kernel_errors, name):
    assert kernel_errors[name] < TOL, f"{name}: max abs error {kernel_errors[name]:.3g}"


@pytest.mark.parametrize("name", ["ce_lse", "ce_target_logit", "ce_dh", "ce_dw"])
def test_fused_ce_matches_naive(kernel_errors, name):
    assert kernel_errors[name] < TOL, f"{name}: max abs error {kernel_errors[name]:.3g}"


def test_fused_ce_argmax_matches_naive(kernel_errors):
    assert kernel_errors["ce_argmax_mismatches"] == 0


@pytest.mark.parametrize("name", ["model_loss", "model_token_loss", "model_grads"])
def test_model_with_all_kernels_matches_reference(kernel_errors, name):
    assert kernel_errors[name] < 1e-4, f"{name}: max abs error {kernel_errors[name]:.3g}"


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (tests/test_kernels.py spawns this itself)")
    print(json.dumps(_child()))
