"""GPU checks in one call: the card's ceilings, our kernels' bf16 correctness, attention TFLOP/s, LM training MFU.

    python scripts/gpu_check.py                      # everything (~4 min on an H100/H200)
    python scripts/gpu_check.py --only correctness   # one part (repeatable): ceilings | correctness | tune |
                                                     #   attention | ce | train | generation

Needs CUDA, torch and triton (xformers when it imports); the generation part also safetensors, einops, Pillow
and PyYAML (it loads the LM through ``generation.pipeline.load_lm``); nothing else of the project's dependencies.

- ``ceilings``: what this card really does (METHOD: measure, don't trust the datasheet): a bf16 8192^3 matmul on
  random data and a 2 GiB device-to-device copy (bytes read + written), each the median of ``do_bench``.
- ``correctness``: every Triton kernel against a float64 reference on fresh random inputs, in bf16 and fp32,
  as relative errors ||out - ref|| / ||ref||; the allocator's cache is filled with NaN before each kernel call so
  an unwritten output element shows up as NaN. Yardstick: PyTorch's own bf16 path (SDPA, the plain RMSNorm,
  ``F.linear`` + logsumexp) on the same inputs, so "ours / torch" near 1 means we round no worse than PyTorch.
  Cases: flash attention forward + backward at head dim 64 and 128, an odd length, packed documents, GQA 4:1,
  one causal document, the KV-cache offset (5 new queries after a left-padded cache); RMSNorm; fused linear +
  log-sum-exp (CE); a whole model step (all three kernels, bf16 autocast) vs the fp32 PyTorch model.
- ``tune``: block sizes / warps / stages of our attention kernels swept at T 4096; the fastest are used for the
  rest of the run (and were copied into ``flash_attention.CONFIGS``).
- ``attention``: ``scripts/bench_transformer.py``'s attention benchmark (ours vs SDPA, FlexAttention on packed
  documents, and xformers if present).
- ``ce``: fused linear + CE (Triton forward, chunked backward) vs the chunked PyTorch and naive paths: time, memory.
- ``generation``: the trained world LM (``--export``) sampling text -> image as the evaluation does (CFG 2, min-p,
  16 samples per prompt from one prefill): fp32 greedy equality of the eager and compiled decode steps, of shared
  prefill and repeated prompts, and of CUDA and CPU; images/s eager, compiled, compiled under bf16 autocast.
- ``train``: the real training loop (``train_lm``, one process, bf16 autocast) on random documents at 150M and
  1B, Triton attention vs SDPA (dense document mask), eager and per-block ``torch.compile``: tokens/s and MFU
  (6N FLOPs per token over the datasheet peak, as the loop logs it, and over the matmul ceiling measured here).

Writes runs/bench/gpu.json (and a copy under $OUT when that is set), section by section, so a run stopped
part-way keeps what it measured; prints a short table at the end.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

OUT = Path("runs/bench/gpu.json")
RESULT: dict = {}


def _save() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(RESULT, indent=2) + "\n")
    if os.environ.get("OUT"):
        shutil.copy(OUT, Path(os.environ["OUT"]) / "gpu.json")


def _bench(fn, warmup: int = 25, rep: int = 100, grad_to_none=None) -> float:
    """Median milliseconds of ``fn`` (device events; gradients of ``grad_to_none`` reset between calls)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                         return_mode="median"))


# ---------------------------------------------------------------- ceilings

def ceilings() -> dict:
    dev = torch.device("cuda")
    n = 8192
    mats = itertools.cycle([(torch.randn(n, n, device=dev, dtype=torch.bfloat16),
                             torch.randn(n, n, device=dev, dtype=torch.bfloat16))
                            for _ in range(3)])  # rotate among inputs so the cache does not flatter the number

    def mm() -> torch.Tensor:
        a, b = next(mats)
        return a @ b

    ms = _bench(mm)
    src = torch.randn(2**30, device=dev, dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    ms_copy = _bench(lambda: dst.copy_(src))
    nbytes = 2 * src.numel() * src.element_size()
    return {"matmul_bf16_8192_tflops": 2 * n**3 / ms / 1e9, "copy_tb_per_s": nbytes / ms_copy / 1e9}


# ---------------------------------------------------------------- correctness

def _poison() -> None:
    """Fill the caching allocator's free blocks with NaN so unwritten kernel outputs read as NaN."""
    free = torch.cuda.mem_get_info()[0]
    x = torch.full((min(free // 4, 2**30) // 4,), float("nan"), device="cuda")
    del x


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def _docs(b: int, t: int, n_cuts: int, gen: torch.Generator) -> torch.Tensor:
    rows = []
    for _ in range(b):
        doc = torch.zeros(t, dtype=torch.long)
        for c in torch.randint(1, t, (n_cuts,), generator=gen).tolist():
            doc[c:] += 1
        rows.append(doc)
    return torch.stack(rows).cuda()  # (B, T) non-decreasing, like packed documents (gen: a CPU generator)


def _attention_errors(dtype: torch.dtype, gen: torch.Generator, cpu_gen: torch.Generator) -> dict:
    from anyloom.transformer.kernels.flash_attention import flash_attention, flash_attention_reference

    out = {}
    cases = {  # name: (B, Hq, Hk, T, D, cuts)
        "d64_packed_gqa4_odd": (2, 8, 2, 1000, 64, 6),
        "d128_packed": (2, 4, 4, 2048, 128, 10),
        "d64_one_doc": (1, 4, 4, 1536, 64, 0),
        "d128_one_doc_gqa2_odd": (1, 4, 2, 777, 128, 0),
    }
    for name, (b, hq, hk, t, d, cuts) in cases.items():
        q = torch.randn(b, hq, t, d, device="cuda", generator=gen)
        k = torch.randn(b, hk, t, d, device="cuda", generator=gen)
        v = torch.randn(b, hk, t, d, device="cuda", generator=gen)
        g = torch.randn(b, hq, t, d, device="cuda", generator=gen)
        doc = _docs(b, t, cuts, cpu_gen)
        leaves = [x.double().requires_grad_() for x in (q, k, v)]
        ref = flash_attention_reference(*leaves, doc, doc)
        ref_grads = torch.autograd.grad(ref, leaves, g.double())
        for impl in ("triton", "torch"):
            xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
            _poison()
            o = flash_attention(*xs, doc, doc) if impl == "triton" else flash_attention_reference(*xs, doc, doc)
            _poison()
            grads = torch.autograd.grad(o, xs, g.to(dtype))
            out[f"attn_{name}_out_{impl}"] = _rel(o, ref)
            for label, a, r in zip("qkv", grads, ref_grads):
                out[f"attn_{name}_d{label}_{impl}"] = _rel(a, r)
    # KV-cache decoding: 5 new queries after a cache of 700; row 1 left-padded (doc id -1)
    s, t = 700, 5
    q = torch.randn(2, 8, t, 128, device="cuda", generator=gen)
    k, v = (torch.randn(2, 2, s, 128, device="cuda", generator=gen) for _ in range(2))
    kdoc = torch.zeros(2, s, dtype=torch.long, device="cuda")
    kdoc[1, :123] = -1
    ref = flash_attention_reference(q.double(), k.double(), v.double(), kdoc[:, s - t:], kdoc, q_start=s - t)
    for impl, fn in (("triton", flash_attention), ("torch", flash_attention_reference)):
        _poison()
        o = fn(q.to(dtype), k.to(dtype), v.to(dtype), kdoc[:, s - t:], kdoc, q_start=s - t)
        out[f"attn_cache_offset_out_{impl}"] = _rel(o, ref)
    return out


def _rmsnorm_errors(dtype: torch.dtype, gen: torch.Generator, _cpu_gen: torch.Generator) -> dict:
    from anyloom.transformer.kernels.rmsnorm import rms_norm, rms_norm_reference

    x = torch.randn(4, 999, 1024, device="cuda", generator=gen) * 3
    w = 1 + 0.3 * torch.randn(1024, device="cuda", generator=gen)
    g = torch.randn(4, 999, 1024, device="cuda", generator=gen)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    ref = rms_norm_reference(xd, wd, 1e-5)
    rdx, rdw = torch.autograd.grad(ref, (xd, wd), g.double())
    out = {}
    for impl, fn in (("triton", rms_norm), ("torch", rms_norm_reference)):
        xs, ws = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        _poison()
        y = fn(xs, ws, 1e-5)
        _poison()
        dx, dw = torch.autograd.grad(y, (xs, ws), g.to(dtype))
        out.update({f"rmsnorm_out_{impl}": _rel(y, ref), f"rmsnorm_dx_{impl}": _rel(dx, rdx),
                    f"rmsnorm_dw_{impl}": _rel(dw, rdw)})
    return out


def _ce_errors(dtype: torch.dtype, gen: torch.Generator, _cpu_gen: torch.Generator) -> dict:
    from anyloom.transformer.kernels.fused_ce import linear_lse

    n, d, vocab = 4099, 1024, 32771  # neither a multiple of any block
    h = torch.randn(n, d, device="cuda", generator=gen)
    w = torch.randn(vocab, d, device="cuda", generator=gen) / math.sqrt(d)
    tgt = torch.randint(0, vocab, (n,), device="cuda", generator=gen)

    def loss_of(o):
        return (o.lse - o.target_logit).mean() + 1e-4 * o.lse.pow(2).mean()  # CE + z-loss

    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    ref = linear_lse(hd, wd, tgt, backend="naive")
    rdh, rdw = torch.autograd.grad(loss_of(ref), (hd, wd))
    out = {}
    for impl in ("triton", "naive"):
        hs, ws = h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        _poison()
        o = linear_lse(hs, ws, tgt, backend=impl)
        _poison()
        dh, dw = torch.autograd.grad(loss_of(o), (hs, ws))
        out.update({f"ce_lse_{impl}": _rel(o.lse, ref.lse), f"ce_target_logit_{impl}": _rel(o.target_logit,
                    ref.target_logit), f"ce_dh_{impl}": _rel(dh, rdh), f"ce_dw_{impl}": _rel(dw, rdw),
                    f"ce_argmax_agree_{impl}": float((o.argmax == ref.argmax).float().mean())})
    return out


def _model_errors(gen: torch.Generator, cpu_gen: torch.Generator) -> dict:
    """All three kernels under bf16 autocast vs the fp32 PyTorch model; the plain bf16 path as the yardstick."""
    from dataclasses import replace

    from anyloom.transformer.model import ModelConfig, Transformer

    base = ModelConfig(vocab_size=4096, dim=256, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=704, max_seq_len=1024,
                       attention="sdpa", fused_ce=False, fused_rmsnorm=False, z_loss_weight=1e-4)
    torch.manual_seed(0)
    ref_model = Transformer(base).cuda()
    b, t = 4, 1000
    tokens = torch.randint(0, 4096, (b, t), device="cuda", generator=gen)
    doc = _docs(b, t, 5, cpu_gen)
    pos = torch.stack([torch.cat([torch.arange(int((row == i).sum()), device="cuda") for i in row.unique()])
                       for row in doc])
    mask = torch.rand(b, t, device="cuda", generator=gen) > 0.2
    out = {}
    results = {}
    fused = replace(base, attention="triton", fused_ce=True, fused_rmsnorm=True)
    for label, cfg, amp in (("fp32_ref", base, False), ("bf16_torch", base, True), ("bf16_kernels", fused, True),
                            ("bf16_kernels_compiled", fused, True)):
        model = Transformer(cfg).cuda()
        model.load_state_dict(ref_model.state_dict())
        if label.endswith("compiled"):  # per-block torch.compile, as ParallelConfig.compile does
            for block in model.layers:
                block.compile()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            res = model.loss(model(tokens, doc, pos), tokens.roll(-1, 1), mask)
        res.loss.backward()
        results[label] = (float(res.loss), [p.grad.detach().clone() for p in model.parameters()])
    ref_loss, ref_grads = results.pop("fp32_ref")
    for label, (loss, grads) in results.items():
        out[f"model_loss_rel_{label}"] = abs(loss - ref_loss) / abs(ref_loss)
        out[f"model_grad_rel_max_{label}"] = max(_rel(a, r) for a, r in zip(grads, ref_grads))
    return out


def correctness() -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    torch.backends.cudnn.allow_tf32 = False
    seed = int(time.time())  # fresh inputs every run (the seed is kept with the results)
    gen, cpu_gen = torch.Generator(device="cuda").manual_seed(seed), torch.Generator().manual_seed(seed)
    out: dict = {"seed": seed}
    for dtype in (torch.bfloat16, torch.float32):
        tag = "bf16" if dtype == torch.bfloat16 else "fp32"
        for part in (_attention_errors, _rmsnorm_errors, _ce_errors):
            try:
                out.update({f"{tag}/{k}": v for k, v in part(dtype, gen, cpu_gen).items()})
            except Exception:  # noqa: BLE001 - one failing kernel must not hide the others' results
                out[f"{tag}/{part.__name__}_error"] = traceback.format_exc(limit=4)
                print(out[f"{tag}/{part.__name__}_error"], flush=True)
    try:
        out.update(_model_errors(gen, cpu_gen))
    except Exception:  # noqa: BLE001
        out["model_error"] = traceback.format_exc(limit=4)
        print(out["model_error"], flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    return out


# ---------------------------------------------------------------- attention: config sweep and TFLOP/s

@functools.cache
def _bench_transformer():
    """scripts/bench_transformer.py as a module (tune and attention both use it; loaded once)."""
    spec = importlib.util.spec_from_file_location("bench_transformer", Path(__file__).with_name("bench_transformer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FWD_CANDIDATES = [(64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3)]
BWD_CANDIDATES = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2)]


def tune() -> dict:
    """Time each (BM, BN, warps, stages) candidate of the attention kernels at T 4096 (one causal document and
    packed documents, summed), forward first, then the backward with the chosen forward; keep the fastest in
    ``flash_attention.CONFIGS`` for the rest of this run (copy the chosen ones into the module to keep them)."""
    import anyloom.transformer.kernels.flash_attention as fa

    bench = _bench_transformer()
    cpu = torch.Generator().manual_seed(0)
    out: dict = {"fwd": {}, "bwd": {}, "chosen": {}, "before": {k: dict(v) for k, v in fa.CONFIGS.items()}}
    for d in (64, 128):
        heads, b, t = 2048 // d, 4, 4096
        cases = []
        for layout in ("causal", "packed"):
            doc = bench._packed_docs(b, t, t // 4, cpu) if layout == "packed" else torch.zeros(b, t, dtype=torch.int32)
            q, k, v = (torch.randn(b, heads, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            cases.append((q, k, v, doc.cuda(), torch.randn_like(q)))
        for kind, candidates in (("fwd", FWD_CANDIDATES), ("bwd", BWD_CANDIDATES)):
            times = {}
            for cand in candidates:
                fa.CONFIGS[kind][d] = cand
                try:
                    total = 0.0
                    for q, k, v, doc, g in cases:
                        def step(q=q, k=k, v=v, doc=doc, g=g, backward=kind == "bwd"):
                            o = fa.flash_attention(q, k, v, doc, doc)
                            if backward:
                                o.backward(g)

                        total += _bench(step, 10, 50, grad_to_none=[q, k, v])
                    times[cand] = total
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: not a candidate here
                    times[cand] = f"{type(e).__name__}: {str(e)[:160]}"
                print(f"tune {kind} d{d} {cand}: {times[cand]}", flush=True)
            ok = {c: ms for c, ms in times.items() if isinstance(ms, float)}
            best = min(ok, key=ok.get)
            fa.CONFIGS[kind][d] = best
            out[kind][f"d{d}"] = {str(c): ms for c, ms in times.items()}
            out["chosen"][f"{kind}_d{d}"] = list(best)
    return out


def attention() -> list[dict]:
    return _bench_transformer().bench_attention()


# ---------------------------------------------------------------- fused CE speed

def ce_speed() -> list[dict]:
    """linear + CE forward and forward+backward at N 16k tokens, D 2048, V 32k/128k in bf16: our Triton forward
    (+ chunked cuBLAS backward), the chunked PyTorch path, and the naive full-logits one; time and peak memory."""
    from anyloom.transformer.kernels.fused_ce import linear_lse

    rows = []
    for n, d, vocab in ((16384, 2048, 32768), (16384, 2048, 131072)):
        h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(vocab, d, device="cuda", dtype=torch.bfloat16) / math.sqrt(d)).requires_grad_()
        tgt = torch.randint(0, vocab, (n,), device="cuda")
        for backend in ("triton", "torch", "naive"):
            def fwd(backend=backend, h=h, w=w, tgt=tgt):
                o = linear_lse(h, w, tgt, backend=backend)
                return (o.lse - o.target_logit).mean()

            try:
                ms_f = _bench(fwd, 10, 50)
                ms_fb = _bench(lambda fwd=fwd: fwd().backward(), 10, 50, grad_to_none=[h, w])
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                fwd().backward()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                flops = 2 * n * d * vocab
                rows.append({"backend": backend, "tokens": n, "dim": d, "vocab": vocab, "fwd_ms": ms_f,
                             "fwd_bwd_ms": ms_fb, "fwd_tflops": flops / ms_f / 1e9,
                             "fwd_bwd_tflops": 4 * flops / ms_fb / 1e9, "peak_extra_mib": peak})
            except Exception as e:  # noqa: BLE001
                rows.append({"backend": backend, "vocab": vocab, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            print(rows[-1], flush=True)
        del h, w
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- LM training MFU

def _train_one(size: str, attention_backend: str, compile_blocks: bool, steps: int, batch: int, seq: int,
               vocab: int) -> dict:
    import numpy as np

    from anyloom.sequences.interleave import TokenStream
    from anyloom.sequences.packing import ListSource, PackedLoader
    from anyloom.training.lm import micro_batch_size, train_lm
    from anyloom.training.metrics import read_metrics
    from anyloom.training.optim import OptimConfig
    from anyloom.training.parallel import ParallelConfig
    from anyloom.training.run import RunDir
    from anyloom.training.train_config import TrainConfig
    from anyloom.transformer.sizes import model_config, param_count

    rng = np.random.default_rng(0)
    docs = []
    for _ in range(512):
        n = int(rng.integers(256, 2 * seq))
        docs.append(TokenStream(rng.integers(0, vocab, n).astype(np.int64), rng.integers(0, 3, n).astype(np.int8),
                                np.ones(n, dtype=bool)))
    source = ListSource(docs)
    train = TrainConfig(steps=steps, batch_size=batch, seq_len=seq, log_every=1, ckpt_every=0)
    cfg = model_config(size, vocab_size=vocab, attention=attention_backend, max_seq_len=max(seq, 2048))
    run = RunDir(Path(tempfile.mkdtemp(prefix="anyloom_gpu_train_")))
    t0 = time.perf_counter()
    try:
        train_lm(cfg, OptimConfig(warmup_steps=2), train, ParallelConfig(compile=compile_blocks), run,
                 lambda r, w: PackedLoader(source, seq, micro_batch_size(train, w), rank=r, world_size=w), None,
                 seed=0, device="cuda")
        records = [r for r in read_metrics(run.path) if "tokens_per_s" in r and r["step"] > steps // 3]
        tps = statistics.median(r["tokens_per_s"] for r in records)
        mfu = [r["mfu"] for r in records if "mfu" in r]
        return {"size": size, "params": param_count(cfg), "attention": attention_backend, "compile": compile_blocks,
                "batch": batch, "seq": seq, "vocab": vocab, "tokens_per_s": tps,
                "mfu_datasheet": statistics.median(mfu) if mfu else None, "steps_timed": len(records),
                "wall_s": time.perf_counter() - t0, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    finally:
        shutil.rmtree(run.path, ignore_errors=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def train(quick: bool) -> list[dict]:
    runs = [("150M", "triton", False), ("150M", "sdpa", False), ("1B", "triton", False), ("1B", "sdpa", False),
            ("150M", "triton", True), ("1B", "triton", True)]  # compiled last: compilation takes the longest
    if quick:
        runs = runs[:2]
    rows = []
    matmul = RESULT.get("ceilings", {}).get("matmul_bf16_8192_tflops")
    for size, backend, comp in runs:
        try:
            row = _train_one(size, backend, comp, steps=30 if size == "150M" else 15, batch=8, seq=2048,
                             vocab=32768)
            if matmul:
                row["mfu_measured_ceiling"] = 6 * row["params"] * row["tokens_per_s"] / (matmul * 1e12)
        except Exception:  # noqa: BLE001
            row = {"size": size, "attention": backend, "compile": comp, "error": traceback.format_exc(limit=4)}
        print(row, flush=True)
        rows.append(row)
        RESULT["train"] = rows
        _save()
    return rows


# ---------------------------------------------------------------- generation with a trained world LM

def _image_prompts(vocab, n: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """``n`` text -> image prompts of 3-6 random text pieces (what a caption's ids look like to the engine) and
    their unconditional twins (the condition dropped, as generation builds them)."""
    import numpy as np

    from anyloom.sequences.interleave import TextIds, encode_document

    rng = np.random.default_rng(seed)
    cond = [encode_document([TextIds(rng.integers(4, vocab.text_size, int(rng.integers(3, 7))))], vocab,
                            bos=True, eos=False).ids.tolist() + [vocab.boi] for _ in range(n)]
    return cond, [[vocab.bos, vocab.boi] for _ in range(n)]


def generation(export: Path, device: str = "cuda", sizes=((32, 16), (512, 16)), prompts_checked: int = 64) -> dict:
    """The world LM's text -> image sampling on the GPU, as the evaluation runs it (CFG 2, min-p 0.1, 16 samples per
    prompt from one prefill): equality checks in fp32 greedy decoding (eager vs compiled step, shared prefill vs
    repeated prompts, CUDA vs CPU), then images per second, eager and compiled, fp32 and bf16 autocast."""
    from anyloom.generation.cfg import GuidanceConfig
    from anyloom.generation.constraints import GrammarConfig, StreamGrammar
    from anyloom.generation.engine import generate
    from anyloom.generation.pipeline import load_lm
    from anyloom.generation.sampling import ModalitySampling, SamplingConfig

    out: dict = {"export": str(export)}
    model, vocab = load_lm(export, device)
    cpu_model, _ = load_lm(export, "cpu")
    grammar_cfg = GrammarConfig(allow_image=False, allow_audio=False, stop_after_span=True, max_audio_frames=1)
    grammar = {d: StreamGrammar(vocab, grammar_cfg, device=d) for d in {device, "cpu"}}
    budget = grammar["cpu"].image_span_cost - 1
    greedy = ModalitySampling(image=SamplingConfig(temperature=0.0))
    guidance = GuidanceConfig(image_scale=2.0)

    def run(m, prompts, uncond, g, sampling, compile_mode="never", samples=1, seed=0):
        dev = m.tok_embeddings.weight.device
        return generate(m, prompts, g, budget, sampling, torch.Generator(device=dev).manual_seed(seed), guidance,
                        uncond, None, compile_mode, samples=samples).sequences

    cond, uncond = _image_prompts(vocab, prompts_checked, 0)
    eager = run(model, cond, uncond, grammar[device], greedy)
    compiled = run(model, cond, uncond, grammar[device], greedy, "always")
    on_cpu = run(cpu_model, cond, uncond, grammar["cpu"], greedy)
    shared = run(model, cond[:16], uncond[:16], grammar[device], greedy, samples=4)
    repeated = run(model, [c for c in cond[:16] for _ in range(4)], [u for u in uncond[:16] for _ in range(4)],
                   grammar[device], greedy)
    same = lambda a, b: sum(x == y for x, y in zip(a, b)) / len(a)  # noqa: E731
    out["greedy_fp32_same_sequences"] = {"compiled_vs_eager": same(compiled, eager), "cuda_vs_cpu": same(eager, on_cpu),
                                         "shared_prefill_vs_repeated": same(shared, repeated)}
    out["greedy_fp32_same_tokens_cuda_vs_cpu"] = sum(
        x == y for a, b in zip(eager, on_cpu) for x, y in zip(a, b)) / sum(len(a) for a in eager)
    print(out, flush=True)

    sampling = ModalitySampling(image=SamplingConfig(temperature=1.0, top_p=1.0, min_p=0.1))
    rows = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for prompts, samples in sizes:
        c, u = _image_prompts(vocab, prompts, 1)
        for compile_mode, dtype in (("never", None), ("always", None), ("always", torch.bfloat16)):
            def once(c=c, u=u, compile_mode=compile_mode, dtype=dtype, samples=samples):
                with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                    return run(model, c, u, grammar[device], sampling, compile_mode, samples)
            once()  # warm-up (compiles)
            sync()
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                seqs = once()
                sync()
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            row = {"prompts": prompts, "samples": samples, "compile": compile_mode, "autocast": str(dtype),
                   "seconds": t, "images_per_s": prompts * samples / t,
                   "image_tokens_per_s": sum(len(q) for q in seqs) / t}
            print(row, flush=True)
            rows.append(row)
    out["throughput"] = rows
    return out


# ---------------------------------------------------------------- main

PARTS = ["ceilings", "correctness", "tune", "attention", "ce", "train", "generation"]


def _summary() -> None:
    print("\n== summary ==")
    if "ceilings" in RESULT:
        c = RESULT["ceilings"]
        print(f"ceilings: matmul bf16 {c['matmul_bf16_8192_tflops']:.0f} TFLOP/s, copy {c['copy_tb_per_s']:.2f} TB/s")
    corr = RESULT.get("correctness", {})
    for k, v in corr.items():
        if k.endswith("_triton") or k.startswith("model_"):
            torch_key = k.removesuffix("_triton") + "_torch"
            other = corr.get(torch_key, corr.get(k.removesuffix("_triton") + "_naive"))
            extra = f"  torch {other:.2e}" if isinstance(other, float) else ""
            print(f"{k:48s} {v:.2e}{extra}" if isinstance(v, float) else f"{k}: {str(v)[:200]}")
        elif k.endswith("_error"):
            print(f"{k}: {v.splitlines()[-1]}")
    if "tune" in RESULT:
        print("tuned (BM, BN, warps, stages):", RESULT["tune"]["chosen"])
    for r in RESULT.get("ce", []):
        print(f"ce {r['backend']:6s} V={r['vocab']}: " + (r["error"] if "error" in r else
              f"fwd {r['fwd_ms']:.2f} ms, fwd+bwd {r['fwd_bwd_ms']:.2f} ms ({r['fwd_bwd_tflops']:.0f} TFLOP/s), "
              f"peak +{r['peak_extra_mib']:.0f} MiB"))
    for r in RESULT.get("attention", []):
        print(f"attn {r['impl']:8s} d{r['head_dim']:<3d} T{r['seq']:<6d} {r['layout']:7s} "
              f"fwd {r['fwd_tflops']:6.1f}  fwd+bwd {r['fwd_bwd_tflops']:6.1f} TFLOP/s")
    gen = RESULT.get("generation", {})
    if gen:
        print("generation, greedy fp32, same sequences:", gen["greedy_fp32_same_sequences"])
        for r in gen["throughput"]:
            print(f"generate {r['prompts']:4d} prompts x {r['samples']} compile={r['compile']:6s} "
                  f"autocast={r['autocast']:14s} {r['images_per_s']:8.0f} images/s "
                  f"{r['image_tokens_per_s']:9.0f} tokens/s")
    for r in RESULT.get("train", []):
        if "error" in r:
            print(f"train {r['size']} {r['attention']} compile={r['compile']}: {r['error'].splitlines()[-1]}")
        else:
            print(f"train {r['size']:5s} {r['attention']:6s} compile={r['compile']!s:5s} "
                  f"{r['tokens_per_s']:9.0f} tok/s "
                  f"MFU {r['mfu_datasheet'] or 0:.1%} (vs measured matmul {r.get('mfu_measured_ceiling', 0):.1%}) "
                  f"peak {r['peak_mem_gib']:.1f} GiB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=PARTS, action="append")
    p.add_argument("--quick", action="store_true", help="fewer training runs")
    p.add_argument("--export", default="runs/world/export", help="the trained LM the generation part samples from")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA device")
    import triton

    parts = a.only or PARTS
    RESULT.update(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, triton=triton.__version__,
                  device=torch.cuda.get_device_name())
    print({k: RESULT[k] for k in ("torch", "triton", "device")}, flush=True)
    for part in parts:
        t0 = time.perf_counter()
        try:
            RESULT[part] = {"ceilings": ceilings, "correctness": correctness, "tune": tune, "attention": attention,
                            "ce": ce_speed, "train": lambda: train(a.quick),
                            "generation": lambda: generation(Path(a.export))}[part]()
        except Exception:  # noqa: BLE001 - report and go on to the next part
            RESULT[part + "_error"] = traceback.format_exc()
            print(RESULT[part + "_error"], flush=True)
        RESULT.setdefault("seconds", {})[part] = round(time.perf_counter() - t0, 1)
        print(f"[{part}] {RESULT['seconds'][part]} s", flush=True)
        _save()
    _summary()


if __name__ == "__main__":
    main()
