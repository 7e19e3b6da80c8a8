"""Measure the world: generation time, image-judge accuracy and speech-judge WER per voice on ground truth.

    python scripts/bench_world.py                      # default world, built fresh in a temporary folder
    python scripts/bench_world.py --root data_cache/world --splits test compositional

Prints a table and writes JSON (``--out``, default runs/bench/world.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from anyloom.data.manifest import read_manifest
from anyloom.progress import progress
from anyloom.world.asr import SpeechJudge, word_error_rate
from anyloom.world.dataset import WorldConfig, build_world
from anyloom.world.judge import judge_image


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None, help="world cache root (default: a fresh temporary folder, so it is timed)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--splits", nargs="+", default=["test", "compositional"])
    p.add_argument("--out", default="runs/bench/world.json")
    p.add_argument("--robustness", type=int, default=300, help="renders per blur/noise setting (0: skip)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = WorldConfig(root=args.root or tmp)
        t0 = time.perf_counter()
        cpu0 = os.times()
        paths = build_world(cfg, workers=args.workers)
        wall = time.perf_counter() - t0
        cpu1 = os.times()
        cpu = (cpu1.user - cpu0.user) + (cpu1.children_user - cpu0.children_user)
        results: dict = {"generation_s": round(wall, 1), "generation_cpu_s": round(cpu, 1),
                         "items": sum(paths.counts.values()), "judge": {}, "asr": {}}
        print(f"generation: {results['items']} items in {wall:.1f} s wall, {cpu:.1f} s CPU (user, all processes)")

        judge = SpeechJudge()
        for split in args.splits:
            docs = read_manifest(paths.split(split)).documents
            exact = sum(judge_image(d.segments[1].pixels) == _caption(d) for d in progress(docs, desc=f"judge {split}"))
            results["judge"][split] = {"exact": exact / len(docs), "n": len(docs)}
            print(f"image judge {split}: {exact}/{len(docs)} exact = {exact / len(docs):.4f}")
            by_voice: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
            t1 = time.perf_counter()
            for d in progress(docs, desc=f"asr {split}"):
                refs, hyps = by_voice[d.meta["voice"]]
                refs.append(d.segments[0].text)
                hyps.append(judge.transcribe_one(d.segments[2].wave, d.segments[2].sample_rate))
            asr_s = time.perf_counter() - t1
            all_refs = [r for refs, _ in by_voice.values() for r in refs]
            all_hyps = [h for _, hyps in by_voice.values() for h in hyps]
            results["asr"][split] = {"wer": word_error_rate(all_refs, all_hyps), "n": len(all_refs),
                                     "utt_per_s": round(len(all_refs) / asr_s, 1),
                                     "per_voice": {v: {"wer": word_error_rate(r, h), "n": len(r)}
                                                   for v, (r, h) in sorted(by_voice.items())}}
            print(f"speech judge {split}: WER {results['asr'][split]['wer']:.4f} on {len(all_refs)} utterances "
                  f"({len(all_refs) / asr_s:.0f} utt/s)")
            for v, s in results["asr"][split]["per_voice"].items():
                print(f"  {v:<10} WER {s['wer']:.4f} (n={s['n']})")
    if args.robustness:
        results["judge_robustness"] = robustness(args.robustness)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def robustness(n: int) -> dict[str, dict[str, float]]:
    """Image judge on test-split renders softened like generated images: Gaussian blur + Gaussian noise."""
    import numpy as np
    from scipy import ndimage

    from anyloom.world.dataset import sample_caption
    from anyloom.world.render import render_scene

    cfg = WorldConfig()
    out = {}
    for sigma, noise in ((0.0, 0.0), (0.5, 4.0), (0.7, 8.0), (1.0, 8.0)):
        noise_rng = np.random.default_rng(1)
        exact = unreadable = 0
        for i in range(n):
            rng = np.random.default_rng([cfg.seed, 2, i])
            caption = sample_caption(cfg, "test", rng)
            px = render_scene(rng, caption, cfg.image_size, cfg.supersample).pixels.astype(np.float64)
            if sigma:
                px = ndimage.gaussian_filter(px, (sigma, sigma, 0))
            px = np.clip(px + noise_rng.normal(0.0, noise, px.shape), 0, 255).astype(np.uint8)
            got = judge_image(px)
            exact += got == caption
            unreadable += got is None
        key = f"blur{sigma}_noise{noise}"
        out[key] = {"exact": exact / n, "unreadable": unreadable / n, "wrong": (n - exact - unreadable) / n}
        print(f"image judge, blur sigma {sigma} px + noise std {noise}: exact {exact / n:.3f}, "
              f"unreadable (None) {unreadable / n:.3f}, wrong {(n - exact - unreadable) / n:.3f}  (n={n})")
    return out


def _caption(doc):
    from anyloom.world.captions import Caption

    return Caption(count=doc.meta["count"], color=doc.meta["color"], shape=doc.meta["shape"])


if __name__ == "__main__":
    sys.exit(main())
