"""A short piece of a recipe's LM training on synthetic documents: tokens/s, MFU and peak memory on this machine.

    python scripts/bench_recipe.py --recipe scale/lm_150m --steps 30                      # one GPU
    python -m torch.distributed.run --nproc_per_node=8 scripts/bench_recipe.py --recipe scale/lm_150m --steps 30
    python scripts/bench_recipe.py --recipe scale/lm_150m --steps 3 model.dim=64 model.n_layers=2 train.seq_len=256

The recipe's model, optimizer, parallel settings (FSDP2, activation checkpointing, compile, precision) and rows are
used as they are (``section.key=value`` overrides after the options change them). Only the data is synthetic: random
documents of 64-2,048 tokens over ``--vocab`` ids, packed like real ones, so speed does not depend on a corpus. The
result (rank 0) is one JSON object, printed and written to ``--out`` (default ``runs/bench/recipe_<name>.json``), and a
markdown row for docs/BENCHMARKS.md naming the device. Fits a short GPU slot: ``--steps`` (default 30) bounds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from anyloom.sequences.interleave import TokenStream
from anyloom.sequences.packing import ListSource, PackedLoader


def synthetic_documents(vocab: int, n: int = 512, longest: int = 2048, seed: int = 0) -> ListSource:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        length = int(rng.integers(64, longest + 1))
        docs.append(TokenStream(rng.integers(0, vocab, length).astype(np.int64),
                                rng.integers(0, 3, length).astype(np.int8), np.ones(length, dtype=bool)))
    return ListSource(docs)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores)"


def peak_memory_gib() -> float:
    """The GPU's peak allocated memory on CUDA, else this process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def bench_arguments(description: str | None, recipe: str, steps: int, warmup: int, warmup_help: str,
                    out_help: str) -> argparse.ArgumentParser:
    """The options every recipe benchmark takes: the recipe, steps, untimed warm-up steps, --out, overrides."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=recipe)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--warmup", type=int, default=warmup, help=warmup_help)
    p.add_argument("--out", help=out_help)
    p.add_argument("overrides", nargs="*", help="section.key=value, after the recipe")
    return p


def warmup_refused(a: argparse.Namespace) -> bool:
    """Whether --warmup leaves no timed step (and says so)."""
    if a.warmup >= a.steps:
        print(f"error: --warmup {a.warmup} must be below --steps {a.steps}", file=sys.stderr)
        return True
    return False


def write_report(report: dict, out: Path) -> None:
    """The benchmark's JSON object, written to ``out`` and printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


def main(argv: list[str] | None = None) -> int:
    from anyloom.recipes import load_recipe
    from anyloom.sequences.vocab import SPECIAL_TOKENS, Vocabulary
    from anyloom.training.chain import lm_model_config
    from anyloom.training.lm import micro_batch_size, train_lm
    from anyloom.training.metrics import read_metrics
    from anyloom.training.run import RunDir
    from anyloom.transformer.sizes import param_count

    p = bench_arguments(__doc__, "scale/lm_150m", 30, 5, "steps left out of the timing (compile, allocator)",
                        "default: runs/bench/recipe_<name>.json")
    p.add_argument("--vocab", type=int, default=32768, help="ids of the synthetic documents (the model's vocabulary)")
    a = p.parse_args(argv)
    if warmup_refused(a):
        return 2
    recipe = load_recipe(a.recipe, ["data.train=synthetic", *a.overrides])
    train = dataclasses.replace(recipe.train, steps=a.steps, log_every=1, ckpt_every=0, sample_every=0,
                                async_checkpoint=False, max_seconds=0)
    # a vocabulary of about --vocab ids with an image codebook, so a model reading image codes by their grid position
    # (model.grid_positions) gets its fields as the LM stage fills them
    codes = math.prod(recipe.model.code_factors) if recipe.model.code_factors else min(1024, a.vocab // 4)
    vocab = Vocabulary.build(max(a.vocab - codes - len(SPECIAL_TOKENS), 1), codes, 0, 0, (8, codes // 8))
    model = lm_model_config(recipe.model, vocab)
    docs = synthetic_documents(vocab.size, longest=train.seq_len)

    def make_loader(rank: int, ranks: int) -> PackedLoader:
        return PackedLoader(docs, train.seq_len, micro_batch_size(train, ranks), rank=rank, world_size=ranks,
                            whole_documents=train.whole_documents)

    rank = int(os.environ.get("RANK", "0"))
    run = RunDir(Path(tempfile.gettempdir()) / f"anyloom_bench_recipe_{os.getppid()}")
    started = time.perf_counter()
    try:
        result = train_lm(model, recipe.optim, train, recipe.parallel, run, make_loader, None, seed=0,
                          device=recipe.run.device)
        if rank != 0:
            return 0
        timed = [r for r in read_metrics(run.path) if "tokens_per_s" in r and r["step"] > a.warmup]
        mfu = [r["mfu"] for r in timed if "mfu" in r]
        name = a.recipe.replace("/", "_")
        report = {
            "recipe": a.recipe, "overrides": a.overrides, "device": device_name(),
            "ranks": int(os.environ.get("WORLD_SIZE", "1")), "date": time.strftime("%Y-%m-%d"),
            "params": param_count(model), "vocab": vocab.size, "seq_len": train.seq_len,
            "global_batch": train.batch_size, "steps": result.step, "steps_timed": len(timed),
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in timed), 1),
            "mfu": round(statistics.median(mfu), 4) if mfu else None,
            "peak_memory_gib": round(peak_memory_gib(), 2), "seconds": round(time.perf_counter() - started, 1),
            "parallel": dataclasses.asdict(recipe.parallel),
        }
        report["tokens_per_s_per_rank"] = round(report["tokens_per_s"] / report["ranks"], 1)
        write_report(report, Path(a.out or f"runs/bench/recipe_{name}.json"))
        mfu_text = f"{report['mfu']:.1%}" if report["mfu"] is not None else "n/a (no peak known for this device)"
        print(f"| {a.recipe} | {report['device']} x {report['ranks']} | {report['params'] / 1e6:.1f}M | "
              f"{report['global_batch']} x {report['seq_len']} | {report['tokens_per_s_per_rank']:,.0f} | {mfu_text} | "
              f"{report['peak_memory_gib']:.1f} GiB | {report['date']} |")
        return 0
    finally:
        if rank == 0:
            shutil.rmtree(run.path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
