"""Reranking as a contract: a scorer takes a request's candidates and returns one score per candidate.

Generation can sample several candidates per prompt (``generation.image_candidates`` / ``audio_candidates`` /
``text_candidates``) and keep the one with the highest weighted sum of scores; a recipe lists the scorers per
target modality with their weights::

    generation:
      image_candidates: 16
      image_scorers: [{name: matcher}, {name: round_trip, weight: 1.0}]

A scorer is a class built with the :class:`~anyloom.generation.pipeline.Pipeline` it serves (so it can take the
model, the tokenizers or the image-text matcher it needs, and refuse clearly when one is missing) and called with
:class:`Candidates`; it returns ``(N,)`` float64 scores, higher = better, and says which targets it can score.
The generic scorers are below; a dataset brings its own through the ``anyloom.scorers`` plug-in group
(:mod:`anyloom.plugins`).

- ``lm_reverse``: log p(prompt | candidate), the model's reverse direction judging whether the candidate shows
  the prompt (an any-to-any model is its own judge; ``generation/rerank.py``);
- ``lm_forward``: log p(candidate | prompt), the model's confidence in the candidate itself;
- ``lm_forward_per_frame``: the same per audio frame (utterances of different lengths compare);
- ``matcher``: the image-text matcher's score of the picture against the prompt's text
  (``matcher/model.py``); a prompt with no text falls back to ``lm_reverse``;
- ``round_trip``: minus the log of the picture's round-trip error through the image tokenizer (pictures it cannot
  reproduce lie off what it was trained on, and most of those are malformed).

Axis legend: P prompts, N candidates (all prompts' together, prompt-major), H x W pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from anyloom.generation.rerank import (
    ROUND_TRIP_FLOOR,
    document_log_likelihood,
    per_frame_log_likelihood,
    reverse_log_likelihood,
    round_trip_error,
)
from anyloom.plugins import load_plugin, plugin_names
from anyloom.sequences.interleave import TextIds, TokSegment

GROUP = "anyloom.scorers"


class ScorerError(ValueError):
    """A scorer that cannot serve this pipeline or target (a missing matcher, a picture scorer asked for speech)."""


@dataclass
class Candidates:
    """The candidates of one reranking request: ``segments[j]`` answers ``prompts[prompt_of[j]]``.

    Image and audio candidates are decoded only when a scorer asks (``outputs`` / ``pixels``), each one once;
    the pipeline decodes only the kept ones otherwise.
    """

    to: str  # the target modality: "text", "image" or "audio"
    prompts: Sequence[Sequence[TokSegment]]  # P tokenized prompts
    prompt_of: Sequence[int]  # N: the prompt each candidate answers
    segments: Sequence[TokSegment]  # N: TextIds / ImageIds / AudioIds
    decode: Callable[[list[int]], list[Any]] | None = None  # candidate indices -> GeneratedImage / GeneratedAudio
    _outputs: dict[int, Any] = field(default_factory=dict, repr=False)
    _pixels: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.segments)

    def prompt(self, j: int) -> Sequence[TokSegment]:
        return self.prompts[self.prompt_of[j]]

    def candidate_prompts(self, indices: Sequence[int] | None = None) -> list[Sequence[TokSegment]]:
        return [self.prompt(j) for j in (range(len(self)) if indices is None else indices)]

    def outputs(self, indices: Sequence[int]) -> list[Any]:
        """The decoded candidates of ``indices`` (decoded in one call, in this order, the first time they are asked)."""
        missing = [j for j in indices if j not in self._outputs]
        if missing:
            if self.decode is None:
                raise ScorerError(f"{self.to} candidates cannot be decoded here")
            self._outputs.update(zip(missing, self.decode(missing)))
        return [self._outputs[j] for j in indices]

    def pixels(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """(len(indices), H, W, 3) uint8: the decoded pictures (all candidates by default)."""
        indices = list(range(len(self))) if indices is None else list(indices)
        self.outputs(indices)
        for j in indices:
            if j not in self._pixels:
                self._pixels[j] = np.asarray(self._outputs[j].image.convert("RGB"))
        return np.stack([self._pixels[j] for j in indices])


class Scorer(Protocol):
    """Built with the pipeline it serves; called with a request's candidates; (N,) float64, higher = better."""

    targets: ClassVar[tuple[str, ...]]  # the target modalities it can score

    def __init__(self, pipeline: Any) -> None: ...

    def __call__(self, candidates: Candidates) -> torch.Tensor: ...


class LMReverse:
    """log p(prompt | candidate) under the pipeline's model (the reverse task's document)."""

    targets = ("text", "image", "audio")

    def __init__(self, pipeline: Any) -> None:
        self.model, self.vocab = pipeline.model, pipeline.vocab

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        return reverse_log_likelihood(self.model, self.vocab, candidates.segments, candidates.candidate_prompts())


class LMForward:
    """log p(candidate | prompt) under the pipeline's model (the forward task's document, the candidate scored)."""

    targets = ("text", "image", "audio")

    def __init__(self, pipeline: Any) -> None:
        self.model, self.vocab = pipeline.model, pipeline.vocab

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        prompts = candidates.candidate_prompts()
        return document_log_likelihood(self.model, self.vocab, [[*p, s] for p, s in zip(prompts, candidates.segments)],
                                       [[False] * len(p) + [True] for p in prompts])


class LMForwardPerFrame:
    """log p(utterance | prompt) divided by the utterance's frames: comparable across lengths."""

    targets = ("audio",)

    def __init__(self, pipeline: Any) -> None:
        self.model, self.vocab = pipeline.model, pipeline.vocab

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        return per_frame_log_likelihood(self.model, self.vocab, candidates.segments, candidates.candidate_prompts())


class MatcherSimilarity:
    """The image-text matcher's scaled cosine between each picture and its prompt's text (all of the prompt's text
    segments' ids); prompts without text are scored by :class:`LMReverse` instead."""

    targets = ("image",)

    def __init__(self, pipeline: Any) -> None:
        if pipeline.matcher is None:
            raise ScorerError("the 'matcher' scorer needs an image matcher, and this pipeline has no image matcher "
                              "(train the image_matcher stage or pass image_matcher=...)")
        self.matcher = pipeline.matcher
        self.fallback = LMReverse(pipeline)

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        words = [[int(t) for s in p if isinstance(s, TextIds) for t in s.ids] for p in candidates.prompts]
        matched = [j for j in range(len(candidates)) if words[candidates.prompt_of[j]]]
        rest = [j for j in range(len(candidates)) if not words[candidates.prompt_of[j]]]
        scores = torch.empty(len(candidates), dtype=torch.float64)
        if matched:
            texts = [words[candidates.prompt_of[j]] for j in matched]
            scores[matched] = self.matcher.similarity(candidates.pixels(matched), texts).double()
        if rest:
            sub = Candidates(candidates.to, candidates.prompts, [candidates.prompt_of[j] for j in rest],
                             [candidates.segments[j] for j in rest])
            scores[rest] = self.fallback(sub)
        return scores


class RoundTrip:
    """Minus log of each picture's mean squared change through the image tokenizer's encode then decode."""

    targets = ("image",)

    def __init__(self, pipeline: Any) -> None:
        self.tokenizer = pipeline.image_tokenizer

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        return -torch.log(round_trip_error(self.tokenizer, candidates.pixels()) + ROUND_TRIP_FLOOR)


BUILTIN: dict[str, type] = {
    "lm_reverse": LMReverse,
    "lm_forward": LMForward,
    "lm_forward_per_frame": LMForwardPerFrame,
    "matcher": MatcherSimilarity,
    "round_trip": RoundTrip,
}


def scorer_names() -> list[str]:
    """The built-in scorers and those installed packages register (no plug-in is imported)."""
    return plugin_names(GROUP, BUILTIN)


def build_scorer(name: str, pipeline: Any, to: str, where: str = "") -> Scorer:
    """The scorer ``name`` for ``to`` candidates, built with ``pipeline``; ScorerError when it cannot serve them."""
    cls = load_plugin(GROUP, name, BUILTIN, where=where)
    targets = getattr(cls, "targets", ())
    if to not in targets:
        prefix = f"{where}: " if where else ""
        raise ScorerError(f"{prefix}the {name!r} scorer scores {', '.join(targets) or 'no'} candidates, not {to}")
    return cls(pipeline)


__all__ = ["BUILTIN", "Candidates", "LMForward", "LMForwardPerFrame", "LMReverse", "MatcherSimilarity", "RoundTrip",
           "Scorer", "ScorerError", "build_scorer", "scorer_names"]
