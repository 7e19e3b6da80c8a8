"""The world's reranking scorer (plug-in ``world_regions`` of group ``anyloom.scorers``): region consistency.

The image matcher's world head (:mod:`anyloom.world.regions`) reads each 4 x 4-pixel cell of a picture as object or
background, the object's shape and colour, and whether two objects touch there. A picture of the world shows
objects that all share one shape and one colour, apart from each other; the score is, per attribute, the least
sure object cell's log-probability of the value the picture's objects hold most, plus log(1 - p) of its most
contact-like cell (``RegionHead.consistency``). It needs no prompt: one odd object or two objects run together cost
the picture its score.
"""

from __future__ import annotations

from typing import Any

import torch

from anyloom.generation.scorers import Candidates, ScorerError


class RegionConsistency:
    targets = ("image",)

    def __init__(self, pipeline: Any) -> None:
        from anyloom.world.regions import RegionHead

        head = getattr(pipeline.matcher, "head", None)
        if not isinstance(head, RegionHead):
            raise ScorerError("the 'world_regions' scorer needs an image matcher with the world's region head "
                              "(image_matcher.head.name: world_regions); this pipeline's matcher has "
                              f"{'no matcher' if pipeline.matcher is None else 'no region head'}")
        self.head = head

    def __call__(self, candidates: Candidates) -> torch.Tensor:
        return self.head.consistency(candidates.pixels()).double()
