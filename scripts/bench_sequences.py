"""Benchmark: packing-loader throughput (tokens/s) on world-shaped documents, from token shards on disk.

    python scripts/bench_sequences.py [--items 4000] [--batches 200] [--seq-len 512] [--batch-size 16]

Items look like the world's: a 5-token caption, an 8x8 image grid (1,024 codes), 1.2 s of speech as 4 levels x
60 frames (256 codes per level). They are written as token shards in a temporary folder (the real pre-tokenized
format, memory-mapped), then read through the default task mixture (templates + condition dropout) and
packed. Also reported: packing alone (``ListSource`` of ready streams), which isolates the loader's own cost,
and rank 0 of 8 ranks with the same global batch (its own rows only: it builds only the documents it needs).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from anyloom.sequences.interleave import AudioIds, ImageIds, TextIds
from anyloom.sequences.mixture import MixtureConfig, TaskMixture
from anyloom.sequences.packing import ListSource, PackedLoader
from anyloom.sequences.shards import TokenShards, write_index, write_shard
from anyloom.sequences.vocab import Vocabulary


def world_items(n: int, rng: np.random.Generator) -> list[list]:
    return [
        [
            TextIds(rng.integers(0, 512, 5)),
            ImageIds(rng.integers(0, 1024, (8, 8))),
            AudioIds(rng.integers(0, 256, (4, int(rng.integers(45, 76))))),
        ]
        for _ in range(n)
    ]


def measure(loader: PackedLoader, batches: int) -> dict[str, int]:
    """Tokens/s by wall clock and by this process's CPU time (the latter is steadier on a shared machine)."""
    next(loader)  # warm-up: first epoch plan
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        b = next(loader)
    tokens = batches * b.tokens.numel()
    return {"wall": round(tokens / (time.perf_counter() - wall)), "cpu": round(tokens / (time.process_time() - cpu))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=4000)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--pattern", choices=["flat", "delay"], default="flat")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    vocab = Vocabulary.build(512, 1024, 256, 4, (8, 8), audio_pattern=args.pattern)
    items = world_items(args.items, np.random.default_rng(0))
    with tempfile.TemporaryDirectory() as tmp:
        shard_size = 1024
        counts = []
        for s in range(0, len(items), shard_size):
            chunk = items[s : s + shard_size]
            write_shard(f"{tmp}/shard_{s // shard_size:05d}", chunk, [str(i) for i in range(len(chunk))], "bench")
            counts.append(len(chunk))
        write_index(tmp, "bench", counts, {})
        mixture = TaskMixture(TokenShards(tmp), vocab, MixtureConfig())
        mixed = measure(PackedLoader(mixture, args.seq_len, args.batch_size, seed=0), args.batches)
        # rank 0 of 8 with the same global batch: tokens of its own rows per second
        per_rank = measure(
            PackedLoader(mixture, args.seq_len, max(1, args.batch_size // 8), rank=0, world_size=8, seed=0),
            args.batches,
        )
        streams = [mixture.stream(i, np.array([0.5, 0.5])) for i in range(len(mixture))]
    packed = measure(PackedLoader(ListSource(streams), args.seq_len, args.batch_size, seed=0), args.batches)
    print(
        json.dumps(
            {
                "mixture_from_shards_tokens_per_s": mixed,
                "packing_only_tokens_per_s": packed,
                "rank0_of_8_tokens_per_s": per_rank,
                "seq_len": args.seq_len,
                "batch_size": args.batch_size,
                "audio_pattern": args.pattern,
                "mean_doc_tokens": round(float(np.mean([len(s) for s in streams])), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
