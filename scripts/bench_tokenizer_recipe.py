"""A short piece of a tokenizer recipe's training on synthetic data: pictures (or seconds of audio) a second, MFU and
peak memory on this machine.

    python scripts/bench_tokenizer_recipe.py --recipe scale/image_tokenizer_256 --steps 20          # one GPU
    python scripts/bench_tokenizer_recipe.py --recipe scale/image_tokenizer_256 --steps 3 \\
        image_tokenizer.batch_size=2 image_tokenizer.device=cpu                                   # a CPU check
    python scripts/bench_tokenizer_recipe.py --recipe scale/speech_tokenizer_24k --steps 20       # a speech tokenizer

The recipe's model, losses, optimizer, precision and device are used as they are (``section.key=value`` overrides
after the options change them); only the data is synthetic (smooth random shapes; harmonic tones for speech), so speed
does not depend on a corpus or its decoding. The recipe's ``pipeline.stages`` say which tokenizer it trains. FLOPs
per step are counted once with ``torch.utils.flop_counter`` (the forward, backward and discriminator of one real
step), so MFU needs no formula; activation memory per picture (per second of audio) is the bytes autograd saves for
the backward in one step. The result is one JSON object, printed and written to ``--out`` (default
``runs/bench/tokenizer_<name>.json``), and a markdown row for docs/BENCHMARKS.md naming the device. Fits a short GPU
slot: ``--steps`` (default 20) bounds it.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_recipe import bench_arguments, device_name, peak_memory_gib, warmup_refused, write_report


def synthetic_pictures(n: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """(n, 3, H, W) in [-1, 1]: blurred random blobs, so the convolutions see natural-ish statistics."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(1, size[0] // 16), max(1, size[1] // 16), generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


def synthetic_speech(n: int, seconds: float, rate: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` voiced-sounding clips: a gliding harmonic tone under a syllable-rate envelope, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    out = []
    for _ in range(n):
        f0 = 100 + 80 * rng.random() + 30 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * t)
        phase = 2 * np.pi * np.cumsum(f0) / rate
        voiced = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
        out.append((0.2 * voiced + 0.01 * rng.standard_normal(len(t))).astype(np.float32))
    return out


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


@dataclass
class Piece:
    """One training step of a tokenizer recipe, ready to time, and what it means."""

    step: Callable[[int], None]
    unit: str  # what a step processes: "pictures" or "audio_seconds"
    per_step: float  # how many of them
    device: torch.device
    params: int
    info: dict[str, Any]


def image_piece(recipe: Any, gan: bool) -> Piece:
    from anyloom.device import pick_device
    from anyloom.training.image_tokenizer import ReconstructionObjective, build_state, train_step

    cfg = recipe.image_tokenizer
    torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    state = build_state(cfg, device)
    if gan and state.disc is not None:
        state.step = cfg.gan.start_step
    objective, autocast = ReconstructionObjective(cfg), cfg.autocast(device)
    pictures = synthetic_pictures(cfg.batch_size * 2, tuple(cfg.model.image_size))
    batches = [pictures[i * cfg.batch_size:(i + 1) * cfg.batch_size].to(device).contiguous(
        memory_format=cfg.memory_format) for i in range(2)]
    info = {"image_size": list(cfg.model.image_size), "grid": list(state.model.grid),
            "codebook_size": state.model.codebook_size,
            "disc_params": sum(p.numel() for p in state.disc.parameters()) if state.disc is not None else 0,
            "gan_on": bool(gan and state.disc is not None), "batch_size": cfg.batch_size,
            "precision": cfg.mixed_precision}
    return Piece(lambda i: train_step(state, batches[i % 2], cfg, objective, autocast), "pictures", cfg.batch_size,
                 device, sum(p.numel() for p in state.model.parameters()), info)


def audio_piece(recipe: Any) -> Piece:
    from anyloom.device import pick_device
    from anyloom.tokenizers.audio_codec import WaveCodec
    from anyloom.tokenizers.audio_mel import MelTokenizer
    from anyloom.training.audio_tokenizer import SpeechSet, build_trainer, train_step

    cfg = recipe.audio_tokenizer
    device = pick_device(recipe.run.device)
    model = (WaveCodec(cfg.codec) if cfg.kind == "seanet_codec" else MelTokenizer(cfg.mel)).to(device)
    seconds = max(4.0, 2 * cfg.train.crop_seconds)
    waves = synthetic_speech(16, seconds, cfg.sample_rate)
    trainer = build_trainer(cfg, SpeechSet(waves, [""] * len(waves), cfg.sample_rate, 0), model, 0, device)
    info = {"kind": cfg.kind, "sample_rate": cfg.sample_rate, "tokens_per_second": model.num_codebooks *
            float(model.frame_rate), "batch_size": cfg.train.batch_size, "crop_seconds": cfg.train.crop_seconds}
    return Piece(lambda i: train_step(trainer, i), "audio_seconds", cfg.train.batch_size * cfg.train.crop_seconds,
                 device, sum(p.numel() for p in model.parameters()), info)


def main(argv: list[str] | None = None) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from anyloom.recipes import load_recipe
    from anyloom.training.lm import peak_bf16_flops

    p = bench_arguments(__doc__, "scale/image_tokenizer_256", 20, 3, "steps left out of the timing (cudnn autotuning, "
                        "allocator)", "default: runs/bench/tokenizer_<name>.json")
    p.add_argument("--gan", action="store_true", help="image tokenizer: time steps with the discriminator on")
    a = p.parse_args(argv)
    if warmup_refused(a):
        return 2
    recipe = load_recipe(a.recipe, ["data.train=synthetic", *a.overrides])
    stages = recipe.pipeline.stages
    if "image_tokenizer" in stages:
        piece = image_piece(recipe, a.gan)
    elif "audio_tokenizer" in stages:
        piece = audio_piece(recipe)
    else:
        print(f"error: {a.recipe} trains no tokenizer (pipeline.stages: {', '.join(stages)})", file=sys.stderr)
        return 2
    piece.step(0)  # a VQ's k-means initialisation happens on the first batch: before counting anything
    with FlopCounterMode(display=False) as counter:
        piece.step(1)
    flops = counter.get_total_flops()
    activations = saved_bytes(lambda: piece.step(2))
    times = []
    for i in range(a.steps):
        if piece.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        piece.step(3 + i)
        if piece.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    per_step = statistics.median(times[a.warmup:])
    name = device_name()
    peak = peak_bf16_flops(piece.device)
    unit = piece.unit
    report = {
        "recipe": a.recipe, "overrides": a.overrides, "device": name, "date": time.strftime("%Y-%m-%d"),
        "params": piece.params, **piece.info, "steps_timed": len(times) - a.warmup,
        "seconds_per_step": round(per_step, 4), f"{unit}_per_step": piece.per_step,
        f"{unit}_per_s": round(piece.per_step / per_step, 2),
        f"gflops_per_{unit.rstrip('s')}": round(flops / piece.per_step / 1e9, 3),
        "tflops_per_s": round(flops / per_step / 1e12, 3),
        "mfu": round(flops / per_step / peak, 4) if peak else None,
        f"activation_gib_per_{unit.rstrip('s')}": round(activations / piece.per_step / 2**30, 4),
        "peak_memory_gib": round(peak_memory_gib(), 2),
    }
    write_report(report, Path(a.out or f"runs/bench/tokenizer_{a.recipe.replace('/', '_')}.json"))
    mfu = f"{report['mfu']:.1%}" if report["mfu"] is not None else "n/a"
    print(f"| {a.recipe} | {name} | {piece.params / 1e6:.1f}M | {piece.per_step:g} {unit} a step | "
          f"{report[f'{unit}_per_s']:,.1f} {unit}/s | {mfu} | {report['peak_memory_gib']:.1f} GiB | {report['date']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())



