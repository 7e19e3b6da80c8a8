"""Image-tokenizer training step time for recipe variants, timed interleaved in one process.

    python scripts/bench_image_tokenizer.py --variant "" --variant "image_tokenizer.model.channels=[32,128]"

Each ``--variant`` is a space-separated list of recipe overrides on ``--recipe`` (default: world); "" is the
recipe as it is. A step is what the stage's loop does for one batch: forward, the stage's reconstruction
objective (edge focus and pixel-weight plug-ins included; under bf16 autocast with
``image_tokenizer.mixed_precision=native_bf16`` on a CPU with AMX or AVX-512 BF16), backward, gradient clipping,
AdamW; no data loading, metrics or checkpoints, and random pixels (the time does not depend on them). The variants
take turns (``--rounds`` rounds of ``--steps`` steps each) so that a machine slowing down affects them alike; the
report is the best and the median round per variant, and each variant's best relative to the first one's.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import time
from collections.abc import Callable

import torch

from anyloom.recipes import load_recipe
from anyloom.tokenizers.image_vq import ImageVQTokenizer
from anyloom.training.image_tokenizer import ImageTokenizerStageConfig, ReconstructionObjective
from anyloom.training.optim import build_optimizer


def make_step(cfg: ImageTokenizerStageConfig, seed: int = 0) -> Callable[[], None]:
    torch.manual_seed(seed)
    model = ImageVQTokenizer(cfg.model).to(memory_format=cfg.memory_format)
    optimizer = build_optimizer(model, cfg.optim)
    h, w = cfg.model.image_size
    x = (torch.rand(cfg.batch_size, 3, h, w) * 2 - 1).contiguous(memory_format=cfg.memory_format)

    autocast = cfg.autocast()
    objective = ReconstructionObjective(cfg)

    def step() -> None:
        with autocast():
            fwd = model(x)
            loss = objective(fwd.recon.float(), x).total + fwd.quant_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
        optimizer.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="world")
    p.add_argument("--variant", action="append", default=None, help="recipe overrides (repeatable; '' = as is)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first")
    p.add_argument("--steps", type=int, default=10, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    variants = args.variant if args.variant else [""]
    steps = [make_step(load_recipe(args.recipe, shlex.split(v)).image_tokenizer) for v in variants]
    for step in steps:
        for _ in range(args.warmup):
            step()
    rounds: list[list[float]] = [[] for _ in variants]
    for _ in range(args.rounds):
        for i, step in enumerate(steps):
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            rounds[i].append((time.perf_counter() - t) / args.steps * 1000.0)
    reference = min(rounds[0])
    for variant, ms in zip(variants, rounds):
        print(json.dumps({"variant": variant or "(recipe as is)", "best_ms": round(min(ms), 1),
                          "median_ms": round(statistics.median(ms), 1),
                          "best_vs_first": round(min(ms) / reference, 3)}))


if __name__ == "__main__":
    main()
