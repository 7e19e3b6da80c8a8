"""Helper for the LM training tests: a tiny model, learnable random documents, and a torchrun entry point.

    python -m torch.distributed.run --nproc_per_node=2 tests/lm_worker.py --dir DIR --steps 20 --batch 4

The real PackedLoader shards a global stream by rows, so any split of a step's global batch into ranks and
accumulation steps sees the same rows: what the 1-rank vs N-rank parity test needs.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from anyloom.sequences.interleave import TokenStream
from anyloom.sequences.packing import ListSource, PackedLoader
from anyloom.training.lm import LMTrainResult, SampleFn, micro_batch_size, train_lm
from anyloom.training.optim import OptimConfig
from anyloom.training.parallel import ParallelConfig
from anyloom.training.run import RunDir
from anyloom.training.train_config import TrainConfig
from anyloom.transformer.model import ModelConfig
from anyloom.transformer.sizes import model_config

VOCAB = 96


def tiny_model(code_factors: bool = False) -> ModelConfig:
    """The debug model; ``code_factors``: ids 32-79 are 48 codes with factorised embeddings (4 x 3 x 4)."""
    if code_factors:
        return model_config("debug", vocab_size=VOCAB, grid_token_range=(32, 80), code_factors=(4, 3, 4))
    return model_config("debug", vocab_size=VOCAB)


def documents(n: int = 64, seed: int = 7) -> ListSource:
    """Learnable random documents: mostly "next id = previous id + 1" with 10% random ids, 8-60 tokens each,
    each of one modality (0 text, 1 image, 2 audio) so that every per-modality metric is exercised."""
    rng = np.random.default_rng(seed)
    streams = []
    for _ in range(n):
        length = int(rng.integers(8, 61))
        ids = (int(rng.integers(VOCAB)) + np.arange(length)) % VOCAB
        noise = rng.random(length) < 0.1
        ids = np.where(noise, rng.integers(0, VOCAB, length), ids).astype(np.int64)
        modality = np.full(length, int(rng.integers(3)), dtype=np.int8)
        streams.append(TokenStream(ids, modality, np.ones(length, dtype=bool)))
    return ListSource(streams)


def run_training(run_dir: str, steps: int, batch: int, grad_accum: int = 1, ckpt_every: int = 0,
                 parallel: ParallelConfig | None = None, lr: float = 3e-3, keep_last: int = 2,
                 max_bad_steps: int = 5, sample_fn: SampleFn | None = None,
                 async_checkpoint: bool = False, max_seconds: float = 0.0, code_factors: bool = False,
                 data_key: str | None = None) -> LMTrainResult:
    train = TrainConfig(steps=steps, batch_size=batch, seq_len=32, grad_accum=grad_accum, log_every=1,
                        ckpt_every=ckpt_every, keep_last=keep_last, max_bad_steps=max_bad_steps,
                        sample_every=1 if sample_fn else 0, async_checkpoint=async_checkpoint,
                        max_seconds=max_seconds)
    optim = OptimConfig(lr=lr, warmup_steps=2, schedule="cosine")

    def make_loader(rank: int, world: int) -> PackedLoader:
        return PackedLoader(documents(), train.seq_len, micro_batch_size(train, world), rank=rank,
                            world_size=world, seed=3)

    return train_lm(tiny_model(code_factors), optim, train, parallel or ParallelConfig(), RunDir(run_dir), make_loader,
                    {"size": VOCAB}, seed=0, device="cpu", sample_fn=sample_fn, data_key=data_key)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True, help="run directory")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--ac", default="none", choices=["none", "selective", "full"])
    p.add_argument("--init", default="cpu", choices=["cpu", "meta"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--code-factors", action="store_true", help="factorised code embeddings (tiny_model)")
    p.add_argument("--strategy", default="fsdp", choices=["fsdp", "hsdp"])
    p.add_argument("--shard-group", type=int, default=0, help="hsdp: ranks per replica")
    p.add_argument("--result", help="write the result (rank 0) as JSON here")
    a = p.parse_args()
    torch.set_num_threads(1)
    res = run_training(a.dir, a.steps, a.batch, a.grad_accum, a.ckpt_every,
                       ParallelConfig(strategy=a.strategy, shard_group=a.shard_group, activation_checkpointing=a.ac,
                                      init_device=a.init, compile=a.compile),
                       code_factors=a.code_factors)
    if a.result and torch.distributed.is_available():
        import os

        if os.environ.get("RANK", "0") == "0":
            with open(a.result, "w") as f:
                json.dump({"step": res.step, "resumed_from": res.resumed_from, "losses": res.losses,
                           "skipped": res.skipped_steps, "interrupted": res.interrupted}, f)


if __name__ == "__main__":
    main()
