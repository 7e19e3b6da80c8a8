"""LM training throughput through the real loop (``train_lm``): one process, or N ranks under torchrun.

    python scripts/bench_lm_training.py --size world-tiny                                     # 1 rank
    python -m torch.distributed.run --nproc_per_node=2 scripts/bench_lm_training.py --size world-tiny

Trains on random-token documents (speed does not depend on the data) for ``--steps`` steps with the global
batch ``--batch`` x ``--seq-len``, and prints the median global tokens/s over the steps after ``--warmup``
(checkpoint writing excluded: it happens between logged intervals). The same total CPU threads are used
whatever the number of ranks (``--threads`` split over the local ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from anyloom.sequences.interleave import TokenStream
from anyloom.sequences.packing import ListSource, PackedLoader
from anyloom.training.lm import micro_batch_size, train_lm
from anyloom.training.metrics import read_metrics
from anyloom.training.optim import OptimConfig
from anyloom.training.parallel import MIXED_PRECISION_MODES, ParallelConfig
from anyloom.training.run import RunDir
from anyloom.training.train_config import TrainConfig
from anyloom.transformer.sizes import model_config

# --compile: (parallel.compile, parallel.compile_loss)
COMPILE = {"none": (False, False), "blocks": (True, False), "blocks+loss": (True, True)}


def random_documents(vocab: int, n: int = 256, seed: int = 0) -> ListSource:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        length = int(rng.integers(64, 1024))
        docs.append(TokenStream(rng.integers(0, vocab, length).astype(np.int64),
                                rng.integers(0, 3, length).astype(np.int8), np.ones(length, dtype=bool)))
    return ListSource(docs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="world-tiny")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8, help="global sequences per step")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="CPU threads in total, split over local ranks")
    p.add_argument("--ac", default="none", choices=["none", "selective", "full"])
    p.add_argument("--precision", default="auto", choices=MIXED_PRECISION_MODES,
                   help="parallel.mixed_precision (amx: bf16 autocast on a CPU with AMX tiles; native_bf16: with "
                        "AMX tiles or AVX-512 BF16)")
    p.add_argument("--compile", default="none", choices=list(COMPILE),
                   help="parallel.compile / compile_loss: none, each block, or each block and model.loss")
    p.add_argument("--json", help="append the result as one JSON line to this file (rank 0)")
    a = p.parse_args()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, a.threads // local))
    train = TrainConfig(steps=a.steps, batch_size=a.batch, seq_len=a.seq_len, log_every=1, ckpt_every=0)
    docs = random_documents(a.vocab)

    def make_loader(rank: int, world: int) -> PackedLoader:
        return PackedLoader(docs, a.seq_len, micro_batch_size(train, world), rank=rank, world_size=world)

    # one directory for all ranks of this job (the ranks of a torchrun job share their parent, the agent)
    run = RunDir(Path(tempfile.gettempdir()) / f"anyloom_bench_lm_{os.getppid()}")
    try:
        train_lm(model_config(a.size, vocab_size=a.vocab), OptimConfig(warmup_steps=2), train,
                 ParallelConfig(activation_checkpointing=a.ac, mixed_precision=a.precision,
                                compile=COMPILE[a.compile][0], compile_loss=COMPILE[a.compile][1]),
                 run, make_loader, None, seed=0, device="cpu")
        if int(os.environ.get("RANK", "0")) == 0:
            records = [r for r in read_metrics(run.path) if "tokens_per_s" in r and r["step"] > a.warmup]
            tps = statistics.median(r["tokens_per_s"] for r in records)
            result = {"size": a.size, "ranks": int(os.environ.get("WORLD_SIZE", "1")), "batch": a.batch,
                      "seq_len": a.seq_len, "ac": a.ac, "precision": a.precision, "compile": a.compile,
                      "tokens_per_s": round(tps, 1), "steps_timed": len(records)}
            print(json.dumps(result))
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(result) + "\n")
    finally:
        if int(os.environ.get("RANK", "0")) == 0:
            shutil.rmtree(run.path, ignore_errors=True)


if __name__ == "__main__":
    main()
