"""How good is reranking with k candidates? Sample N candidates per prompt once, judge every one, and report the
pick's quality for every k <= N (the first k of each prompt's draws), so one run gives the whole curve.

    python scripts/rerank_curves.py --run runs/world --split val --to image --candidates 32
    python scripts/rerank_curves.py --run runs/world --split val --to audio --candidates 16 --seed 1
    python scripts/rerank_curves.py --run runs/world --split val --to image --vary round_trip --weights 0 0.5 1 2
    python scripts/rerank_curves.py --run runs/world --split val --to image --candidates 16 --set image_cfg_scale=3

``--to image``: text -> image on every item of the split; ``--to audio``: text -> speech once per distinct caption
(as the evaluation does), every candidate vocoded and transcribed by the ASR judge. Every candidate is scored by
each of the run's scorers for the target (``generation.image_scorers`` / ``audio_scorers``) once; per k the report
gives the quality of the pick by the configured weighted sum, by each scorer alone, with ``--vary NAME`` by the sum
with that scorer's weight replaced by each of ``--weights``, and (images) the oracle (a right picture among the k).
Quality: attribute accuracy and the share of unreadable picks (images), corpus WER with items weighted by how
often their caption occurs (audio).
``--eval-draw`` seeds the image batches as the evaluation does (its i-th batch of 32 with seed + i; the curves'
default is seed + the batch's first item), so the same run, seed and candidates give the evaluation's own draw.
``--set key=value`` overrides the run's ``generation:`` settings (YAML values; ``image.min_p=0.2`` for a sampling
field).
Writes ``<run>/rerank_curves_<to>_<split>_seed<seed>.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

KS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


def _with_overrides(cfg, pairs: list[str]):
    for pair in pairs:
        key, _, value = pair.partition("=")
        parsed = yaml.safe_load(value)
        if "." in key:
            section, field = key.split(".", 1)
            cfg = replace(cfg, **{section: replace(getattr(cfg, section), **{field: parsed})})
        else:
            cfg = replace(cfg, **{key: parsed})
    return cfg


def _pool(pipe, toks: list, n: int, to: str, seed: int):
    from anyloom.generation.scorers import Candidates
    from anyloom.sequences.interleave import AudioIds, ImageIds

    codes = pipe._sample(toks, to, n, pipe.config, seed, None, None, render=False)
    span = ImageIds if to == "image" else AudioIds
    return Candidates(to, toks, [j // n for j in range(len(codes))], [span(c.codes.cpu().numpy()) for c in codes],
                      decode=lambda indices: pipe._render_many([codes[j].codes for j in indices], to))


def _term_scores(pipe, pool) -> dict[str, list[float]]:
    """Each configured scorer's (N,) scores of the pool, by scorer name."""
    specs = pipe.config.scorers(pool.to)
    return {spec.name: scorer(pool).tolist() for spec, scorer in zip(specs, pipe.scorers(pool.to))}


def _picks(pipe, to: str, terms: dict[str, np.ndarray], k: int, vary: str | None, weights: list[float]) -> dict:
    """Pick index per prompt among the first k candidates: by the configured sum, each scorer alone, and varied."""
    specs = pipe.config.scorers(to)

    def total(weight_of: dict[str, float]) -> np.ndarray:
        return sum(weight_of[s.name] * terms[s.name][:, :k] for s in specs).argmax(1)

    configured = {s.name: s.weight for s in specs}
    picks = {"configured": total(configured)}
    picks.update({f"{s.name} alone": terms[s.name][:, :k].argmax(1) for s in specs})
    for w in weights if vary else []:
        picks[f"{vary} w={w}"] = total({**configured, vary: w})
    return picks


def image_curves(pipe, items, n: int, seed: int, vary: str | None, weights: list[float], eval_draw: bool = False,
                 batch: int = 32) -> dict:
    from anyloom.world.judge import judge_image

    ok, unreadable, terms = [], [], {}
    for call, start in enumerate(range(0, len(items), batch)):
        chunk = items[start:start + batch]
        toks = [pipe.prompt_segments(it.caption) for it in chunk]
        batch_seed = seed + (call if eval_draw else start)  # the evaluation seeds its i-th batch with seed + i
        pool = _pool(pipe, toks, n, "image", batch_seed)
        for j, p in enumerate(pool.pixels()):
            it, r = chunk[j // n], judge_image(p)
            unreadable.append(r is None)
            ok.append(r is not None and (r.count, r.color, r.shape) == (it.count, it.color, it.shape))
        for name, values in _term_scores(pipe, pool).items():
            terms.setdefault(name, []).extend(values)
        print(f"{start + len(chunk)}/{len(items)} prompts", file=sys.stderr, flush=True)
    ok, unreadable = (np.array(a).reshape(-1, n) for a in (ok, unreadable))
    terms = {name: np.array(v).reshape(-1, n) for name, v in terms.items()}
    rows = np.arange(len(ok))
    curve = {}
    for k in (k for k in KS if k <= n):
        curve[k] = {"oracle": float(ok[:, :k].any(1).mean())}
        for label, pick in _picks(pipe, "image", terms, k, vary, weights).items():
            curve[k][label] = {"accuracy": float(ok[rows, pick].mean()),
                               "unreadable": float(unreadable[rows, pick].mean())}
    return {"single": float(ok.mean()), "single_unreadable": float(unreadable.mean()), "curve": curve}


def audio_curves(pipe, items, n: int, seed: int, vary: str | None, weights: list[float]) -> dict:
    from anyloom.world.asr import SpeechJudge, word_error_rate

    counts = Counter(it.caption for it in items)
    captions = sorted(counts)
    pool = _pool(pipe, [pipe.prompt_segments(c) for c in captions], n, "audio", seed)
    terms = {name: np.array(v).reshape(-1, n) for name, v in _term_scores(pipe, pool).items()}
    judge = SpeechJudge()
    heard = np.array([judge.transcribe_one(g.wave, g.sample_rate) for g in pool.outputs(list(range(len(pool))))],
                     dtype=object).reshape(-1, n)

    def wer(pick: np.ndarray) -> float:
        refs = [c for c in captions for _ in range(counts[c])]
        return word_error_rate(refs, [heard[i, pick[i]] for i, c in enumerate(captions) for _ in range(counts[c])])

    curve = {k: {label: wer(pick) for label, pick in _picks(pipe, "audio", terms, k, vary, weights).items()}
             for k in KS if k <= n}
    return {"captions": len(captions), "misheard": float(np.mean(heard != np.array(captions)[:, None])),
            "single_wer": float(np.mean([wer(np.full(len(captions), j)) for j in range(n)])), "curve": curve}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run directory written by `make train`")
    p.add_argument("--split", default="val", help="a world split (val, test, compositional)")
    p.add_argument("--to", choices=("image", "audio"), required=True)
    p.add_argument("--candidates", type=int, default=16, help="candidates drawn per prompt (the largest k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="items of the split (0: all)")
    p.add_argument("--vary", default=None, help="a configured scorer whose weight --weights replaces")
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.3, 1.0], help="the weights to try for --vary")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="generation key=value")
    p.add_argument("--eval-draw", action="store_true",
                   help="images: seed the batches as the evaluation does (with --seed = the run's generation.seed and "
                        "--candidates = its image_candidates, the evaluation's own draw)")
    args = p.parse_args(argv)
    if args.candidates < 1:
        p.error("--candidates must be >= 1")

    from anyloom.data.manifest import read_manifest
    from anyloom.generation.pipeline import PipelineError, load
    from anyloom.recipes import build_recipe
    from anyloom.training.chain import build_data
    from anyloom.world.evaluate import items_from_documents

    run = Path(args.run)
    if not (run / "recipe.yaml").is_file():
        p.error(f"{run} is not a run directory (no recipe.yaml)")
    try:
        pipe = load(run)
        pipe.config = _with_overrides(pipe.config, args.overrides)
    except (PipelineError, TypeError, ValueError) as e:
        p.error(str(e))
    if args.vary and args.vary not in {s.name for s in pipe.config.scorers(args.to)}:
        p.error(f"--vary {args.vary}: not one of the run's {args.to} scorers "
                f"({', '.join(s.name for s in pipe.config.scorers(args.to))})")
    world = build_data(build_recipe(yaml.safe_load((run / "recipe.yaml").read_text()) or {}, []))
    items = items_from_documents(read_manifest(world.split(args.split)).documents)
    items = items[:args.limit] if args.limit else items
    if args.to == "image":
        result = image_curves(pipe, items, args.candidates, args.seed, args.vary, args.weights, args.eval_draw)
    else:
        result = audio_curves(pipe, items, args.candidates, args.seed, args.vary, args.weights)
    result.update(run=str(run), split=args.split, to=args.to, candidates=args.candidates, seed=args.seed,
                  items=len(items), overrides=args.overrides, eval_draw=args.eval_draw)
    out = run / f"rerank_curves_{args.to}_{args.split}_seed{args.seed}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
