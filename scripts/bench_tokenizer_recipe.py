"""A short piece of a recipe's image tokenizer training on synthetic pictures: images/s, MFU and peak memory here.

    python scripts/bench_tokenizer_recipe.py --recipe scale/image_tokenizer_256 --steps 20          # one GPU
    python scripts/bench_tokenizer_recipe.py --recipe scale/image_tokenizer_256 --steps 3 \\
        image_tokenizer.batch_size=2 image_tokenizer.device=cpu                                   # a CPU check

The recipe's model, losses, optimizer, precision and device are used as they are (``section.key=value`` overrides
after the options change them); only the pictures are synthetic (smooth random shapes), so speed does not depend on a
corpus or its decoding. FLOPs per step are counted once with ``torch.utils.flop_counter`` (the forward, backward and
discriminator of one real step), so MFU needs no formula; activation memory per picture is the bytes autograd saves
for the backward in one step. The result is one JSON object, printed and written to ``--out`` (default
``runs/bench/image_tokenizer_<name>.json``), and a markdown row for docs/BENCHMARKS.md naming the device. Fits a short
GPU slot: ``--steps`` (default 20) bounds it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_recipe import device_name, peak_memory_gib


def synthetic_pictures(n: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """(n, 3, H, W) in [-1, 1]: blurred random blobs, so the convolutions see natural-ish statistics."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(1, size[0] // 16), max(1, size[1] // 16), generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for the backward while ``fn()`` runs (activations, not weights)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def main(argv: list[str] | None = None) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from anyloom.device import pick_device
    from anyloom.recipes import load_recipe
    from anyloom.training.image_tokenizer import ReconstructionObjective, build_state, train_step
    from anyloom.training.lm import PEAK_BF16_FLOPS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="scale/image_tokenizer_256")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the timing (cudnn autotuning, allocator)")
    p.add_argument("--gan", action="store_true", help="time steps with the discriminator on (after gan.start_step)")
    p.add_argument("--out", help="default: runs/bench/image_tokenizer_<name>.json")
    p.add_argument("overrides", nargs="*", help="section.key=value, after the recipe")
    a = p.parse_args(argv)
    if a.warmup >= a.steps:
        print(f"error: --warmup {a.warmup} must be below --steps {a.steps}", file=sys.stderr)
        return 2
    cfg = load_recipe(a.recipe, ["data.train=synthetic", *a.overrides]).image_tokenizer
    torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    state = build_state(cfg, device)
    if a.gan and state.disc is not None:
        state.step = cfg.gan.start_step
    objective, autocast = ReconstructionObjective(cfg), cfg.autocast(device)
    pictures = synthetic_pictures(cfg.batch_size * 2, tuple(cfg.model.image_size))
    batches = [pictures[i * cfg.batch_size:(i + 1) * cfg.batch_size].to(device).contiguous(
        memory_format=cfg.memory_format) for i in range(2)]

    def step(i: int) -> None:
        train_step(state, batches[i % 2], cfg, objective, autocast)

    step(0)  # the VQ's k-means initialisation happens on the first batch: before counting anything
    with FlopCounterMode(display=False) as counter:
        step(1)
    flops = counter.get_total_flops()
    activations = saved_bytes(lambda: step(0))
    times = []
    for i in range(a.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    per_step = statistics.median(times[a.warmup:])
    name = device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None) if device.type == "cuda" else None
    params = sum(p.numel() for p in state.model.parameters())
    report = {
        "recipe": a.recipe, "overrides": a.overrides, "device": name, "date": time.strftime("%Y-%m-%d"),
        "image_size": list(cfg.model.image_size), "grid": list(state.model.grid),
        "codebook_size": state.model.codebook_size, "params": params,
        "disc_params": sum(p.numel() for p in state.disc.parameters()) if state.disc is not None else 0,
        "gan_on": bool(a.gan and state.disc is not None), "batch_size": cfg.batch_size,
        "precision": cfg.mixed_precision, "steps_timed": len(times) - a.warmup,
        "seconds_per_step": round(per_step, 4), "images_per_s": round(cfg.batch_size / per_step, 1),
        "gflops_per_image": round(flops / cfg.batch_size / 1e9, 2),
        "tflops_per_s": round(flops / per_step / 1e12, 3),
        "mfu": round(flops / per_step / peak, 4) if peak else None,
        "activation_gib_per_image": round(activations / cfg.batch_size / 2**30, 4),
        "peak_memory_gib": round(peak_memory_gib(), 2),
    }
    out = Path(a.out or f"runs/bench/image_tokenizer_{a.recipe.replace('/', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    mfu = f"{report['mfu']:.1%}" if report["mfu"] is not None else "n/a"
    print(f"| {a.recipe} | {name} | {params / 1e6:.1f}M | {cfg.batch_size} x {cfg.model.image_size[0]}^2 | "
          f"{report['images_per_s']:,.1f} | {mfu} | {report['peak_memory_gib']:.1f} GiB | {report['date']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())



