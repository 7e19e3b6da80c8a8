"""GPU benchmarks: the card's ceilings, attention tile tuning, attention and fused-CE speed, training MFU, sampling.

    python scripts/bench_gpu.py                             # every part (~10 min on an H100/H200)
    python scripts/bench_gpu.py --only ceilings --only train
    python scripts/bench_gpu.py --only tune                 # measure attention tiles -> the kernels' tuning file
    python scripts/bench_gpu.py --dry-run                   # the parts it would run and where it writes; no GPU

Needs CUDA, torch and triton (xformers when it imports); ``generation`` also loads a trained LM export. Kernel
correctness is not here: it is ``pytest -m gpu`` (tests/test_gpu.py; ``make test`` on a GPU machine runs it).

- ``ceilings``: what this card really does (measure, don't trust the datasheet): a bf16 8192^3 matmul on random
  data and a 2 GiB device-to-device copy (bytes read + written), each the median of ``do_bench``.
- ``tune``: (BM, BN, warps, stages) candidates of the attention kernels timed at T 4096 (one causal document plus
  packed documents), forward first, then the backward; the fastest per head dim are written to the tuning file
  (``anyloom.transformer.kernels.tuning``: ``$ANYLOOM_KERNEL_TUNING`` or ~/.cache/anyloom/kernel_tuning.json)
  under this GPU's name, and the kernels use them from then on.
- ``attention``: ``bench_transformer.bench_attention`` (ours vs SDPA, FlexAttention on packed documents, xformers).
- ``ce``: fused linear + CE (Triton forward, chunked backward) vs the chunked PyTorch and naive paths: time, memory.
- ``train``: the real training loop (``train_lm``, one process, bf16 autocast) on random documents at 150M and 1B,
  Triton attention vs SDPA (dense document mask), eager and per-block ``torch.compile``: tokens/s and MFU (6N FLOPs
  per token over the datasheet peak, as the loop logs it, and over the matmul ceiling when ``ceilings`` ran).
- ``generation``: a trained LM export (``--export``) sampling text -> image as the evaluation does (CFG 2, min-p 0.1,
  16 samples per prompt from one prefill): images/s eager, compiled, compiled under bf16 autocast.

Writes runs/bench/gpu.json (and a copy under $OUT when that is set) after each part, so a run stopped part-way
keeps what it measured; prints a table at the end.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Callable
from pathlib import Path

import torch

OUT = Path("runs/bench/gpu.json")
PARTS = ("ceilings", "tune", "attention", "ce", "train", "generation")


def save(result: dict, path: Path = OUT) -> None:
    """Write ``result`` as JSON (and copy it under $OUT, a device machine's folder of files to bring back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)


def _bench(fn: Callable[[], object], warmup: int = 25, rep: int = 100, grad_to_none=None) -> float:
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


# ---------------------------------------------------------------- attention tiles

FWD_CANDIDATES = [(64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3)]
BWD_CANDIDATES = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2)]


def tune(tuning_path: Path | None = None) -> dict:
    """Time each candidate tile at T 4096 (causal + packed, summed), forward first, then the backward with the
    chosen forward; write the fastest per head dim to the tuning file. Returns every time and the choice."""
    from bench_transformer import _packed_docs

    import anyloom.transformer.kernels.flash_attention as fa
    from anyloom.transformer.kernels import tuning

    gpu = torch.cuda.get_device_name()
    cpu = torch.Generator().manual_seed(0)
    chosen: tuning.Tiles = {"fwd": {}, "bwd": {}}
    out: dict = {"fwd": {}, "bwd": {}, "chosen": {}, "defaults": {k: {str(d): list(t) for d, t in v.items()}
                                                                  for k, v in fa.CONFIGS.items()}}
    for d in (64, 128):
        heads, b, t = 2048 // d, 4, 4096
        cases = []
        for layout in ("causal", "packed"):
            doc = _packed_docs(b, t, t // 4, cpu) if layout == "packed" else torch.zeros(b, t, dtype=torch.int32)
            q, k, v = (torch.randn(b, heads, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            cases.append((q, k, v, doc.cuda(), torch.randn_like(q)))
        for kind, candidates in (("fwd", FWD_CANDIDATES), ("bwd", BWD_CANDIDATES)):
            times: dict[tuple[int, int, int, int], float | str] = {}
            for cand in candidates:
                try:
                    with tuning.forced_tiles("flash_attention", {**chosen, kind: {**chosen[kind], d: cand}}):
                        total = 0.0
                        for q, k, v, doc, g in cases:
                            def step(q=q, k=k, v=v, doc=doc, g=g, backward=kind == "bwd"):
                                o = fa.flash_attention(q, k, v, doc, doc)
                                if backward:
                                    o.backward(g)

                            total += _bench(step, 10, 50, grad_to_none=[q, k, v])
                    times[cand] = total
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: not a candidate on this card
                    times[cand] = f"{type(e).__name__}: {str(e)[:160]}"
                print(f"tune {kind} d{d} {cand}: {times[cand]}", flush=True)
            ok = {c: ms for c, ms in times.items() if isinstance(ms, float)}
            chosen[kind][d] = min(ok, key=ok.get)
            out[kind][f"d{d}"] = {str(c): ms for c, ms in times.items()}
            out["chosen"][f"{kind}_d{d}"] = list(chosen[kind][d])
    import triton

    path = tuning.save_tuned_tiles("flash_attention", gpu, chosen, tuning_path, measured={
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "triton": triton.__version__})
    out["written_to"] = str(path)
    return out


def attention() -> list[dict]:
    from bench_transformer import bench_attention

    return bench_attention()


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



def train(quick: bool, matmul_tflops: float | None, on_row: Callable[[list[dict]], None] = lambda rows: None
          ) -> list[dict]:
    """Tokens/s and MFU of the real loop per (size, attention, compile); ``on_row`` sees the rows after each run
    (main saves them, so a run stopped part-way keeps them)."""
    runs = [("150M", "triton", False), ("150M", "sdpa", False), ("1B", "triton", False), ("1B", "sdpa", False),
            ("150M", "triton", True), ("1B", "triton", True)]  # compiled last: compilation takes the longest
    if quick:
        runs = runs[:2]
    rows = []
    for size, backend, comp in runs:
        try:
            row = _train_one(size, backend, comp, steps=30 if size == "150M" else 15, batch=8, seq=2048,
                             vocab=32768)
            if matmul_tflops:
                row["mfu_measured_ceiling"] = 6 * row["params"] * row["tokens_per_s"] / (matmul_tflops * 1e12)
        except Exception:  # noqa: BLE001
            row = {"size": size, "attention": backend, "compile": comp, "error": traceback.format_exc(limit=4)}
        print(row, flush=True)
        rows.append(row)
        on_row(rows)
    return rows


# ---------------------------------------------------------------- sampling with a trained LM

def _image_prompts(vocab, n: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """``n`` text -> image prompts of 3-6 random text pieces (what a caption's ids look like to the engine) and
    their unconditional twins (the condition dropped, as generation builds them)."""
    import numpy as np

    from anyloom.sequences.interleave import TextIds, encode_document

    rng = np.random.default_rng(seed)
    cond = [encode_document([TextIds(rng.integers(4, vocab.text_size, int(rng.integers(3, 7))))], vocab,
                            bos=True, eos=False).ids.tolist() + [vocab.boi] for _ in range(n)]
    return cond, [[vocab.bos, vocab.boi] for _ in range(n)]



def generation(export: Path, device: str = "cuda", sizes: tuple[tuple[int, int], ...] = ((32, 16), (512, 16))
               ) -> dict:
    """Images per second of text -> image sampling as the evaluation runs it (CFG 2, min-p 0.1, ``samples`` per
    prompt from one prefill), per (prompts, samples) in ``sizes``: eager fp32, compiled fp32, compiled bf16 autocast.
    (Greedy equality of compiled, eager, shared-prefill and CPU decoding is tests/test_gpu.py.)"""
    from anyloom.generation.cfg import GuidanceConfig
    from anyloom.generation.constraints import GrammarConfig, StreamGrammar
    from anyloom.generation.engine import generate
    from anyloom.generation.pipeline import load_lm
    from anyloom.generation.sampling import ModalitySampling, SamplingConfig

    out: dict = {"export": str(export)}
    model, vocab = load_lm(export, device)
    grammar_cfg = GrammarConfig(allow_image=False, allow_audio=False, stop_after_span=True, max_audio_frames=1)
    grammar = StreamGrammar(vocab, grammar_cfg, device=device)
    budget = grammar.image_span_cost - 1
    guidance = GuidanceConfig(image_scale=2.0)

    def run(m, prompts, uncond, g, sampling, compile_mode="never", samples=1, seed=0):
        dev = m.tok_embeddings.weight.device
        return generate(m, prompts, g, budget, sampling, torch.Generator(device=dev).manual_seed(seed), guidance,
                        uncond, None, compile_mode, samples=samples).sequences

    sampling = ModalitySampling(image=SamplingConfig(temperature=1.0, top_p=1.0, min_p=0.1))
    rows = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for prompts, samples in sizes:
        c, u = _image_prompts(vocab, prompts, 1)
        for compile_mode, dtype in (("never", None), ("always", None), ("always", torch.bfloat16)):
            def once(c=c, u=u, compile_mode=compile_mode, dtype=dtype, samples=samples):
                with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                    return run(model, c, u, grammar, sampling, compile_mode, samples)
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



# ---------------------------------------------------------------- table and entry point

def summary_lines(result: dict) -> list[str]:
    """The table printed at the end of a run, from what ``result`` holds (any subset of the parts)."""
    lines = [f"{result.get('device', '?')}, torch {result.get('torch', '?')}, triton {result.get('triton', '?')}, "
             f"{result.get('date', '?')}"]
    if "ceilings" in result:
        c = result["ceilings"]
        lines.append(f"ceilings: matmul bf16 {c['matmul_bf16_8192_tflops']:.0f} TFLOP/s, "
                     f"copy {c['copy_tb_per_s']:.2f} TB/s")
    if "tune" in result:
        lines.append(f"tuned (BM, BN, warps, stages): {result['tune']['chosen']} -> {result['tune']['written_to']}")
    for r in result.get("attention", []):
        lines.append(f"attn {r['impl']:8s} d{r['head_dim']:<3d} T{r['seq']:<6d} {r['layout']:7s} "
                     f"fwd {r['fwd_tflops']:6.1f}  fwd+bwd {r['fwd_bwd_tflops']:6.1f} TFLOP/s")
    for r in result.get("ce", []):
        lines.append(f"ce {r['backend']:6s} V={r['vocab']}: " + (r["error"] if "error" in r else
                     f"fwd {r['fwd_ms']:.2f} ms, fwd+bwd {r['fwd_bwd_ms']:.2f} ms ({r['fwd_bwd_tflops']:.0f} TFLOP/s), "
                     f"peak +{r['peak_extra_mib']:.0f} MiB"))
    for r in result.get("train", []):
        if "error" in r:
            lines.append(f"train {r['size']} {r['attention']} compile={r['compile']}: {r['error'].splitlines()[-1]}")
        else:
            ceiling = (f" (vs measured matmul {r['mfu_measured_ceiling']:.1%})"
                       if "mfu_measured_ceiling" in r else "")
            lines.append(f"train {r['size']:5s} {r['attention']:6s} compile={r['compile']!s:5s} "
                         f"{r['tokens_per_s']:9.0f} tok/s MFU {r['mfu_datasheet'] or 0:.1%}{ceiling} "
                         f"peak {r['peak_mem_gib']:.1f} GiB")
    for r in result.get("generation", {}).get("throughput", []):
        lines.append(f"generate {r['prompts']:4d} prompts x {r['samples']} compile={r['compile']:6s} "
                     f"autocast={r['autocast']:14s} {r['images_per_s']:8.0f} images/s "
                     f"{r['image_tokens_per_s']:9.0f} tokens/s")
    lines += [f"{name}: {text.strip().splitlines()[-1]}" for name, text in result.get("errors", {}).items()]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=PARTS, action="append", help="a part to run (repeatable); default: all")
    p.add_argument("--quick", action="store_true", help="two training runs instead of six")
    p.add_argument("--export", type=Path, default=Path("runs/world/export"),
                   help="the trained LM export that the generation part samples from")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--tuning-file", type=Path, default=None,
                   help="where tune writes the tiles (default: the file the kernels read)")
    p.add_argument("--dry-run", action="store_true", help="print the parts and the output paths; needs no GPU")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    parts = a.only or list(PARTS)
    if a.dry_run:
        from anyloom.transformer.kernels.tuning import tuning_file

        print(f"parts: {' '.join(parts)}\nresults: {a.out}")
        if "tune" in parts:
            print(f"tiles: {a.tuning_file or tuning_file()}")
        return 0
    if not torch.cuda.is_available():
        sys.exit("bench_gpu needs a CUDA device (--dry-run shows what it would do)")
    import triton

    result: dict = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "triton": triton.__version__,
                    "device": torch.cuda.get_device_name(), "seconds": {}, "errors": {}}
    print(summary_lines(result)[0], flush=True)

    def keep_train_rows(rows: list[dict]) -> None:
        result["train"] = rows
        save(result, a.out)

    runners: dict[str, Callable[[], object]] = {
        "ceilings": ceilings,
        "tune": lambda: tune(a.tuning_file),
        "attention": attention,
        "ce": ce_speed,
        "train": lambda: train(a.quick, result.get("ceilings", {}).get("matmul_bf16_8192_tflops"), keep_train_rows),
        "generation": lambda: generation(a.export),
    }
    for part in parts:
        t0 = time.perf_counter()
        try:
            result[part] = runners[part]()
        except Exception:  # noqa: BLE001 - report and go on to the next part
            result["errors"][part] = traceback.format_exc()
            print(result["errors"][part], flush=True)
        result["seconds"][part] = round(time.perf_counter() - t0, 1)
        print(f"[{part}] {result['seconds'][part]} s", flush=True)
        save(result, a.out)
    print("\n".join(["", "== summary =="] + summary_lines(result)))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
