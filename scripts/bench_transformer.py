"""Transformer benchmarks: fused-CE memory, LM training throughput vs HF Llama, and (on CUDA) attention TFLOP/s.

    .venv/bin/python scripts/bench_transformer.py            # CPU parts (+ GPU part when CUDA is available)
    .venv/bin/python scripts/bench_transformer.py --only ce  # one part: ce | train | attention

CPU:
- ``ce``: peak resident memory of loss forward+backward at vocabulary 65,536 (4,096 tokens, dim 256, fp32):
  naive (full logits + F.cross_entropy + z-loss) vs our chunked fused path. Each variant runs in a fresh
  child process; the number is the peak RSS (ru_maxrss) minus the RSS just before the loss (inputs and
  gradient buffers for both variants are allocated before that point, so only the loss's own memory counts).
- ``train``: training tokens/s (forward, loss, backward, AdamW step) of our Transformer vs HF
  ``LlamaForCausalLM`` of the identical architecture (4 layers, dim 256, 4 heads, FFN 704, vocab 4,096, no QK-norm,
  batch 8 x 512), in the same process, steps interleaved so all variants see the same machine load. Ours: eager;
  the model compiled with the chunked CE eager (the headline ``train_tokens_per_s_vs_hf_llama``); forward and a
  plain CE compiled together; each block and ``model.loss`` compiled (``parallel.compile`` + ``compile_loss``).
  HF runs eager. Compile time is reported separately, not in the rates. ``--precision bf16`` runs every variant,
  HF's included, under CPU bf16 autocast (written as ``train_bf16``).
GPU (CUDA only; needs just torch + triton): ``attention``: our Triton kernel vs SDPA (and xformers when it imports)
forward and forward+backward TFLOP/s in bf16, head dim 64 and 128, sequence 1k..16k, packed documents (random
lengths, mean 1/4 of the row; also FlexAttention with the same document mask at 4k and 16k) and one causal
document; also the max error vs an fp32 reference. FLOPs count only
visible (query, key) pairs: 4*D per pair forward, 2.5x that for the backward (FlashAttention's convention).

Writes runs/bench/transformer.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

OUT = Path("runs/bench/transformer.json")


# ---------------------------------------------------------------- fused CE memory (CPU, child processes)

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ce_child(variant: str, n: int, d: int, vocab: int, chunk: int, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    from anyloom.transformer.kernels.fused_ce import linear_lse

    g = torch.Generator().manual_seed(0)
    h = (torch.randn(n, d, generator=g) * 0.5).requires_grad_()
    w = (torch.randn(vocab, d, generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=g)
    h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)  # gradient buffers exist in both variants
    before = _rss_bytes()
    t0 = time.perf_counter()
    if variant == "naive":
        logits = (h @ w.t()).float()  # (N, V)
        loss = torch.nn.functional.cross_entropy(logits, targets) + 1e-4 * torch.logsumexp(logits, -1).pow(2).mean()
    else:
        out = linear_lse(h, w, targets, chunk_size=chunk, backend="torch")
        loss = (out.lse - out.target_logit).mean() + 1e-4 * out.lse.pow(2).mean()
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_bytes": peak - before, "seconds": seconds, "loss": float(loss)}


def bench_ce(n: int = 4096, d: int = 256, vocab: int = 65536, chunk: int = 4096, threads: int = 2) -> dict:
    results = {}
    for variant in ("naive", "fused"):
        cmd = [sys.executable, __file__, "--ce-child", variant, str(n), str(d), str(vocab), str(chunk), str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    if abs(results["naive"]["loss"] - results["fused"]["loss"]) > 1e-3:
        raise AssertionError(f"fused and naive losses differ: {results}")
    return {
        "tokens": n, "dim": d, "vocab": vocab, "chunk": chunk,
        "naive_peak_mib": results["naive"]["peak_bytes"] / 2**20,
        "fused_peak_mib": results["fused"]["peak_bytes"] / 2**20,
        "naive_seconds": results["naive"]["seconds"],
        "fused_seconds": results["fused"]["seconds"],
        "fused_ce_peak_memory_ratio": results["naive"]["peak_bytes"] / results["fused"]["peak_bytes"],
    }


# ---------------------------------------------------------------- LM training throughput vs HF Llama (CPU)

def bench_train(steps: int = 6, warmup: int = 2, batch: int = 8, seq: int = 512, compile_ours: bool = True,
                threads: int = 2, precision: str = "fp32") -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from anyloom.progress import progress
    from anyloom.training.parallel import apply_compile, apply_compile_loss
    from anyloom.transformer.model import ModelConfig, Transformer

    torch.set_num_threads(threads)
    cfg = ModelConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=704, max_seq_len=seq,
                      qk_norm=False, attention="sdpa", fused_ce=True, ce_chunk_size=4096)
    hf_cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    ours = Transformer(cfg)
    hf = LlamaForCausalLM(hf_cfg)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 4096, (batch, seq + 1), generator=g)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = torch.ones_like(targets, dtype=torch.bool)

    def make_step(model, forward):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step() -> float:
            # precision bf16: every variant, HF's included, under CPU bf16 autocast (fp32 weights, bf16 matmuls)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = forward()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())
        return step

    def ours_forward(model):
        return lambda: model.loss(model(inputs), targets, mask).loss

    runners = {
        "ours_eager": make_step(ours, ours_forward(ours)),
        "hf_llama": make_step(hf, lambda: hf(input_ids=inputs, labels=tokens[:, :-1]).loss),
    }
    compile_seconds = {}
    if compile_ours:
        # two compiled variants: (a) the model compiled, the chunked CE eager (default fused_ce=True);
        # (b) forward and a plain CE compiled together (inductor fuses the CE; fine at this small vocabulary,
        # where the chunked CE's backward recompute of the logits costs more than the memory it saves)
        torch.manual_seed(0)
        ours_a = Transformer(cfg)
        compiled_a = torch.compile(ours_a)
        runners["ours_compiled"] = make_step(ours_a, lambda: ours_a.loss(compiled_a(inputs), targets, mask).loss)
        torch.manual_seed(0)
        ours_b = Transformer(replace(cfg, fused_ce=False))
        runners["ours_compiled_plain_ce"] = make_step(
            ours_b, torch.compile(lambda: ours_b.loss(ours_b(inputs), targets, mask).loss))
        # (c) as a recipe's parallel.compile + compile_loss do it: each block compiled, and model.loss
        torch.manual_seed(0)
        ours_c = Transformer(cfg)
        apply_compile(ours_c)
        apply_compile_loss(ours_c)
        runners["ours_compiled_blocks_and_loss"] = make_step(ours_c, ours_forward(ours_c))
        for name in ("ours_compiled", "ours_compiled_plain_ce", "ours_compiled_blocks_and_loss"):
            t0 = time.perf_counter()
            runners[name]()  # cold compile (forward and backward graphs)
            compile_seconds[name] = time.perf_counter() - t0
    for _ in range(warmup):
        for run in runners.values():
            run()
    elapsed = {name: 0.0 for name in runners}
    for _ in progress(range(steps), desc="train steps (interleaved)"):
        for name, run in runners.items():  # interleaved: every variant sees the same load
            t0 = time.perf_counter()
            run()
            elapsed[name] += time.perf_counter() - t0
    tok = batch * seq * steps
    rates = {f"{name}_tokens_per_s": tok / t for name, t in elapsed.items()}
    result = {"batch": batch, "seq": seq, "steps": steps, "precision": precision,
              "params": sum(p.numel() for p in ours.parameters()),
              "compile_seconds": compile_seconds, **rates,
              "train_tokens_per_s_vs_hf_llama_eager": rates["ours_eager_tokens_per_s"] / rates["hf_llama_tokens_per_s"]}
    for name in compile_seconds:
        result[f"{name}_vs_hf_llama"] = rates[f"{name}_tokens_per_s"] / rates["hf_llama_tokens_per_s"]
    if compile_ours:  # the headline: the default config (fused CE) with the model compiled
        result["train_tokens_per_s_vs_hf_llama"] = result["ours_compiled_vs_hf_llama"]
    return result


# ---------------------------------------------------------------- attention TFLOP/s (CUDA)

def _packed_docs(b: int, t: int, mean_len: int, gen: torch.Generator) -> torch.Tensor:
    rows = []
    for _ in range(b):
        doc, i, start = torch.empty(t, dtype=torch.int32), 0, 0
        while start < t:
            length = int(torch.randint(1, 2 * mean_len, (1,), generator=gen))
            doc[start : start + length] = i
            start += length
            i += 1
        rows.append(doc)
    return torch.stack(rows)


def _visible_pairs(doc: torch.Tensor) -> int:
    total = 0
    for row in doc:
        _, counts = torch.unique_consecutive(row, return_counts=True)
        total += int((counts * (counts + 1) // 2).sum())
    return total


def _attention_case(d: int, t: int, layout: str, gen: torch.Generator, fmha, flex_lengths=(4096, 16384)
                    ) -> list[dict]:
    import triton.testing

    from anyloom.transformer.attention import build_mask
    from anyloom.transformer.kernels.flash_attention import flash_attention

    dev = torch.device("cuda")
    heads, b = 2048 // d, max(1, 16384 // t)
    doc = _packed_docs(b, t, t // 4, gen) if layout == "packed" else torch.zeros(b, t, dtype=torch.int32)
    flops_fwd = 4 * d * _visible_pairs(doc) * heads
    lens = [int(c) for row in doc for c in torch.unique_consecutive(row, return_counts=True)[1]]
    doc = doc.to(dev)
    q, k, v = (torch.randn(b, heads, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn_like(q)

    def ours() -> torch.Tensor:
        return flash_attention(q, k, v, doc, doc)

    impls = {"triton": ours}
    if layout == "causal":
        impls["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif t <= 8192:  # packed documents need a dense (B, 1, T, T) mask in SDPA; 16k would not fit comfortably
        mask = build_mask(doc, doc)[:, None]
        impls["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if layout == "packed" and t in flex_lengths:  # FlexAttention: block-sparse like ours (compiles per shape)
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(lambda bi, hi, qi, kj: (kj <= qi) & (doc[bi, qi] == doc[bi, kj]),
                                       b, None, t, t, device=dev)
        flex = torch.compile(flex_attention, dynamic=False)
        impls["flex"] = lambda: flex(q, k, v, block_mask=block_mask)
    if fmha is not None:
        bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(lens)

        def xformers() -> torch.Tensor:
            flat = [x.transpose(1, 2).reshape(1, b * t, heads, d) for x in (q, k, v)]  # (1, B*T, H, D)
            out = fmha.memory_efficient_attention(*flat, attn_bias=bias)
            return out.reshape(b, t, heads, d).transpose(1, 2)  # (B, H, T, D)

        impls["xformers"] = xformers
    # bf16 correctness of ours vs an fp32 reference on the first 2k tokens of row 0 (bounded memory)
    n = min(t, 2048)
    qs, ks, vs, ds = q[:1, :, :n], k[:1, :, :n], v[:1, :, :n], doc[:1, :n]
    ref = torch.nn.functional.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(),
                                                           attn_mask=build_mask(ds, ds)[:, None])
    err = float((flash_attention(qs, ks, vs, ds, ds).float() - ref).abs().max())
    rows = []
    for name, fn in impls.items():
        ms_f = triton.testing.do_bench(fn)
        ms_fb = triton.testing.do_bench(lambda fn=fn: fn().backward(grad_out), grad_to_none=[q, k, v])
        rows.append({"impl": name, "head_dim": d, "seq": t, "batch": b, "heads": heads, "layout": layout,
                     "fwd_tflops": flops_fwd / ms_f / 1e9, "fwd_bwd_tflops": 3.5 * flops_fwd / ms_fb / 1e9,
                     "bf16_max_err_vs_fp32": err if name == "triton" else None})
        print(rows[-1], flush=True)
    return rows


def bench_attention() -> list[dict]:
    try:
        from xformers.ops import fmha
    except ImportError:
        fmha = None
    gen = torch.Generator().manual_seed(0)
    rows = []
    for d in (64, 128):
        for t in (1024, 2048, 4096, 8192, 16384):
            for layout in ("packed", "causal"):
                rows += _attention_case(d, t, layout, gen, fmha)
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--ce-child":
        variant, n, d, vocab, chunk, threads = sys.argv[2], *map(int, sys.argv[3:8])
        print(json.dumps(ce_child(variant, n, d, vocab, chunk, threads)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["ce", "train", "attention"], default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant of ours")
    parser.add_argument("--batch", type=int, default=8, help="rows of 512 tokens per training step")
    parser.add_argument("--ce-tokens", type=int, default=4096, help="tokens in the fused-CE memory benchmark")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the CE children too)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="train part: bf16 runs every variant, HF's included, under CPU bf16 autocast")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result: dict = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "threads": torch.get_num_threads()}
    if args.only in (None, "ce"):
        result["fused_ce"] = bench_ce(n=args.ce_tokens, threads=args.threads)
        r = result["fused_ce"]
        print(f"fused CE  V={r['vocab']} N={r['tokens']} D={r['dim']}: peak naive {r['naive_peak_mib']:.0f} MiB, "
              f"fused {r['fused_peak_mib']:.0f} MiB -> {r['fused_ce_peak_memory_ratio']:.1f}x less "
              f"(time {r['naive_seconds']:.2f}s vs {r['fused_seconds']:.2f}s)")
    if args.only in (None, "train"):
        key = "train" if args.precision == "fp32" else f"train_{args.precision}"
        result[key] = bench_train(steps=args.steps, batch=args.batch, compile_ours=not args.no_compile,
                                  threads=args.threads, precision=args.precision)
        r = result[key]
        print(f"train tokens/s ({r['params'] / 1e6:.1f}M params, {r['batch']}x{r['seq']}, {r['precision']}): "
              + ", ".join(f"{k.removesuffix('_tokens_per_s')} {v:.0f}" for k, v in r.items() if k.endswith("_per_s"))
              + f"; ours eager / HF {r['train_tokens_per_s_vs_hf_llama_eager']:.2f}x"
              + "".join(f", {n} / HF {r[n + '_vs_hf_llama']:.2f}x (compile {c:.0f}s)"
                        for n, c in r["compile_seconds"].items()))
    if args.only in (None, "attention"):
        if torch.cuda.is_available():
            result["attention"] = bench_attention()
        elif args.only == "attention":
            sys.exit("the attention benchmark needs CUDA (Triton kernels only run on CPU in the slow interpreter)")
        else:
            print("attention TFLOP/s: skipped (no CUDA device)")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(OUT.read_text()) if OUT.exists() else {}
    previous.update(result)
    OUT.write_text(json.dumps(previous, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
