"""`make eval RUN=runs/<name>`: score a trained run on its data's held-out splits and write ``eval.json``.

Which judges: the world's exact ones (``anyloom.world.evaluate``) when the data says ``judges = "world"`` (the
world's paths do), else the generic evaluation of any documents (``anyloom.evaluation.generic_eval``: retrieval,
WER/BLEU/chrF, a general ASR model relative to the ground-truth speech); every other data source goes there.

The generation API (``anyloom.generation.pipeline``) is wrapped as an :class:`~anyloom.world.evaluate.AnyToAny`
model; the tokenizers' reconstruction metrics are added under ``image_tokenizer.*`` and ``audio_tokenizer.*``, and
the LM's held-out perplexity per modality under ``lm.*`` (``lm.ppl.text``, ``lm.ppl.image``, ``lm.ppl.audio``;
see ``anyloom.evaluation.lm_perplexity``).
Also written: ``eval.md`` (a table), ``samples/eval/t2i_<split>.png`` (prompt -> image sheets), a few
``samples/eval/t2a_*.wav``, ``eval_settings.json`` (the settings and a fingerprint of the weights the numbers
belong to), and the training curves ``plots/loss.png`` and ``plots/metrics.png``.

Where: an evaluation with the run recipe's own ``eval`` and ``generation`` settings writes into the run directory;
any other (a ``limit``, fewer splits, other sampling) writes into ``<run>/evals/<its differences>-<hash>/``
(:func:`eval_folder`), so a partial evaluation never replaces the full one. An evaluation whose settings and
weights match the ``eval_settings.json`` already in its folder is up to date and is not run again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anyloom.config import added_field, fingerprint, to_dict
from anyloom.evaluation import generic_eval
from anyloom.world.evaluate import evaluate_world, items_from_documents


@dataclass(frozen=True)
class EvalConfig:
    limit: int = 0  # items per split (0: the whole split)
    splits: tuple[str, ...] = ("test", "compositional")  # "test" is reported at the top level of eval.json
    directions: tuple[str, ...] = ("t2i", "i2t", "a2t", "t2a")
    # prompts generated together; 0: each direction's own (32 to pictures and speech, whose candidates multiply the
    # rows, 64 to text)
    batch_size: int = 0
    tokenizers: bool = True  # image/audio tokenizer reconstruction metrics on the test split
    sample_sheet: int = 24  # prompt -> image pairs drawn into samples/eval/t2i_<split>.png
    seed: int = 0  # the sampling seed of every generation call here (generation.seed is make generate's, unused)
    # held-out LM perplexity per modality (lm.loss.*, lm.ppl.*; evaluation/lm_perplexity.py) on <run>/tokens/test
    perplexity: bool = True
    lm_items: int = 200  # test items scored (0: all), each under every template of lm_tasks
    lm_tasks: tuple[str, ...] = ("t2i", "i2t", "t2a", "a2t")  # templates (sequences/mixture.py); targets scored
    lm_seq_len: int = 512  # packed row length (<= the model's max_seq_len)
    lm_batch_size: int = 4  # rows per batch
    lm_batches: int = 0  # at most this many batches (0: every document of the lm_items)
    # test items whose caption asks for a mixed reply (to="any"; world judges): how often the model answers with a
    # picture and speech, and both right (world/evaluate.eval_mixed_replies); 0: not measured
    mixed_replies: int = added_field(0)
    # how a mixed-reply prompt is phrased from its caption ({caption}); a recipe that trains instruction documents
    # (world.replies) asks the way they were phrased: "draw {caption} and say it"
    reply_prompt: str = added_field("{caption}")
    # where a run has a diffusion decoder or a vocoder: decode the test split's pictures / speech and the generated
    # codes with both decoders of each kind, side by side (eval.json ``decoders``; docs/DECODERS.md). It decodes
    # everything twice more, so a recipe that has made its choice can leave it off
    compare_decoders: bool = added_field(True)

    def __post_init__(self) -> None:
        unknown = set(self.directions) - {"t2i", "i2t", "a2t", "t2a"}
        if unknown:
            raise ValueError(f"directions: unknown {sorted(unknown)}; choose from t2i, i2t, a2t, t2a")
        if self.limit < 0 or self.batch_size < 0:
            raise ValueError("limit and batch_size must be >= 0")
        from anyloom.sequences.mixture import TEMPLATES

        unknown = set(self.lm_tasks) - set(TEMPLATES)
        if unknown:
            raise ValueError(f"lm_tasks: unknown {sorted(unknown)}; choose from {', '.join(TEMPLATES)}")
        if "{caption}" not in self.reply_prompt:
            raise ValueError(f"reply_prompt must contain {{caption}}, got {self.reply_prompt!r}")
        if min(self.lm_items, self.lm_batches) < 0 or min(self.lm_seq_len, self.lm_batch_size) < 1:
            raise ValueError("lm_items and lm_batches must be >= 0, lm_seq_len and lm_batch_size >= 1")


class PipelineModel:
    """The generation pipeline seen as the four evaluated directions (greedy unless the run's config says otherwise)."""

    def __init__(self, pipe: Any, seed: int = 0, single_sample: bool = False, reply_prompt: str = "{caption}"):
        self.pipe = pipe
        self.reply_prompt = reply_prompt  # how reply() phrases each caption
        self.seed = seed
        # single_sample: also keep each output's first sample, before reranking (``firsts``), for FirstSamples
        self.single_sample = single_sample
        self.firsts: dict[str, list[list[Any]]] = {"t2i": [], "i2t": [], "a2t": [], "any": []}  # per call, in order
        self.speech_firsts: dict[str, tuple[np.ndarray, int]] = {}
        self._replies = 0  # mixed replies asked so far (their seeds)
        self.replies: list[tuple[str, Any]] = []  # (prompt, kept reply) in order, for the sample files
        # Text->image draws one image per item, not per distinct caption: the world's test split has 108 distinct
        # captions among 500 items and the compositional split 16, so one draw per caption made the score hinge on
        # ~100 (or 16) samples (text->image accuracy 13-28% across seeds on the same run; docs/BENCHMARKS.md). Each
        # call samples with its own seed; every image is logged so the sample sheets show the scored ones.
        self.images: list[tuple[str, np.ndarray]] = []  # (caption, image) in generation order
        self.codes: list[Any] = []  # each text->image call's codes, where a diffusion decoder will redraw them
        self._image_calls = 0
        # Speech is costlier to generate and judge: one draw per distinct caption, reused by the WAV samples.
        self._speech: dict[str, tuple[np.ndarray, int]] = {}
        self.speech_codes: dict[str, torch.Tensor] = {}  # per caption, where a second vocoder will voice them
        # prompts the pipeline called out of domain (words never seen in training...), per target; counted here
        # instead of one warning line per prompt
        self.out_of_domain: dict[str, int] = {}

    def _generate(self, prompts: list[Any], to: str, seed: int) -> list[Any]:
        from anyloom.generation.pipeline import OutOfDomainWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OutOfDomainWarning)
            options = {"keep_first": True} if self.single_sample else {}
            outs = self.pipe.generate_batch(prompts, to=to, seed=seed, **options)
        flagged = sum(bool(getattr(o, "warnings", None)) for o in outs)
        self.out_of_domain[to] = self.out_of_domain.get(to, 0) + flagged
        return outs

    def text_to_image(self, captions: list[str]) -> list[np.ndarray]:
        if not captions:
            return []
        outs = self._generate(captions, to="image", seed=self.seed + self._image_calls)
        self._image_calls += 1
        images = [np.asarray(o.image.convert("RGB")) for o in outs]
        self.images += zip(captions, images)
        if self.single_sample:
            self.firsts["t2i"].append([np.asarray(_first(o).image.convert("RGB")) for o in outs])
        if getattr(self.pipe, "diffusion", None) is not None:  # the other decoder redraws them (decoder_scores)
            self.codes.append(torch.stack([o.codes for o in outs]))
        return images

    def image_to_text(self, images: list[np.ndarray]) -> list[str]:
        from PIL import Image

        outs = self._generate([Image.fromarray(p) for p in images], to="text", seed=self.seed)
        if self.single_sample:
            self.firsts["i2t"].append([_first(o).text for o in outs])
        return [o.text for o in outs]

    def speech_to_text(self, waves: list[np.ndarray], sample_rate: int) -> list[str]:
        from anyloom.data.document import AudioSegment

        prompts = [AudioSegment(np.asarray(w, dtype=np.float32), sample_rate) for w in waves]
        outs = self._generate(prompts, to="text", seed=self.seed)
        if self.single_sample:
            self.firsts["a2t"].append([_first(o).text for o in outs])
        return [o.text for o in outs]

    def reply(self, captions: list[str]) -> list[Any]:
        """The captions, each phrased by ``reply_prompt``, with ``to="any"`` as one batch: the model's own mixed replies
        (each the kept one of the config's ``reply_candidates``), seeded by the number of replies asked before."""
        from anyloom.generation.pipeline import OutOfDomainWarning

        options = {"keep_first": True} if self.single_sample else {}
        prompts = [self.reply_prompt.format(caption=c) for c in captions]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OutOfDomainWarning)
            out = self.pipe.generate_batch(prompts, to="any", seed=self.seed + self._replies,
                                           **options) if prompts else []
        self._replies += len(captions)
        self.replies += zip(prompts, out)
        if self.single_sample:
            self.firsts["any"].append([_first(o) for o in out])
        return out

    def text_to_speech(self, captions: list[str]) -> tuple[list[np.ndarray], int]:
        todo = sorted({c for c in captions if c not in self._speech})
        if todo:
            outs = self._generate(todo, to="audio", seed=self.seed)
            self._speech.update({c: (o.wave, o.sample_rate) for c, o in zip(todo, outs)})
            if getattr(self.pipe, "vocoder", None) is not None:  # the other vocoder voices them (vocoder_scores)
                self.speech_codes.update({c: o.codes for c, o in zip(todo, outs)})
            if self.single_sample:
                self.speech_firsts.update({c: (_first(o).wave, _first(o).sample_rate) for c, o in zip(todo, outs)})
        got = [self._speech[c] for c in captions]
        return [w for w, _ in got], (got[0][1] if got else 16000)


def _first(output: Any) -> Any:
    """An output's first sample (``keep_first``), or the output itself when the pipeline kept none."""
    return getattr(output, "first", None) or output


class FirstSamples:
    """The evaluated directions answered by the first samples a PipelineModel kept, before reranking: replaying the
    same evaluation on it scores single-sample quality on the very same draws. ``since``: the number of calls per
    direction recorded before the evaluation being replayed."""

    def __init__(self, model: PipelineModel, since: dict[str, int]):
        self.model = model
        self.next = dict(since)

    def _pop(self, direction: str, n: int) -> list[Any]:
        calls = self.model.firsts[direction]
        if self.next[direction] >= len(calls):
            raise RuntimeError(f"{direction}: more calls than were recorded; replay the same evaluation")
        out = calls[self.next[direction]]
        self.next[direction] += 1
        if len(out) != n:
            raise RuntimeError(f"{direction}: recorded {len(out)} outputs for a call of {n}")
        return out

    def text_to_image(self, captions: list[str]) -> list[np.ndarray]:
        return self._pop("t2i", len(captions)) if captions else []

    def image_to_text(self, images: list[np.ndarray]) -> list[str]:
        return self._pop("i2t", len(images)) if images else []

    def speech_to_text(self, waves: list[np.ndarray], sample_rate: int) -> list[str]:
        return self._pop("a2t", len(waves)) if waves else []

    def reply(self, captions: list[str]) -> list[Any]:
        return self._pop("any", len(captions)) if captions else []

    def text_to_speech(self, captions: list[str]) -> tuple[list[np.ndarray], int]:
        got = [self.model.speech_firsts[c] for c in captions]
        return [w for w, _ in got], (got[0][1] if got else 16000)


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def sample_sheet(captions: list[str], images: list[np.ndarray], path: Path, columns: int = 6) -> Path:
    """A PNG grid: each generated image (upscaled 3x, nearest) above its prompt."""
    from PIL import Image, ImageDraw

    cell_w, img_h, text_h = 132, 96, 28
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell_w, max(1, rows) * (img_h + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (caption, pixels) in enumerate(zip(captions, images)):
        x, y = (i % columns) * cell_w, (i // columns) * (img_h + text_h)
        tile = Image.fromarray(pixels).resize((img_h, img_h), Image.NEAREST)
        sheet.paste(tile, (x + (cell_w - img_h) // 2, y))
        draw.text((x + 2, y + img_h + 2), caption[:22], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def tokenizer_metrics(pipe: Any, items: list[Any], speech_judge: Any, image_judge: bool = True) -> dict[str, float]:
    """Reconstruction metrics on the items' pictures and speech (those that have them). ``image_judge``: add the world
    judge's agreement (``image_tokenizer.detector_agreement``; world images only); ``speech_judge``: the ASR's WER
    on reconstructions and originals against the items' captions (None: signal metrics only)."""

    from anyloom.evaluation.asr import word_error_rate
    from anyloom.evaluation.audio_metrics import evaluate_reconstruction
    from anyloom.evaluation.image_metrics import evaluate_reconstructions
    from anyloom.tokenizers.base import reconstruct
    from anyloom.tokenizers.image_vq import float_to_uint8, uint8_to_float

    out: dict[str, float] = {}
    tok = pipe.image_tokenizer
    pictured = [it for it in items if it.pixels is not None]
    if tok is not None and pictured:
        originals = np.stack([it.pixels for it in pictured])
        rec = reconstruct(tok, uint8_to_float(originals), desc="image tokenizer: reconstructions")
        recons, codes = float_to_uint8(rec.images), rec.codes
        report = evaluate_reconstructions(originals, recons, codes, tok.codebook_size, judge=image_judge).as_eval()
        if not image_judge:
            del report["image_tokenizer.detector_agreement"]  # NaN: the world judge does not read other pictures
        out.update(report)
    atok = pipe.audio_tokenizer
    spoken = [it for it in items if it.wave is not None]
    if atok is not None and spoken:
        report = evaluate_reconstruction(atok, [it.wave for it in spoken], spoken[0].sample_rate,
                                         references=[it.caption for it in spoken] if speech_judge else None,
                                         judge=speech_judge, word_error_rate=word_error_rate)
        out.update(report.as_eval())
    return out


SETTINGS_FILE = "eval_settings.json"
DIRECTION_NAMES = {"t2i": "text->image", "i2t": "image->text", "a2t": "audio->text", "t2a": "text->audio"}


@dataclass
class EvalResult:
    scores: dict[str, Any]
    folder: Path  # where eval.json and its samples are
    up_to_date: bool = False  # an earlier evaluation with the same settings and weights was kept


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def eval_folder(run_path: str | Path, settings: dict[str, Any], recipe_settings: dict[str, Any]) -> Path:
    """Where an evaluation with ``settings`` ({"eval": ..., "generation": ...} as dicts) writes: the run directory
    when they are the run recipe's ``recipe_settings``, else ``<run>/evals/<differences>-<hash>/``, e.g.
    ``evals/limit=16,splits=test-1a2b3c4d``."""
    run_path = Path(run_path)
    ours, theirs = _flat(settings), _flat(recipe_settings)
    changed = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if not changed:
        return run_path

    def value(v: Any) -> str:
        return "+".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    words = ",".join(f"{k.split('.', 1)[1]}={value(ours.get(k))}" for k in changed)
    name = re.sub(r"[^A-Za-z0-9=.,+_-]", "_", words)[:80]
    return run_path / "evals" / f"{name}-{fingerprint(settings)[:8]}"


def weights_fingerprint(run_path: str | Path) -> str:
    """A hash of every weight and tokenizer file an evaluation of the run loads (its export, its stages' tokenizers
    and matcher): it changes whenever the numbers could."""
    run_path = Path(run_path)
    digest = hashlib.sha256()
    places = [run_path / "export", *sorted((run_path / "stages").glob("*/tokenizer")),
              run_path / "stages" / "image_matcher" / "matcher", run_path / "stages" / "diffusion_decoder" / "decoder",
              run_path / "stages" / "vocoder" / "vocoder"]
    for folder in places:
        for file in sorted(f for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else []:
            digest.update(str(file.relative_to(run_path)).encode())
            digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()[:16]


def evaluate_run(run_path: str | Path, cfg: EvalConfig, world: Any, generation: Any, *,
                 recipe_settings: dict[str, Any] | None = None, force: bool = False,
                 log: Callable[[str], None] = print) -> EvalResult:
    """Score the run's export on the data stage's splits (:func:`world_judges` picks the judges); writes eval.json +
    eval.md + sample sheets into :func:`eval_folder` and returns the scores. ``generation`` (a GenerationConfig) is
    used instead of the run's recipe ``generation:`` section, so `make eval ... generation.image.temperature=0.5`
    scores exactly those sampling settings; ``recipe_settings`` are the run recipe's own (default: these).
    ``force``: evaluate even when the folder holds an up-to-date evaluation."""
    from anyloom.training.run import RunDir, write_json

    run = RunDir(run_path)
    settings = {"eval": to_dict(cfg), "generation": to_dict(generation)}
    folder = eval_folder(run.path, settings, recipe_settings or settings)
    stamp = {**settings, "data": str(getattr(world, "dir", "")), "weights": weights_fingerprint(run.path)}
    stamp_file = folder / SETTINGS_FILE
    if not force and (folder / "eval.json").is_file() and stamp_file.is_file():
        if json.loads(stamp_file.read_text()) == json.loads(json.dumps(stamp)):
            log(f"eval: {folder / 'eval.json'} is up to date (same settings and weights); not evaluating again")
            return EvalResult(json.loads((folder / "eval.json").read_text()), folder, up_to_date=True)
    if folder != run.path:
        log(f"eval: settings differ from the run recipe's, so the results go to {folder} (the run's own "
            f"eval.json is kept)")
    scores = _evaluate(run, cfg, world, generation, folder, log)
    write_json(stamp_file, stamp)
    if folder == run.path and run.metrics_file.is_file():
        from anyloom.evaluation.plots import plot_run

        plot_run(run.path)  # <run>/plots/loss.png, metrics.png
    return EvalResult(scores, folder)


def _merge(into: dict[str, Any], scores: dict[str, Any]) -> None:
    for key, value in scores.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def world_judges(data: Any) -> bool:
    """Whether ``data`` (the data stage's paths) is scored by the world's exact judges; anything that does not say
    ``judges = "world"`` gets the generic evaluation."""
    return getattr(data, "judges", "generic") == "world"


DIRECTION_MODALITY = {"t2i": "image", "i2t": "image", "a2t": "audio", "t2a": "audio"}  # what each direction needs


@dataclass
class _Judges:
    """How one data source's outputs are judged: the world's exact judges, or the generic ones for any other data."""

    world: bool
    image_size: tuple[int, int] | None  # pictures read at this size (None: as stored)
    to_items: Callable[[list], list]  # manifest Documents -> the judges' items
    speech_judge: Any  # the ASR of t2a (and a2t for the world); None when not asked for
    ranker: Any = None  # generic t2i: the run's matcher ranking pictures against captions
    batch_size: int = 0  # prompts per generation call (EvalConfig.batch_size; 0: each direction's own)

    @property
    def reconstruction_asr(self) -> Any:
        """The ASR the tokenizer metrics read reconstructions with (the world's; signal metrics only elsewhere)."""
        return self.speech_judge if self.world else None

    def count(self, items: list, direction: str) -> int:
        return len(items) if self.world else len(generic_eval.usable(items, direction))

    def evaluate(self, model: Any, split: dict[str, list], direction: str) -> dict[str, Any]:
        if self.world:
            return evaluate_world(model, split, speech_judge=self.speech_judge, directions=[direction],
                                  batch_size=self.batch_size)
        return generic_eval.evaluate_generic(model, split, directions=[direction], ranker=self.ranker,
                                             speech_judge=self.speech_judge, batch_size=self.batch_size)


def _judges_for(data: Any, pipe: Any, cfg: EvalConfig) -> _Judges:
    if world_judges(data):
        from anyloom.world.asr import SpeechJudge

        asks_asr = bool({"t2a", "a2t"} & set(cfg.directions)) or cfg.tokenizers
        return _Judges(True, None, items_from_documents, SpeechJudge() if asks_asr else None,  # caption grammar
                       batch_size=cfg.batch_size)
    # other data: pictures at the decoder's resolution, so that generated ones compare pixel by pixel
    image_size = None if pipe.image_tokenizer is None else tuple(pipe.image_tokenizer.image_size)
    ranker = None
    if "t2i" in cfg.directions and pipe.matcher is not None and pipe.text_tokenizer is not None:
        ranker = generic_eval.MatcherRanker(pipe.matcher, pipe.text_tokenizer)
    judge = generic_eval.GeneralSpeechJudge() if "t2a" in cfg.directions else None
    return _Judges(False, image_size, generic_eval.items_from_documents, judge, ranker, batch_size=cfg.batch_size)


def _evaluate(run: Any, cfg: EvalConfig, world: Any, generation: Any, folder: Path,
              log: Callable[[str], None]) -> dict[str, Any]:
    import soundfile as sf

    from anyloom.data.manifest import read_manifest
    from anyloom.generation.pipeline import load
    from anyloom.training.run import write_json

    pipe = load(run.path, config=generation)
    vocab = getattr(pipe, "vocab", None)
    lacking = [m for m in ("image", "audio") if vocab is not None and getattr(vocab, f"{m}_codebook_size") == 0]
    if lacking:  # a run trained on data without pictures or recordings: its vocabulary has no such codes
        dropped = [d for d in cfg.directions if DIRECTION_MODALITY[d] in lacking]
        log(f"eval: the run has no {' or '.join(lacking)} codes; not evaluating {', '.join(dropped) or '-'}")
        cfg = dataclasses.replace(cfg, directions=tuple(d for d in cfg.directions if d not in dropped))
    model = PipelineModel(pipe, cfg.seed, single_sample=True, reply_prompt=cfg.reply_prompt)
    single: dict[str, Any] = {}  # the same evaluation of each output's first sample, before reranking
    judges = _judges_for(world, pipe, cfg)
    splits: dict[str, list[Any]] = {}
    for split in cfg.splits:
        docs = read_manifest(world.split(split), image_size=judges.image_size).documents
        splits[split] = judges.to_items(docs[: cfg.limit] if cfg.limit else docs)
    scores: dict[str, Any] = {}
    shown: dict[str, list[tuple[str, np.ndarray]]] = {}  # the first scored text->image (prompt, output) of each split
    test_calls = (0, 0)  # the test split's text->image calls in model.codes
    for split, items in splits.items():
        start, first_call = len(model.images), len(model.codes)
        for direction in (d for d in ("t2i", "i2t", "a2t", "t2a") if d in cfg.directions):
            log(f"eval: {split} split, {DIRECTION_NAMES[direction]} ({judges.count(items, direction)} items) ...")
            t0, flagged_before = time.perf_counter(), sum(model.out_of_domain.values())
            since = {d: len(calls) for d, calls in model.firsts.items()}
            _merge(scores, judges.evaluate(model, {split: items}, direction))
            _merge(single, judges.evaluate(FirstSamples(model, since), {split: items}, direction))
            unseen = sum(model.out_of_domain.values()) - flagged_before
            note = f"; {unseen} prompts with words or sizes never seen in training" if unseen else ""
            log(f"eval: {split} split, {DIRECTION_NAMES[direction]} done ({time.perf_counter() - t0:.0f} s{note})")
        shown[split] = model.images[start:start + cfg.sample_sheet]
        if split == "test":
            test_calls = (first_call, len(model.codes))
    mixed = [it for it in splits.get("test", [])][:cfg.mixed_replies]
    if mixed and judges.world and pipe.image_tokenizer is not None and pipe.audio_tokenizer is not None:
        from anyloom.world.asr import SpeechJudge
        from anyloom.world.evaluate import eval_mixed_replies

        with _part(log, f"test split, mixed replies ({len(mixed)} captions, to='any')"):
            since = {d: len(calls) for d, calls in model.firsts.items()}
            speech_judge = judges.speech_judge or SpeechJudge()
            scores["any"] = eval_mixed_replies(model, mixed, speech_judge)
            single["any"] = eval_mixed_replies(FirstSamples(model, since), mixed, speech_judge)
    scores["single_sample"] = single  # one sample per prompt, no reranking (greedy text), beside the reranked
    if cfg.tokenizers and "test" in splits:
        with _part(log, "tokenizer reconstructions"):
            scores.update(_nest(tokenizer_metrics(pipe, splits["test"], judges.reconstruction_asr,
                                                  image_judge=judges.world)))
    if cfg.compare_decoders and getattr(pipe, "diffusion", None) is not None and "test" in splits:
        with _part(log, "the image decoders side by side"):
            scores["decoders"] = decoder_scores(pipe, splits["test"], model.codes[slice(*test_calls)], judges.world,
                                                cfg.seed)
        if "attr_acc" in scores.get("t2i", {}) and "diffusion" in scores["decoders"]:  # the VQ's, side by side
            scores["decoders"].setdefault("vq", {})["t2i_attr_acc"] = scores["t2i"]["attr_acc"]
    if cfg.compare_decoders and getattr(pipe, "vocoder", None) is not None and "test" in splits:
        with _part(log, "the vocoders side by side"):
            scores.setdefault("decoders", {})["vocoder"] = vocoder_scores(pipe, splits["test"], model.speech_codes,
                                                                          scores.get("t2a"), judges)
    if cfg.perplexity:
        from anyloom.evaluation.lm_perplexity import run_lm_perplexity

        with _part(log, "held-out perplexity"):
            scores.update(_nest(run_lm_perplexity(pipe, run.path / "tokens" / "test", cfg).as_eval()))
    write_json(folder / "eval.json", scores)

    out_dir = folder / "samples" / "eval"
    for split, pairs in shown.items():
        if "t2i" in cfg.directions and pairs:
            sample_sheet([c for c, _ in pairs], [img for _, img in pairs], out_dir / f"t2i_{split}.png")
    write_replies(model.replies[:4], out_dir)
    spoken = [it.caption for it in splits.get("test", []) if it.caption is not None][:4]
    if "t2a" in cfg.directions and spoken:
        waves, sr = model.text_to_speech(spoken)
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, (caption, w) in enumerate(zip(spoken, waves)):
            sf.write(out_dir / f"t2a_{i}_{re.sub(r'[^A-Za-z0-9_-]', '_', caption)[:40]}.wav", w, sr)
    (folder / "eval.md").write_text(eval_markdown(scores))
    return scores


@contextlib.contextmanager
def _part(log: Callable[[str], None], what: str) -> Iterator[None]:
    """Announce one part of the evaluation and report its seconds when it is done."""
    log(f"eval: {what} ...")
    t0 = time.perf_counter()
    yield
    log(f"eval: {what} done ({time.perf_counter() - t0:.0f} s)")


def write_replies(replies: list[tuple[str, Any]], out_dir: Path) -> None:
    """Mixed replies to look at and listen to: ``any_<i>.txt`` (the prompt and the reply's text) and
    ``any_<i>_<k>.png|wav`` per picture or speech span, in the reply's order."""
    import soundfile as sf

    if replies:
        out_dir.mkdir(parents=True, exist_ok=True)
    for i, (prompt, reply) in enumerate(replies):
        (out_dir / f"any_{i}.txt").write_text(f"prompt: {prompt}\nreply: {reply.text}\n")
        for k, part in enumerate(s for s in reply.segments if hasattr(s, "image") or hasattr(s, "wave")):
            if hasattr(part, "image"):
                part.image.save(out_dir / f"any_{i}_{k}.png")
            else:
                sf.write(out_dir / f"any_{i}_{k}.wav", part.wave, part.sample_rate)


def decoder_scores(pipe: Any, items: list[Any], t2i_codes: list[Any], world: bool, seed: int,
                   max_pictures: int = 200) -> dict[str, Any]:
    """eval.json's ``decoders``: the VQ and the diffusion decoder on the same codes. Reconstructions of up to
    ``max_pictures`` test pictures (PSNR, SSIM, seconds per picture; the world judge's agreement with the
    original), and on the world the judge's text->image accuracy of the test split's generated codes drawn by each."""
    from anyloom.evaluation.decoders import RedrawnPictures, compare_decoders

    pictured = [it for it in items if it.pixels is not None][:max_pictures]
    out: dict[str, Any] = {}
    if pictured:
        cmp = compare_decoders(pipe.image_tokenizer, pipe.diffusion, np.stack([it.pixels for it in pictured]),
                               pipe.diffusion.cfg.inference_steps, seed=seed, judge=world)
        out = {"images": cmp.images, "ddim_steps": cmp.ddim_steps,
               "vq": {k: v for k, v in dataclasses.asdict(cmp.vq).items() if v is not None},
               "diffusion": {k: v for k, v in dataclasses.asdict(cmp.diffusion).items() if v is not None}}
    if world and t2i_codes:
        from anyloom.world.evaluate import eval_text_to_image

        redrawn = RedrawnPictures(pipe, t2i_codes, seed=seed)
        t2i = eval_text_to_image(redrawn, items)
        out.setdefault("diffusion", {})["t2i_attr_acc"] = t2i["attr_acc"]
        out["diffusion"]["t2i_seconds_per_image"] = redrawn.seconds / max(1, redrawn.pictures)
    return out


def vocoder_scores(pipe: Any, items: list[Any], t2a_codes: dict[str, Any], t2a: dict[str, Any] | None,
                   judges: _Judges, max_utterances: int = 100) -> dict[str, Any]:
    """eval.json's ``decoders.vocoder``: Griffin-Lim and the neural vocoder on the same codes. Reconstructions of up
    to ``max_utterances`` test recordings (ASR word error rate where the data has an exact judge, mel distance,
    SI-SNR, STOI/PESQ where installed, seconds of audio per second), and the text->speech evaluation's generated codes
    voiced by the vocoder the pipeline did not use, judged like the first (``t2a_asr_wer``)."""
    from anyloom.evaluation.decoders import RevocodedSpeech, compare_vocoders

    spoken = [it for it in items if it.wave is not None and it.caption is not None][:max_utterances]
    out: dict[str, Any] = {"griffin_lim": {}, "neural": {}}
    if spoken:
        rate = spoken[0].sample_rate
        out = compare_vocoders(pipe.audio_tokenizer, pipe.vocoder, [it.wave for it in spoken], rate,
                               [it.caption for it in spoken], judges.reconstruction_asr)
    if t2a and t2a_codes:
        used = pipe.vocoder_kind(pipe.config.vocoder)
        other = "griffin_lim" if used == "neural" else "neural"
        replayed = judges.evaluate(RevocodedSpeech(pipe.speech_decoder(other), t2a_codes), {"test": items}, "t2a")
        out[used]["t2a_asr_wer"] = t2a.get("asr_wer")
        out[other]["t2a_asr_wer"] = replayed["t2a"]["asr_wer"]
    return out


def eval_markdown(scores: dict[str, Any]) -> str:
    from anyloom.evaluation.compare import flatten

    lines = ["| metric | value |", "|---|---:|"]
    for key, value in flatten(scores).items():
        lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    return "\n".join(lines) + "\n"
