"""Judge an any-to-any model on the world: every direction scored by judges nobody here trained.

The model is seen through :class:`~anyloom.evaluation.directions.AnyToAny` (four batched directions), so the
harness can be tested with a judge-perfect generator (100%) and a random one (~chance) and then applied to a
real run unchanged.

Metrics (the names are the ``eval.json`` contract, see DESIGN.md):

- ``t2i.attr_acc``: fraction of generated images whose judged (count, colour, shape) equals the prompt's;
  ``t2i.{count,color,shape}_acc`` per attribute; ``t2i.unreadable``: images the judge could not read.
- ``i2t.exact``: generated caption equals the reference caption (after whitespace/case normalisation);
  ``i2t.{count,color,shape}_acc`` on parsed captions; ``i2t.unparseable``: outputs that are not captions.
- ``a2t.wer``: word error rate of text generated from speech, against the caption.
- ``t2a.asr_wer``: the ASR judge's WER on generated speech; ``t2a.asr_wer_ground_truth``: the same judge on
  the original speech of the same captions (the floor a perfect model would reach);
  ``t2a.asr_wer_ratio`` = generated / ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from anyloom.evaluation.directions import AnyToAny, batches, per_split


@dataclass
class WorldItem:
    caption: str
    count: int
    color: str
    shape: str
    pixels: np.ndarray | None  # (H, W, 3) uint8
    wave: np.ndarray | None  # (T,) float32
    sample_rate: int = 16000
    id: str = ""


def items_from_documents(documents: Sequence) -> list[WorldItem]:
    """World manifest Documents (text, image, audio segments + meta) -> WorldItems."""
    from anyloom.data.document import AudioSegment, ImageSegment, TextSegment

    items = []
    for doc in documents:
        caption, image, audio = doc.first(TextSegment), doc.first(ImageSegment), doc.first(AudioSegment)
        text = caption.text if caption else None
        meta = doc.meta or {}
        if text is None or not {"count", "color", "shape"} <= set(meta):
            raise ValueError(f"document {doc.id!r} is not a world item (needs a caption and count/color/shape meta)")
        items.append(WorldItem(
            caption=text, count=int(meta["count"]), color=str(meta["color"]), shape=str(meta["shape"]),
            pixels=image.pixels if image else None, wave=audio.wave if audio else None,
            sample_rate=audio.sample_rate if audio else 16000, id=doc.id,
        ))
    return items


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def eval_text_to_image(model: AnyToAny, items: list[WorldItem], batch_size: int = 32) -> dict[str, float]:
    from anyloom.world.judge import judge_image

    hits = {"attr": 0, "count": 0, "color": 0, "shape": 0, "unreadable": 0}
    for batch in batches(items, batch_size, "text->image"):
        images = model.text_to_image([it.caption for it in batch])
        for it, img in zip(batch, images):
            seen = judge_image(img)
            if seen is None:
                hits["unreadable"] += 1
                continue
            hits["count"] += seen.count == it.count
            hits["color"] += seen.color == it.color
            hits["shape"] += seen.shape == it.shape
            hits["attr"] += (seen.count, seen.color, seen.shape) == (it.count, it.color, it.shape)
    n = max(1, len(items))
    return {"attr_acc": hits["attr"] / n, "count_acc": hits["count"] / n, "color_acc": hits["color"] / n,
            "shape_acc": hits["shape"] / n, "unreadable": hits["unreadable"] / n, "n": len(items)}


def eval_image_to_text(model: AnyToAny, items: list[WorldItem], batch_size: int = 64) -> dict[str, float]:
    from anyloom.world.captions import parse_caption

    hits = {"exact": 0, "count": 0, "color": 0, "shape": 0, "unparseable": 0}
    for batch in batches(items, batch_size, "image->text"):
        texts = model.image_to_text([it.pixels for it in batch])
        for it, text in zip(batch, texts):
            hits["exact"] += _normalise(text) == _normalise(it.caption)
            try:
                got = parse_caption(text)
            except ValueError:
                hits["unparseable"] += 1
                continue
            hits["count"] += got.count == it.count
            hits["color"] += got.color == it.color
            hits["shape"] += got.shape == it.shape
    n = max(1, len(items))
    return {"exact": hits["exact"] / n, "count_acc": hits["count"] / n, "color_acc": hits["color"] / n,
            "shape_acc": hits["shape"] / n, "unparseable": hits["unparseable"] / n, "n": len(items)}


def eval_speech_to_text(model: AnyToAny, items: list[WorldItem], batch_size: int = 64) -> dict[str, float]:
    from anyloom.world.asr import word_error_rate

    refs, hyps = [], []
    for batch in batches(items, batch_size, "speech->text"):
        hyps += model.speech_to_text([it.wave for it in batch], batch[0].sample_rate)
        refs += [it.caption for it in batch]
    exact = sum(_normalise(h) == _normalise(r) for r, h in zip(refs, hyps)) / max(1, len(refs))
    return {"wer": word_error_rate(refs, hyps), "exact": exact, "n": len(items)}


def eval_text_to_speech(
    model: AnyToAny, items: list[WorldItem], judge, batch_size: int = 32
) -> dict[str, float]:
    """``judge``: a SpeechJudge (``transcribe(waves, sample_rate) -> list[str]``)."""
    from anyloom.world.asr import word_error_rate

    refs, generated, original = [], [], []
    for batch in batches(items, batch_size, "text->speech"):
        waves, sr = model.text_to_speech([it.caption for it in batch])
        generated += judge.transcribe(waves, sr)
        original += judge.transcribe([it.wave for it in batch], batch[0].sample_rate)
        refs += [it.caption for it in batch]
    wer_gen, wer_gt = word_error_rate(refs, generated), word_error_rate(refs, original)
    return {"asr_wer": wer_gen, "asr_wer_ground_truth": wer_gt,
            "asr_wer_ratio": wer_gen / wer_gt if wer_gt > 0 else (0.0 if wer_gen == 0 else float("inf")),
            "n": len(items)}


def eval_mixed_replies(model: Any, items: list[WorldItem], judge: Any) -> dict[str, float]:
    """Each item's caption with ``to="any"`` (``model.reply(captions)`` -> replies with ``segments``): how often the
    model answers with a picture, with speech, whether its first picture shows the caption (the image judge) and its
    first utterance says it (``judge``'s transcript equals the caption), and both at once."""
    from anyloom.world.judge import judge_image

    hits = {"picture": 0, "speech": 0, "picture_right": 0, "speech_right": 0, "both": 0}
    for batch in batches(items, 16, "mixed replies"):
        for it, reply in zip(batch, model.reply([it.caption for it in batch])):
            pictures = [s for s in reply.segments if hasattr(s, "image")]
            speech = [s for s in reply.segments if hasattr(s, "wave")]
            picture_right = speech_right = False
            if pictures:
                hits["picture"] += 1
                seen = judge_image(np.asarray(pictures[0].image.convert("RGB")))
                picture_right = seen is not None and (seen.count, seen.color, seen.shape) == (it.count, it.color,
                                                                                              it.shape)
            if speech:
                hits["speech"] += 1
                heard = judge.transcribe([speech[0].wave], speech[0].sample_rate)[0]
                speech_right = _normalise(heard) == _normalise(it.caption)
            hits["picture_right"] += picture_right
            hits["speech_right"] += speech_right
            hits["both"] += picture_right and speech_right
    n = max(1, len(items))
    return {"with_picture": hits["picture"] / n, "with_speech": hits["speech"] / n,
            "picture_acc": hits["picture_right"] / n, "speech_exact": hits["speech_right"] / n,
            "both": hits["both"] / n, "n": len(items)}


def evaluate_world(
    model: AnyToAny,
    splits: dict[str, list[WorldItem]],
    speech_judge=None,
    directions: Sequence[str] = ("t2i", "i2t", "a2t", "t2a"),
    batch_size: int = 0,
) -> dict[str, dict]:
    """Scores per direction for the ``test`` split at the top level and every other split under its name;
    ``batch_size`` prompts per generation call (0: each direction's default)."""
    sized = {"batch_size": batch_size} if batch_size else {}
    if "t2a" in directions and speech_judge is None:
        from anyloom.world.asr import SpeechJudge

        speech_judge = SpeechJudge()

    def score(items: list[WorldItem]) -> dict[str, dict]:
        scores: dict[str, dict] = {}
        if "t2i" in directions:
            scores["t2i"] = eval_text_to_image(model, items, **sized)
        if "i2t" in directions:
            scores["i2t"] = eval_image_to_text(model, items, **sized)
        if "a2t" in directions:
            scores["a2t"] = eval_speech_to_text(model, items, **sized)
        if "t2a" in directions:
            scores["t2a"] = eval_text_to_speech(model, items, speech_judge, **sized)
        return scores

    return per_split(splits, score)
