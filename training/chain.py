"""The recipe chain behind `make train`: each stage reads its own recipe slice and is skipped when up to date.

    data -> text_tokenizer -> image_tokenizer -> image_matcher -> audio_tokenizer -> pretokenize -> lm -> export
          -> eval

(plus two optional decoder stages: ``diffusion_decoder`` after ``image_tokenizer``, recipes/diffusion_decoder.yaml,
and ``vocoder`` after ``audio_tokenizer``, recipes/vocoder.yaml).
The image matcher scores text->image candidates (``generation.image_scorers``); it needs only the two tokenizers.

Where things go (``run`` = ``runs/<name>/``):

- data: the world in ``<world.root>/<fingerprint>/`` (shared by every run with the same world config); OpenMoji and
  the user's manifests prepared in ``<data.root>/<key>/`` (``data/prepare.py``: one manifest per split, a skip
  report); a modality the data lacks (no pictures, no recordings) skips the stages that need it;
- tokenizers: ``run/stages/<stage>/tokenizer/`` (each stage a run directory of its own: metrics, samples);
- the image matcher: ``run/stages/image_matcher/matcher/`` (+ ``matcher_val.json`` beside it);
- token shards: ``run/tokens/<split>/`` (cached on the tokenizers' and the data's hashes);
- the LM: ``run/checkpoints/`` (DCP, resumable), ``run/metrics.jsonl``; ``run/export/`` after export;
- evaluation: ``run/eval.json``, ``run/samples/eval/``; the stage timing table: ``run/summary.md``
  (``run/timings.json``): each stage's seconds are those of the invocation that did its work, an up-to-date stage
  keeps them, and a resumed LM adds its earlier part.

Under torchrun only the ``lm`` stage runs on every rank; rank 0 runs the other stages while the others wait
for its marker file (the process group belongs to the LM stage).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anyloom.config import fingerprint, to_dict
from anyloom.recipes.schema import STAGES, Recipe
from anyloom.training.distributed import is_main, world_size
from anyloom.training.run import RunDir


@dataclass
class Outcome:
    """What a stage reports: a line for the log and the summary, whether it found its output up to date (and did no
    work), and whether it continued work an earlier invocation began (a resumed LM)."""

    text: str
    up_to_date: bool = False
    continued: bool = False


@dataclass
class Context:
    recipe: Recipe
    run: RunDir
    artifacts: dict[str, Any] = field(default_factory=dict)  # what earlier stages produced
    timings: list[dict[str, Any]] = field(default_factory=list)


def _need(ctx: Context, key: str, stage: str) -> Any:
    if key not in ctx.artifacts:
        raise RuntimeError(f"stage '{stage}' needs '{key}', which an earlier stage produces; add that stage to "
                           f"pipeline.stages (order: {', '.join(STAGES)})")
    return ctx.artifacts[key]


def _text_segments(manifest: Path) -> list[str]:
    """Caption texts of a JSONL manifest, without decoding its images and audio."""
    texts = []
    with open(manifest, encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{manifest}:{lineno}: not a JSON object ({e.msg})") from e
            texts += [s["text"] for s in doc.get("segments", []) if isinstance(s, dict) and "text" in s]
    return texts


def build_data(recipe: Recipe, log: Callable[[str], None] = print) -> Any:
    """The data stage's output, by ``data.source``: the world (generated, with its own judges), or documents
    prepared from manifests (OpenMoji's, written once by its generator, or the user's).

    Either has ``dir``, ``splits``, ``split(name)`` (a JSONL manifest) and ``modalities``.
    """
    source = recipe.data.source
    if source == "world":
        from anyloom.world.dataset import build_world

        return build_world(recipe.world)
    from anyloom.data.prepare import prepare_data

    data = recipe.data
    if source == "openmoji":
        from anyloom.data.openmoji import build_openmoji

        emoji = build_openmoji(recipe.openmoji)
        data = dataclasses.replace(data, train=str(emoji.train), val=str(emoji.val), test=str(emoji.test))
    image_size, sample_rate = tuple(recipe.image_tokenizer.model.image_size), recipe.audio_tokenizer.sample_rate
    if recipe.init.from_ is not None:  # the pictures and recordings the start's own tokenizers take
        from anyloom.training.init import media_sizes

        image_size, sample_rate = media_sizes(recipe.init, image_size, sample_rate)
    return prepare_data(data, image_size, sample_rate, log=log)


def _has(data: Any, modality: str) -> bool:
    return modality in data.modalities


def _untouched(folder: Path, since: float) -> bool:
    """True when ``folder`` exists and no file in it was written at or after ``since`` (a time.time())."""
    return folder.is_dir() and all(f.stat().st_mtime < since for f in folder.rglob("*") if f.is_file())


# ---- stages --------------------------------------------------------------------------------------------------
def stage_data(ctx: Context) -> Outcome:
    t0 = time.time()
    data = build_data(ctx.recipe)
    ctx.artifacts["data"] = data
    about = f" ({data.summary()})" if hasattr(data, "summary") else ""
    return Outcome(f"{data.dir}{about}", up_to_date=_untouched(Path(data.dir), t0))


def _lacks(ctx: Context, modality: str, stage: str) -> Outcome | None:
    """A skip when the data holds no ``modality`` (its tokenizer, and what needs it, has nothing to learn from)."""
    if _has(_need(ctx, "data", stage), modality):
        return None
    return Outcome(f"skipped: the training data holds no {'pictures' if modality == 'image' else 'recordings'}",
                   up_to_date=True)


def _start(ctx: Context) -> Any:
    """The model ``init.from`` names (``training/init.py``), read once; None without one."""
    from anyloom.training.init import read_start

    if ctx.recipe.init.from_ is None:
        return None
    if "start" not in ctx.artifacts:
        ctx.artifacts["start"] = read_start(ctx.recipe.init, ctx.recipe.model, weights=is_main())
    return ctx.artifacts["start"]


def _given_tokenizer(ctx: Context, modality: str) -> Outcome:
    """With ``init.from``: the start's ``modality`` tokenizer, copied into the run where the stage would put it."""
    import shutil

    from anyloom.training.init import tokenizer_folder

    stage = f"{modality}_tokenizer"
    start = _start(ctx)
    folder = tokenizer_folder(start.export, modality)
    if folder is None:
        raise ValueError(f"init.from {ctx.recipe.init.from_}: the model has no {modality} tokenizer, but the "
                         f"training data holds {modality}; its vocabulary has no {modality} ids to give them")
    out = ctx.run.stage(stage).path / "tokenizer"
    key = fingerprint({"from": str(folder.resolve()), "files": sorted(
        (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file())})
    stamp = out / "copied_from.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        ctx.artifacts[stage] = out
        return Outcome(f"{out} (up to date, from {folder})", up_to_date=True)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("copied_from.json"))
    stamp.write_text(json.dumps({"key": key, "from": str(folder)}) + "\n")
    ctx.artifacts[stage] = out
    return Outcome(f"{out} (from {folder}, init.from)")


def stage_text_tokenizer(ctx: Context) -> Outcome:
    from anyloom.tokenizers.text import TextTokenizer

    if _start(ctx) is not None:
        return _given_tokenizer(ctx, "text")
    data = _need(ctx, "data", "text_tokenizer")
    out = ctx.run.stage("text_tokenizer").path / "tokenizer"
    stamp = out / "trained_on.json"
    key = fingerprint({"config": ctx.recipe.text_tokenizer, "data": str(data.dir)})
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        ctx.artifacts["text_tokenizer"] = out
        return Outcome(f"{out} (up to date)", up_to_date=True)
    tok = TextTokenizer.train(_text_segments(Path(data.train)), config=ctx.recipe.text_tokenizer)
    tok.save(out)
    stamp.write_text(json.dumps({"key": key}) + "\n")
    ctx.artifacts["text_tokenizer"] = out
    return Outcome(f"{out} ({tok.vocab_size} pieces)")


def stage_image_tokenizer(ctx: Context) -> Outcome:
    from anyloom.training.image_tokenizer import train_image_tokenizer

    if skip := _lacks(ctx, "image", "image_tokenizer"):
        return skip
    if _start(ctx) is not None:
        return _given_tokenizer(ctx, "image")
    data = _need(ctx, "data", "image_tokenizer")
    t0 = time.time()
    out = train_image_tokenizer(ctx.recipe.image_tokenizer, data.train, data.val, ctx.run.stage("image_tokenizer"))
    ctx.artifacts["image_tokenizer"] = out
    return Outcome(str(out), up_to_date=_untouched(out, t0))


def stage_diffusion_decoder(ctx: Context) -> Outcome:
    from anyloom.tokenizers.registry import load_tokenizer
    from anyloom.training.diffusion_decoder import train_diffusion_decoder

    if skip := _lacks(ctx, "image", "diffusion_decoder"):
        return skip
    data = _need(ctx, "data", "diffusion_decoder")
    tokenizer = load_tokenizer("image", _need(ctx, "image_tokenizer", "diffusion_decoder"))
    t0 = time.time()
    out = train_diffusion_decoder(ctx.recipe.diffusion_decoder, tokenizer, data.train, data.val,
                                  ctx.run.stage("diffusion_decoder"))
    ctx.artifacts["diffusion_decoder"] = out
    return Outcome(str(out), up_to_date=_untouched(out, t0))


def stage_image_matcher(ctx: Context) -> Outcome:
    from anyloom.tokenizers.registry import load_tokenizer
    from anyloom.training.matcher import train_matcher

    if skip := _lacks(ctx, "image", "image_matcher"):
        return skip
    data = _need(ctx, "data", "image_matcher")
    image_folder = _need(ctx, "image_tokenizer", "image_matcher")
    text = load_tokenizer("text", _need(ctx, "text_tokenizer", "image_matcher"))
    result = train_matcher(ctx.recipe.image_matcher, load_tokenizer("image", image_folder), text, data.train,
                           data.val, ctx.run.stage("image_matcher"), image_tokenizer_folder=image_folder)
    ctx.artifacts["image_matcher"] = result.folder
    state = "up to date, " if result.up_to_date else ""
    return Outcome(f"{result.folder} ({state}{result.steps} steps, val top-1 {result.val_top1:.3f})",
                   up_to_date=result.up_to_date)


def stage_audio_tokenizer(ctx: Context) -> Outcome:
    from anyloom.device import pick_device
    from anyloom.training.audio_tokenizer import train_audio_tokenizer

    if skip := _lacks(ctx, "audio", "audio_tokenizer"):
        return skip
    if _start(ctx) is not None:
        return _given_tokenizer(ctx, "audio")
    data = _need(ctx, "data", "audio_tokenizer")
    t0 = time.time()
    out = train_audio_tokenizer(ctx.recipe.audio_tokenizer, data.train, data.val, ctx.run.stage("audio_tokenizer"),
                                seed=ctx.recipe.run.seed, device=pick_device(ctx.recipe.run.device))
    ctx.artifacts["audio_tokenizer"] = out
    return Outcome(str(out), up_to_date=_untouched(out, t0))


def stage_vocoder(ctx: Context) -> Outcome:
    from anyloom.device import pick_device
    from anyloom.tokenizers.audio_mel import MelTokenizer
    from anyloom.tokenizers.registry import load_tokenizer
    from anyloom.training.vocoder import train_vocoder

    if skip := _lacks(ctx, "audio", "vocoder"):
        return skip
    data = _need(ctx, "data", "vocoder")
    folder = _need(ctx, "audio_tokenizer", "vocoder")
    tokenizer = load_tokenizer("audio", folder)
    if not isinstance(tokenizer, MelTokenizer):
        return Outcome(f"skipped: the audio tokenizer ({type(tokenizer).__name__}) decodes waves itself; a vocoder "
                       "needs mel frames (audio_tokenizer.kind: mel_rvq)", up_to_date=True)
    t0 = time.time()
    out = train_vocoder(ctx.recipe.vocoder, tokenizer, folder, data.train, data.val, ctx.run.stage("vocoder"),
                        seed=ctx.recipe.run.seed, device=pick_device(ctx.recipe.run.device))
    ctx.artifacts["vocoder"] = out
    return Outcome(str(out), up_to_date=_untouched(out, t0))


def load_tokenizers(ctx: Context) -> dict[str, Any]:
    from anyloom.tokenizers.registry import load_tokenizer

    data = _need(ctx, "data", "pretokenize")
    return {m: load_tokenizer(m, _need(ctx, f"{m}_tokenizer", "pretokenize")) if _has(data, m) else None
            for m in ("text", "image", "audio")}


def stage_pretokenize(ctx: Context) -> Outcome:
    from anyloom.data.manifest import iter_manifest
    from anyloom.sequences.pretokenize import pretokenize
    from anyloom.sequences.vocab import Vocabulary

    data = _need(ctx, "data", "pretokenize")
    toks = load_tokenizers(ctx)
    seq = ctx.recipe.sequences
    start = _start(ctx)
    if start is not None:  # the start's id space, as it is (its layout may hold what the recipe cannot say)
        vocab = start.vocab
        _check_start_tokenizers(vocab, toks, start.export)
    else:
        vocab = Vocabulary.from_tokenizers(toks["text"], toks["image"], toks["audio"],
                                           image_row_end=seq.image_row_end, audio_pattern=seq.audio_pattern,
                                           bidirectional=seq.bidirectional)
    counts = {}
    t0 = time.time()
    for split in data.splits:
        manifest = Path(data.split(split))
        if not manifest.is_file() or manifest.stat().st_size == 0:
            continue
        docs = iter_manifest(manifest)  # streamed, a shard at a time
        result = pretokenize(docs, ctx.run.path / "tokens" / split, text=toks["text"], image=toks["image"],
                             audio=toks["audio"], config=seq.pretokenize, data_key=f"{data.dir.name}/{split}",
                             total=data.counts.get(split))
        counts[split] = len(result.shards)
    vocab.save(ctx.run.path / "vocab.json")
    ctx.artifacts["vocab"] = vocab
    return Outcome(", ".join(f"{k} {v}" for k, v in counts.items()) + f" items; vocabulary {vocab.size} ids",
                   up_to_date=_untouched(ctx.run.path / "tokens", t0))


def _check_start_tokenizers(vocab: Any, toks: dict[str, Any], where: Path) -> None:
    sizes = {"text": (vocab.text_size, "vocab_size"), "image": (vocab.image_codebook_size, "codebook_size"),
             "audio": (vocab.audio_codebook_size, "codebook_size")}
    for modality, tok in toks.items():
        want, attr = sizes[modality]
        if tok is not None and int(getattr(tok, attr)) != want:
            raise ValueError(f"init.from {where}: its {modality} tokenizer has {attr} {getattr(tok, attr)} but its "
                             f"vocabulary expects {want}")


def lm_model_config(model: Any, vocab: Any) -> Any:
    """The recipe's model config ``model`` with exactly the vocabulary size the tokenizers produced and, with
    ``model.grid_positions``, the image code ids, <boi> and codes per image that grid positions are read from (with
    ``model.code_factors``, the image code ids the factors describe)."""
    model = dataclasses.replace(model, vocab_size=vocab.size)
    if model.code_factors:
        if vocab.image_codebook_size == 0:
            raise ValueError("model.code_factors: the vocabulary has no image codes to factorise")
        model = dataclasses.replace(model, grid_token_range=vocab.image_range)
        model.check_code_factors()
    if not model.grid_positions:
        return model
    if vocab.image_codebook_size == 0:
        raise ValueError("model.grid_positions: the vocabulary has no image codes to give grid positions to")
    if vocab.image_row_end:
        raise ValueError("model.grid_positions with image_row_end: row ends break the run of codes a grid "
                         "position is counted along; use one or the other")
    return dataclasses.replace(model, grid_token_range=vocab.image_range, grid_start_token=vocab.boi,
                               grid_size=vocab.image_tokens_per_image)


def stage_lm(ctx: Context) -> Outcome:
    from anyloom.sequences.interleave import bidirectional_span_ids
    from anyloom.sequences.mixture import TaskMixture
    from anyloom.sequences.packing import PackedLoader
    from anyloom.sequences.shards import TokenShards
    from anyloom.sequences.vocab import Vocabulary
    from anyloom.training.lm import micro_batch_size, train_lm

    r = ctx.recipe
    quantizer = r.image_tokenizer.model.quantizer
    if r.model.code_factors and quantizer.kind == "fsq" and list(r.model.code_factors) != list(quantizer.fsq_levels):
        raise ValueError(f"model.code_factors {list(r.model.code_factors)} must be the image tokenizer's FSQ levels "
                         f"(image_tokenizer.model.quantizer.fsq_levels {list(quantizer.fsq_levels)}), in that order")
    seed = r.run.seed if r.train.seed is None else r.train.seed
    vocab = ctx.artifacts.get("vocab") or Vocabulary.load(ctx.run.path / "vocab.json")
    shards = TokenShards(ctx.run.path / "tokens" / "train")
    mixture = TaskMixture(shards, vocab, r.sequences.mixture)

    def make_loader(rank: int, ranks: int) -> PackedLoader:
        return PackedLoader(mixture, r.train.seq_len, micro_batch_size(r.train, ranks), rank=rank, world_size=ranks,
                            seed=seed, whole_documents=r.train.whole_documents, pad_id=vocab.pad,
                            span_rule=functools.partial(bidirectional_span_ids, vocab))

    start = _start(ctx)
    if start is not None and r.train.seq_len > start.config.max_seq_len:
        raise ValueError(f"train.seq_len {r.train.seq_len} is longer than the context of init.from "
                         f"({start.config.max_seq_len} positions)")
    model_cfg = start.config if start is not None else lm_model_config(r.model, vocab)
    result = train_lm(model_cfg, r.optim, r.train, r.parallel, ctx.run, make_loader, vocab.to_dict(), seed,
                      device=r.run.device, init=r.init if start is not None else None,
                      initial_state=start.state if start is not None else None,
                      data_key=fingerprint({"tokens": shards.key, "mixture": r.sequences.mixture}))
    ctx.artifacts["lm"] = result
    if getattr(result, "interrupted", False):
        raise KeyboardInterrupt(f"LM training stopped at step {result.step} with its checkpoint saved")
    budget = f" (stopped by train.max_seconds={r.train.max_seconds:g})" if result.budget_spent else ""
    if result.resumed_from and result.step == result.resumed_from:
        return Outcome(f"step {result.step} (up to date)", up_to_date=True)
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
    return Outcome(f"step {result.step}{resumed}{budget}", continued=result.resumed_from > 0)


def stage_export(ctx: Context) -> Outcome:
    from anyloom.training.checkpoint import latest_checkpoint
    from anyloom.training.export import checkpoint_digest, export
    from anyloom.weights import read_metadata

    ckpt = latest_checkpoint(ctx.run.checkpoints)
    if ckpt is None:
        raise RuntimeError(f"{ctx.run.checkpoints}: no complete checkpoint to export; run the 'lm' stage first")
    out = ctx.run.path / "export"
    # up to date only when exported from this very checkpoint: its path and step alone would pass off the export
    # of an earlier training that reached the same step (checkpoints moved away and the run trained afresh)
    meta = read_metadata(out)
    if meta.get("source") == str(ckpt.path) and meta.get("source_digest") == checkpoint_digest(ckpt.path):
        ctx.artifacts["export"] = out
        return Outcome(f"{out} (from {ckpt.name}, up to date)", up_to_date=True)
    out = export(ckpt.path, out)
    ctx.artifacts["export"] = out
    return Outcome(f"{out} (from {ckpt.name})")


def stage_eval(ctx: Context) -> Outcome:
    from anyloom.evaluation.run_eval import evaluate_run

    result = evaluate_run(ctx.run.path, ctx.recipe.eval, _need(ctx, "data", "eval"), ctx.recipe.generation)
    headline = {k: result.scores.get(k, {}) for k in ("t2i", "i2t", "a2t", "t2a")}
    parts = [f"{d}: " + ", ".join(f"{m}={v:.3f}" for m, v in s.items() if isinstance(v, float) and m != "n")
             for d, s in headline.items() if s]
    text = "; ".join(parts) or "no directions evaluated"
    return Outcome(text + (" (up to date)" if result.up_to_date else ""), up_to_date=result.up_to_date)


STAGE_FUNCTIONS: dict[str, Callable[[Context], Outcome]] = {
    "data": stage_data,
    "text_tokenizer": stage_text_tokenizer,
    "image_tokenizer": stage_image_tokenizer,
    "diffusion_decoder": stage_diffusion_decoder,
    "image_matcher": stage_image_matcher,
    "audio_tokenizer": stage_audio_tokenizer,
    "vocoder": stage_vocoder,
    "pretokenize": stage_pretokenize,
    "lm": stage_lm,
    "export": stage_export,
    "eval": stage_eval,
}
assert tuple(STAGE_FUNCTIONS) == STAGES


# ---- running ---------------------------------------------------------------------------------------------------
def _wait_for(marker: Path, timeout_s: float = 24 * 3600) -> None:
    start = time.time()
    while not marker.exists():
        if time.time() - start > timeout_s:
            raise TimeoutError(f"rank {os.environ.get('RANK')}: rank 0 did not finish the data stages ({marker})")
        time.sleep(2)


def summary_markdown(ctx: Context, records: list[dict[str, Any]] | None = None) -> str:
    """The stage table of ``records`` (default: this invocation's) and the run's eval.json."""
    records = ctx.timings if records is None else records
    total = sum(t["seconds"] for t in records)
    lines = [f"# Run {ctx.run.path}", "",
             "Seconds are each stage's own work: an up-to-date stage keeps those of the run that made its output, and "
             "a resumed LM counts its earlier part.", "",
             "| stage | seconds | result |", "|---|---:|---|"]
    lines += [f"| {t['stage']} | {t['seconds']:.1f} | {t['result']} |" for t in records]
    lines += [f"| **total** | {total:.1f} | |", ""]
    eval_file = ctx.run.path / "eval.json"
    if eval_file.is_file():
        lines += ["## eval.json", "", "```json", eval_file.read_text().strip(), "```", ""]
    return "\n".join(lines)


def _earlier_timings(run: RunDir) -> dict[str, dict[str, Any]]:
    """The stage records of earlier invocations (``timings.json``), by stage; {} when there are none."""
    path = run.path / "timings.json"
    try:
        records = json.loads(path.read_text()) if path.is_file() else []
    except json.JSONDecodeError:
        return {}
    return {r["stage"]: r for r in records if isinstance(r, dict) and "stage" in r and "seconds" in r}


def _record(name: str, outcome: Outcome, seconds: float, earlier: dict[str, Any] | None) -> dict[str, Any]:
    """A stage's timing record: ``seconds``, its own work's, kept from ``earlier`` when it was up to date, and added
    to the earlier part when it continued it (or when the earlier invocation was interrupted in it); ``elapsed``,
    this invocation's."""
    elapsed, before = seconds, (float(earlier["seconds"]) if earlier else 0.0)
    if outcome.up_to_date and earlier and not earlier.get("interrupted"):
        seconds = before
    elif outcome.continued and earlier:
        seconds += before
    return {"stage": name, "seconds": round(seconds, 1), "elapsed": round(elapsed, 1), "result": outcome.text,
            "up_to_date": outcome.up_to_date}


def _write_summary(ctx: Context, records: list[dict[str, Any]], earlier: dict[str, dict[str, Any]]) -> None:
    """summary.md and timings.json: ``records`` and, for the stages this invocation did not reach or run, the
    earlier invocations' records, in stage order."""
    if is_main():
        by_stage = {**earlier, **{r["stage"]: r for r in records}}
        merged = [by_stage[s] for s in STAGES if s in by_stage]
        (ctx.run.path / "summary.md").write_text(summary_markdown(ctx, merged))
        (ctx.run.path / "timings.json").write_text(json.dumps(merged, indent=2) + "\n")


def run_pipeline(recipe: Recipe, run: RunDir, log: Callable[[str], None] = print) -> Context:
    """Run the recipe's ``pipeline.stages`` in order; print a line per stage and write ``summary.md``."""
    ctx = Context(recipe, run)
    stages = list(recipe.pipeline.stages)
    earlier = _earlier_timings(run)
    distributed = world_size() > 1
    # One marker per torchrun invocation (TORCHELASTIC_RUN_ID), so a marker left by an earlier run never counts.
    marker = run.path / f".data_ready-{os.environ.get('TORCHELASTIC_RUN_ID', 'local')}-{fingerprint(to_dict(recipe))}"
    for i, name in enumerate(stages, 1):
        on_all_ranks = name == "lm"
        if distributed and not on_all_ranks and not is_main():
            continue
        if distributed and on_all_ranks and not is_main():
            _wait_for(marker)  # the lm stage reads rank 0's vocab.json and token shards from the run directory
        if distributed and on_all_ranks and is_main():
            marker.write_text("ready\n")
        log(f"[{i}/{len(stages)}] {name} ...")
        t0 = time.time()
        try:
            outcome = STAGE_FUNCTIONS[name](ctx)
        except KeyboardInterrupt:  # the stage's time so far counts towards its total when it is resumed
            before = earlier.get(name, {})
            seconds = time.time() - t0 + (float(before["seconds"]) if before.get("interrupted") else 0.0)
            record = {"stage": name, "seconds": round(seconds, 1), "result": "interrupted", "interrupted": True}
            _write_summary(ctx, [*ctx.timings, record], earlier)
            raise
        seconds = time.time() - t0
        if earlier.get(name, {}).get("interrupted"):
            outcome.continued = True  # an interrupted stage that finishes now: its earlier part counts
        ctx.timings.append(_record(name, outcome, seconds, earlier.get(name)))
        log(f"[{i}/{len(stages)}] {name}: {outcome.text} ({seconds:.1f} s)")
        _write_summary(ctx, ctx.timings, earlier)
    return ctx
