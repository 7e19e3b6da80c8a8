"""How good is reranking with k candidates? Sample N candidates per prompt once, judge every one, and report the
pick's quality for every k <= N (the first k of each prompt's draws), so one run gives the whole curve.

    python scripts/rerank_curves.py --run runs/world --split val --to image --candidates 32
    python scripts/rerank_curves.py --run runs/world --split val --to audio --candidates 16 --seed 1
    python scripts/rerank_curves.py --run runs/world --split val --to image --candidates 16 --set image_cfg_scale=3

``--to image``: text -> image on every item of the split, candidates picked by the run's image matcher's score
(+ the run's ``image_region_weight`` x its region consistency) - w * log(round-trip error through the image
tokenizer), for each ``--weights`` w; per k and w the pick's attribute
accuracy and the share of unreadable picks, and per k the oracle (a right picture among the k).
``--to audio``: text -> speech once per distinct caption (as the evaluation does), every candidate vocoded and
transcribed by the ASR judge; per k the corpus WER (items weighted by how often their caption occurs) of the pick
by log p(caption | speech) + w * log p(speech | caption) per frame, for each ``--weights`` w.
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


def image_curves(pipe, items, n: int, seed: int, weights: list[float], eval_draw: bool = False,
                 batch: int = 32) -> dict:
    from anyloom.generation.rerank import ROUND_TRIP_FLOOR, round_trip_error
    from anyloom.world.judge import judge_image

    cfg = pipe.config
    ok, unreadable, scores, errors, regions = [], [], [], [], []
    for call, start in enumerate(range(0, len(items), batch)):
        chunk = items[start:start + batch]
        toks = [pipe.prompt_segments(it.caption) for it in chunk]
        batch_seed = seed + (call if eval_draw else start)  # the evaluation seeds its i-th batch with seed + i
        codes = pipe._sample(toks, "image", n, cfg, batch_seed, None, None, render=False)
        pictures = [np.asarray(g.image.convert("RGB")) for g in pipe._render_many([c.codes for c in codes], "image")]
        for j, p in enumerate(pictures):
            it, r = chunk[j // n], judge_image(p)
            unreadable.append(r is None)
            ok.append(r is not None and (r.count, r.color, r.shape) == (it.count, it.color, it.shape))
        words = [[int(t) for s in toks[j // n] for t in s.ids] for j in range(len(pictures))]
        stacked = np.stack(pictures)
        scores += pipe.matcher.similarity(stacked, words).tolist()
        errors += round_trip_error(pipe.image_tokenizer, stacked).tolist()
        if cfg.image_region_weight > 0:  # the matcher's region consistency, at the run's (or --set) weight
            regions += pipe.matcher.consistency(stacked).tolist()
        print(f"{start + len(chunk)}/{len(items)} prompts", file=sys.stderr, flush=True)
    ok, unreadable, s, e = (np.array(a).reshape(-1, n) for a in (ok, unreadable, scores, errors))
    if regions:  # part of every score
        s = s + cfg.image_region_weight * np.array(regions).reshape(-1, n)
    rows = np.arange(len(ok))
    curve = {}
    for k in (k for k in KS if k <= n):
        curve[k] = {"oracle": float(ok[:, :k].any(1).mean())}
        for w in weights:
            pick = (s[:, :k] - w * np.log(e[:, :k] + ROUND_TRIP_FLOOR)).argmax(1)
            curve[k][f"w={w}"] = {"accuracy": float(ok[rows, pick].mean()),
                                  "unreadable": float(unreadable[rows, pick].mean())}
    return {"single": float(ok.mean()), "single_unreadable": float(unreadable.mean()), "curve": curve}


def audio_curves(pipe, items, n: int, seed: int, weights: list[float]) -> dict:
    from anyloom.generation.rerank import per_frame_log_likelihood, reverse_log_likelihood
    from anyloom.sequences.interleave import AudioIds
    from anyloom.world.asr import SpeechJudge, word_error_rate

    counts = Counter(it.caption for it in items)
    captions = sorted(counts)
    toks = [pipe.prompt_segments(c) for c in captions]
    codes = pipe._sample(toks, "audio", n, pipe.config, seed, None, None, render=False)
    spans = [AudioIds(c.codes.cpu().numpy()) for c in codes]
    prompts = [toks[j // n] for j in range(len(spans))]
    reverse = reverse_log_likelihood(pipe.model, pipe.vocab, spans, prompts).numpy().reshape(-1, n)
    per_frame = per_frame_log_likelihood(pipe.model, pipe.vocab, spans, prompts).numpy().reshape(-1, n)
    judge = SpeechJudge()
    heard = np.array([judge.transcribe_one(g.wave, g.sample_rate)
                      for g in pipe._render_many([c.codes for c in codes], "audio")], dtype=object).reshape(-1, n)

    def wer(pick: np.ndarray) -> float:
        refs = [c for c in captions for _ in range(counts[c])]
        return word_error_rate(refs, [heard[i, pick[i]] for i, c in enumerate(captions) for _ in range(counts[c])])

    curve = {}
    for k in (k for k in KS if k <= n):
        curve[k] = {f"w={w}": wer((reverse[:, :k] + w * per_frame[:, :k]).argmax(1)) for w in weights}
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
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.3, 1.0],
                   help="the second term's weights w to compare")
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
    if args.to == "image" and pipe.matcher is None:
        p.error(f"{run} has no image matcher: the image curve is the matcher's pick")
    world = build_data(build_recipe(yaml.safe_load((run / "recipe.yaml").read_text()) or {}, []))
    items = items_from_documents(read_manifest(world.split(args.split)).documents)
    items = items[:args.limit] if args.limit else items
    if args.to == "image":
        result = image_curves(pipe, items, args.candidates, args.seed, args.weights, args.eval_draw)
    else:
        result = audio_curves(pipe, items, args.candidates, args.seed, args.weights)
    result.update(run=str(run), split=args.split, to=args.to, candidates=args.candidates, seed=args.seed,
                  items=len(items), overrides=args.overrides, eval_draw=args.eval_draw)
    out = run / f"rerank_curves_{args.to}_{args.split}_seed{args.seed}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
