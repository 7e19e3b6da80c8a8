"""Judge an any-to-any model on OpenMoji (emoji pictures, their Unicode names, the names spoken).

The world's judges read shapes and a caption grammar; emoji need others. The model is seen through the same
:class:`~anyloom.world.evaluate.AnyToAny` protocol, so a perfect fake generator scores 100% and a
constant one scores chance, and a real run is scored unchanged.

Metrics (``eval.json``; the test split at the top level, other splits under their names):

- ``t2i.retrieval_acc`` (name -> image): the generated image's nearest neighbour by pixel MSE (RGB in [0, 1],
  at the data's resolution) among the images of every item of the evaluated split is the prompted emoji's
  own image. ``t2i.top5_acc``: the prompted image is among the 5 nearest. Ties count for the prompted image
  (its rank is the number of images strictly nearer). ``t2i.mse``: mean pixel MSE to the prompted image.
  ``t2i.chance`` = 1/N, what a generator that ignores the prompt reaches.
- ``i2t.exact`` (image -> name): the generated text equals the Unicode name (whitespace/case normalised);
  ``i2t.wer``: word error rate against the name; ``i2t.chance`` = 1/N, a uniformly random name of the split.
- ``a2t.wer`` / ``a2t.exact`` (speech -> name): as the world's (``world_eval.eval_speech_to_text``).
- ``t2a`` is not scored: the ASR judge decodes with a grammar of the world's caption vocabulary, and none is
  built for the ~1,400 words of emoji names; asking for it is an error.

Held-out emoji are concepts the model never saw in training (OpenMoji has no compositional split), so
held-out scores near chance are expected from a small model; the ``train`` split measures memorisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from anyloom.world.evaluate import AnyToAny, _batches, _normalise, eval_speech_to_text

DIRECTIONS = ("t2i", "i2t", "a2t")


@dataclass
class EmojiItem:
    caption: str  # the Unicode name in lower case ("red apple")
    pixels: np.ndarray | None  # (H, W, 3) uint8
    wave: np.ndarray | None  # (T,) float32
    sample_rate: int = 16000
    id: str = ""


def items_from_documents(documents: Sequence) -> list[EmojiItem]:
    """OpenMoji manifest Documents (name, image, optional speech) -> EmojiItems."""
    from anyloom.data.document import AudioSegment, ImageSegment, TextSegment

    items = []
    for doc in documents:
        caption, image, audio = doc.first(TextSegment), doc.first(ImageSegment), doc.first(AudioSegment)
        text = caption.text if caption else None
        if text is None or image is None:
            raise ValueError(f"document {doc.id!r} is not an OpenMoji item (needs a name and an image)")
        items.append(EmojiItem(caption=text, pixels=image.pixels, wave=audio.wave if audio else None,
                               sample_rate=audio.sample_rate if audio else 16000, id=doc.id))
    return items


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
    own = mse[np.arange(len(targets)), targets]  # (N,)
    # a tolerance so that an exact copy of the target is not beaten by rounding in the expanded square
    return (mse < own[:, None] - 1e-9).sum(axis=1)


def eval_name_to_image(model: AnyToAny, items: list[EmojiItem], batch_size: int = 32) -> dict[str, float]:
    if not items:
        raise ValueError("name->image: no items to evaluate")
    gallery = np.stack([it.pixels for it in items])  # (N, H, W, 3): every image of the split
    generated = []
    for batch in _batches(items, batch_size, "name->image"):
        generated += [np.asarray(img, dtype=np.uint8) for img in model.text_to_image([it.caption for it in batch])]
    gen = np.stack(generated)  # (N, H, W, 3)
    ranks = retrieval_ranks(gen, gallery, np.arange(len(items)))
    mse = ((gen.astype(np.float64) - gallery.astype(np.float64)) / 255.0) ** 2
    return {"retrieval_acc": float(np.mean(ranks == 0)), "top5_acc": float(np.mean(ranks < 5)),
            "mse": float(mse.mean()), "chance": 1.0 / len(items), "n": len(items)}


def eval_image_to_name(model: AnyToAny, items: list[EmojiItem], batch_size: int = 64) -> dict[str, float]:
    from anyloom.world.asr import word_error_rate

    if not items:
        raise ValueError("image->name: no items to evaluate")
    texts: list[str] = []
    for batch in _batches(items, batch_size, "image->name"):
        texts += model.image_to_text([it.pixels for it in batch])
    refs = [it.caption for it in items]
    exact = sum(_normalise(t) == _normalise(r) for t, r in zip(texts, refs)) / len(items)
    return {"exact": exact, "wer": word_error_rate(refs, [_normalise(t) for t in texts]),
            "chance": 1.0 / len(items), "n": len(items)}


def evaluate_openmoji(
    model: AnyToAny, splits: dict[str, list[EmojiItem]], directions: Sequence[str] = DIRECTIONS
) -> dict[str, dict]:
    """Scores per direction for the ``test`` split at the top level and every other split under its name."""
    unknown = set(directions) - set(DIRECTIONS)
    if unknown:
        raise ValueError(f"eval.directions: {sorted(unknown)} cannot be scored on OpenMoji (no ASR judge for emoji "
                         f"names); choose from {', '.join(DIRECTIONS)}")
    out: dict[str, dict] = {}
    for split, items in splits.items():
        scores: dict[str, dict] = {}
        if "t2i" in directions:
            scores["t2i"] = eval_name_to_image(model, items)
        if "i2t" in directions:
            scores["i2t"] = eval_image_to_name(model, items)
        if "a2t" in directions:
            if any(it.wave is None for it in items):
                raise ValueError(f"a2t: the {split} split has no speech (built with openmoji.with_speech=false); "
                                 f"drop a2t from eval.directions")
            scores["a2t"] = eval_speech_to_text(model, items)  # reads caption / wave / sample_rate only
        if split == "test":
            out.update(scores)
        else:
            out[split] = scores
    return out


__all__ = ["EmojiItem", "eval_image_to_name", "eval_name_to_image", "evaluate_openmoji", "items_from_documents",
           "retrieval_ranks"]
