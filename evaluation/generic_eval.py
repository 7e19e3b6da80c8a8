"""Judge an any-to-any model on any data: documents of text, image and audio segments, without the world's judges.

The world has exact judges (a shape/colour reader, an ASR constrained to the caption grammar:
``anyloom.world.evaluate``); data that users bring (JSONL manifests, OpenMoji) has none, so every direction here
is scored against the split's own references by judges nobody here trained. The model is seen through the same
:class:`~anyloom.evaluation.directions.AnyToAny` protocol, so a perfect fake model scores 100% and a constant one
chance.

Items: one per document, its first text, first image and first audio (``items_from_documents``). A direction
scores the items that have what it needs (text and a picture for t2i/i2t, text and speech for a2t/t2a) and says
how many in ``n``; a split with none gets ``{"n": 0, "judge": ..., "note": ...}``. Texts are compared normalised
(:func:`normalise`: lower case, punctuation dropped, whitespace collapsed). Every block names its ``judge``.

Metrics (``eval.json``; the test split at the top level, other splits under their names):

- ``t2i.retrieval_acc`` (text -> image): the generated picture's nearest neighbour by pixel MSE (RGB in [0, 1]) among
  the pictures of the split's t2i items is the prompt's own; ``t2i.top5_acc``: it is among the 5 nearest. Ties
  count for the prompt's picture (its rank is the number of pictures strictly nearer). ``t2i.mse``: mean pixel MSE
  to the prompt's picture; ``t2i.chance`` = 1/N, what a generator that ignores the prompt reaches.
  ``t2i.matcher`` (only when the run has an image-text matcher): the generated picture ranked by the matcher
  against the split's distinct captions, ``retrieval_acc`` / ``top5_acc`` / ``chance`` = 1/captions.
- ``i2t`` (image -> text) and ``a2t`` (speech -> text): ``exact`` (normalised match), ``wer`` (corpus word error
  rate, jiwer), ``bleu`` and ``chrf`` (corpus BLEU with effective n-gram order, so captions shorter than four words
  count, and chrF; sacrebleu, on its 0-100 scale); ``chance``: the exact-match rate of a uniformly random caption of
  the split (1/N when the captions are distinct).
- ``t2a`` (text -> speech): pocketsphinx's general US-English model (no grammar) transcribes the generated speech
  (``asr_wer``) and the ground-truth speech of the same items (``gt_asr_wer``); the model is weak on synthetic
  speech, so the headline is ``wer_ratio`` = generated / ground truth (1.0: as intelligible as the data; both 0
  gives 1.0, a ground truth of 0 counts as one word error in the corpus).
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from anyloom.evaluation.asr import SpeechJudge, word_error_rate
from anyloom.evaluation.directions import AnyToAny, batches, per_split

DIRECTIONS = ("t2i", "i2t", "a2t", "t2a")
NEEDS = {"t2i": "pixels", "i2t": "pixels", "a2t": "wave", "t2a": "wave"}  # besides a text
TEXT_JUDGE = "jiwer WER + sacrebleu BLEU/chrF against the references"
SPEECH_JUDGE = "pocketsphinx en-us general model, ratio to ground-truth speech"


@dataclass
class Item:
    caption: str | None  # the document's first text (None: none, or one without a word)
    pixels: np.ndarray | None  # (H, W, 3) uint8: its first image
    wave: np.ndarray | None  # (T,) float32: its first audio
    sample_rate: int = 16000
    id: str = ""


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: "Red-apple, please!" -> "red apple please"."""
    kept = (" " if unicodedata.category(ch).startswith("P") else ch for ch in text.lower())
    return " ".join("".join(kept).split())


def items_from_documents(documents: Sequence) -> list[Item]:
    """Manifest Documents -> Items (each document's first text, image and audio; any of them may be missing)."""
    from anyloom.data.document import AudioSegment, ImageSegment, TextSegment

    items = []
    for doc in documents:
        text, image, audio = doc.first(TextSegment), doc.first(ImageSegment), doc.first(AudioSegment)
        caption = text.text if text is not None and normalise(text.text) else None  # WER needs reference words
        items.append(Item(caption=caption, pixels=image.pixels if image else None, wave=audio.wave if audio else None,
                          sample_rate=audio.sample_rate if audio else 16000, id=doc.id))
    return items


def usable(items: Sequence[Item], direction: str) -> list[Item]:
    """The items a direction can score: a text and the picture (t2i, i2t) or the speech (a2t, t2a)."""
    return [it for it in items if it.caption is not None and getattr(it, NEEDS[direction]) is not None]


def _ranks(scores: np.ndarray, targets: np.ndarray, tolerance: float = 0.0) -> np.ndarray:
    """(N, M) scores (higher = better), (N,) target columns -> (N,) how many columns beat the target. Rank 0 = hit."""
    own = scores[np.arange(len(targets)), targets]  # (N,)
    return (scores > own[:, None] + tolerance).sum(axis=1)


def retrieval_ranks(generated: np.ndarray, gallery: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each generated image, how many gallery images are strictly nearer (pixel MSE) than its target.

    generated: (N, H, W, 3) uint8; gallery: (M, H, W, 3) uint8; targets: (N,) gallery indices. Rank 0 = hit.
    """
    if generated.shape[1:] != gallery.shape[1:]:
        raise ValueError(f"generated images are {generated.shape[1:]} but the split's images are {gallery.shape[1:]}; "
                         f"the image tokenizer must decode at the data's resolution")
    g = generated.reshape(len(generated), -1).astype(np.float64) / 255.0  # (N, D)
    r = gallery.reshape(len(gallery), -1).astype(np.float64) / 255.0  # (M, D)
    mse = ((g**2).sum(1)[:, None] - 2.0 * g @ r.T + (r**2).sum(1)[None, :]) / g.shape[1]  # (N, M)
    # a tolerance so that an exact copy of the target is not beaten by rounding in the expanded square
    return _ranks(-mse, targets, tolerance=1e-9)


class CaptionRanker(Protocol):
    """Scores pictures against captions: (N, H, W, 3) uint8 and M captions -> (N, M), higher = better match."""

    def __call__(self, images: np.ndarray, captions: Sequence[str]) -> np.ndarray: ...


class MatcherRanker:
    """The run's image-text matcher (``Pipeline.matcher``, what the ``matcher`` scorer uses) on captions tokenized by
    the run's text tokenizer, as the pipeline tokenizes prompts."""

    def __init__(self, matcher: Any, text_tokenizer: Any, batch_size: int = 512) -> None:
        self.matcher, self.text_tokenizer, self.batch_size = matcher, text_tokenizer, batch_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
        from anyloom.matcher.model import to_unit

        m = self.matcher
        was = m.training
        m.eval()
        ids, mask = m.text_batch([self.text_tokenizer.encode(c) for c in captions])
        texts = m.encode_texts(ids, mask)  # (M, D)
        x = to_unit(images).to(texts.device)  # (N, 3, H, W)
        pics = torch.cat([m.encode_images(x[s:s + self.batch_size]) for s in range(0, len(x), self.batch_size)])
        m.train(was)
        return m.logits(pics, texts).double().cpu().numpy()  # (N, M)


def eval_text_to_image(model: AnyToAny, items: list[Item], ranker: CaptionRanker | None = None,
                       batch_size: int = 32) -> dict[str, Any]:
    items = usable(items, "t2i")
    judge = f"pixel-MSE retrieval among the split's {len(items)} pictures"
    if not items:
        return {"n": 0, "judge": judge, "note": "no document of the split has a text and a picture"}
    gallery = np.stack([it.pixels for it in items])  # (N, H, W, 3): the picture of every t2i item of the split
    generated = []
    for batch in batches(items, batch_size, "text->image"):
        generated += [np.asarray(img, dtype=np.uint8) for img in model.text_to_image([it.caption for it in batch])]
    gen = np.stack(generated)  # (N, H, W, 3)
    ranks = retrieval_ranks(gen, gallery, np.arange(len(items)))
    mse = ((gen.astype(np.float64) - gallery.astype(np.float64)) / 255.0) ** 2
    out: dict[str, Any] = {"retrieval_acc": float(np.mean(ranks == 0)), "top5_acc": float(np.mean(ranks < 5)),
                           "mse": float(mse.mean()), "chance": 1.0 / len(items), "n": len(items), "judge": judge}
    if ranker is not None:
        captions = sorted({it.caption for it in items})
        column = {c: i for i, c in enumerate(captions)}
        ranks = _ranks(np.asarray(ranker(gen, captions), dtype=np.float64), np.array([column[it.caption]
                                                                                        for it in items]))
        out["matcher"] = {"retrieval_acc": float(np.mean(ranks == 0)), "top5_acc": float(np.mean(ranks < 5)),
                          "chance": 1.0 / len(captions), "captions": len(captions), "n": len(items),
                          "judge": f"image-text matcher retrieval among the split's {len(captions)} captions"}
    return out


def text_scores(refs: Sequence[str], hyps: Sequence[str]) -> dict[str, float]:
    """Exact match, WER, BLEU and chrF of ``hyps`` against ``refs``, all on normalised texts, corpus-level."""
    from sacrebleu.metrics import BLEU, CHRF

    refs, hyps = [normalise(r) for r in refs], [normalise(h) for h in hyps]
    counts = Counter(refs)
    return {"exact": sum(h == r for r, h in zip(refs, hyps)) / len(refs), "wer": word_error_rate(refs, hyps),
            # effective order: a corpus of two-word captions has no 3- or 4-grams, and plain BLEU would be 0
            "bleu": float(BLEU(effective_order=True).corpus_score(hyps, [refs]).score),
            "chrf": float(CHRF().corpus_score(hyps, [refs]).score),
            "chance": sum(counts[r] for r in refs) / len(refs) ** 2}


def eval_image_to_text(model: AnyToAny, items: list[Item], batch_size: int = 64) -> dict[str, Any]:
    return _eval_to_text(usable(items, "i2t"), "a picture", batch_size, "image->text",
                         lambda batch: model.image_to_text([it.pixels for it in batch]))


def eval_speech_to_text(model: AnyToAny, items: list[Item], batch_size: int = 64) -> dict[str, Any]:
    return _eval_to_text(usable(items, "a2t"), "speech", batch_size, "speech->text",
                         lambda batch: model.speech_to_text([it.wave for it in batch], _one_rate(batch)))


def _eval_to_text(items: list[Item], what: str, batch_size: int, desc: str,
                  answer: Callable[[list[Item]], list[str]]) -> dict[str, Any]:
    """The text scores of ``answer`` (a batch of items -> the model's texts) against the items' captions."""
    if not items:
        return {"n": 0, "judge": TEXT_JUDGE, "note": f"no document of the split has a text and {what}"}
    texts: list[str] = []
    for batch in batches(items, batch_size, desc):
        texts += answer(batch)
    return {**text_scores([it.caption for it in items], texts), "n": len(items), "judge": TEXT_JUDGE}


def _one_rate(items: Sequence[Item]) -> int:
    rates = {it.sample_rate for it in items}
    if len(rates) != 1:
        raise ValueError(f"speech items at several sample rates {sorted(rates)}; read the manifest at one rate")
    return rates.pop()


def GeneralSpeechJudge() -> SpeechJudge:  # noqa: N802 (named as the judge it makes)
    """The offline recogniser with pocketsphinx's general US-English language model: it hears any English words."""
    return SpeechJudge(grammar=None)


def eval_text_to_speech(model: AnyToAny, items: list[Item], judge: Any, batch_size: int = 32) -> dict[str, Any]:
    """``judge``: ``transcribe(waves, sample_rate) -> list[str]`` (a :class:`GeneralSpeechJudge`)."""
    items = usable(items, "t2a")
    if not items:
        return {"n": 0, "judge": SPEECH_JUDGE, "note": "no document of the split has a text and speech"}
    refs, generated, original = [], [], []
    for batch in batches(items, batch_size, "text->speech"):
        waves, sr = model.text_to_speech([it.caption for it in batch])
        generated += judge.transcribe(waves, sr)
        original += judge.transcribe([it.wave for it in batch], _one_rate(batch))
        refs += [normalise(it.caption) for it in batch]
    wer = word_error_rate(refs, [normalise(t) for t in generated])
    gt_wer = word_error_rate(refs, [normalise(t) for t in original])
    one_error = 1.0 / sum(len(r.split()) for r in refs)  # the smallest non-zero corpus WER
    ratio = 1.0 if wer == gt_wer == 0 else wer / max(gt_wer, one_error)
    return {"asr_wer": wer, "gt_asr_wer": gt_wer, "wer_ratio": ratio, "n": len(items), "judge": SPEECH_JUDGE}


def evaluate_generic(model: AnyToAny, splits: dict[str, list[Item]], directions: Sequence[str] = DIRECTIONS,
                     ranker: CaptionRanker | None = None, speech_judge: Any = None,
                     batch_size: int = 0) -> dict[str, dict]:
    """Scores per direction for the ``test`` split at the top level and every other split under its name.

    ``ranker``: scores pictures against captions for ``t2i.matcher`` (:class:`MatcherRanker`; None: pixels only).
    ``speech_judge``: the t2a transcriber (default: a :class:`GeneralSpeechJudge`, made when t2a is asked for).
    ``batch_size``: prompts per generation call (0: each direction's default)."""
    sized = {"batch_size": batch_size} if batch_size else {}
    unknown = set(directions) - set(DIRECTIONS)
    if unknown:
        raise ValueError(f"directions: unknown {sorted(unknown)}; choose from {', '.join(DIRECTIONS)}")
    if "t2a" in directions and speech_judge is None and any(usable(items, "t2a") for items in splits.values()):
        speech_judge = GeneralSpeechJudge()

    def score(items: list[Item]) -> dict[str, dict]:
        scores: dict[str, dict] = {}
        if "t2i" in directions:
            scores["t2i"] = eval_text_to_image(model, items, ranker, **sized)
        if "i2t" in directions:
            scores["i2t"] = eval_image_to_text(model, items, **sized)
        if "a2t" in directions:
            scores["a2t"] = eval_speech_to_text(model, items, **sized)
        if "t2a" in directions:
            scores["t2a"] = eval_text_to_speech(model, items, speech_judge, **sized)
        return scores

    return per_split(splits, score)


__all__ = ["CaptionRanker", "DIRECTIONS", "GeneralSpeechJudge", "Item", "MatcherRanker", "eval_image_to_text",
           "eval_speech_to_text", "eval_text_to_image", "eval_text_to_speech", "evaluate_generic",
           "items_from_documents", "normalise", "retrieval_ranks", "text_scores", "usable"]
