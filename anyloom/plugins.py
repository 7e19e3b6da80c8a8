"""Plug-ins: parts a recipe names that live outside the generic code (a dataset's own reranking scorer, a head
for its pictures, a loss weighting that only its pictures justify).

A plug-in is an installed Python object registered under a group by a package's entry points, e.g. in
``pyproject.toml``::

    [project.entry-points."anyloom.scorers"]
    my_scorer = "my_dataset.rerank:MyScorer"

A recipe then names it (``my_scorer``); nothing is imported from a recipe or a checkpoint by path, only what an
installed package registered. Groups: ``anyloom.scorers`` (generation reranking, ``anyloom.generation.scorers``),
``anyloom.matcher_heads`` (extra heads of the image-text matcher, ``anyloom.matcher.model``),
``anyloom.pixel_weights`` (per-pixel loss weights of the image tokenizer trainer) and ``anyloom.asr_grammars``
(functions returning a JSGF grammar of a dataset's sentences, for the audio tokenizer's ASR report).
"""

from __future__ import annotations

import difflib
from functools import cache
from importlib.metadata import entry_points
from typing import Any


class PluginError(ValueError):
    """A plug-in name that no installed package registered in its group; names the known ones."""


@cache
def _registered(group: str) -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=group)}


def plugin_names(group: str, builtin: dict[str, Any] | None = None) -> list[str]:
    """Every name ``group`` knows: the built-in ones and those registered by installed packages."""
    return sorted({*(builtin or {}), *_registered(group)})


def load_plugin(group: str, name: str, builtin: dict[str, Any] | None = None, where: str = "") -> Any:
    """The object registered as ``name`` in ``group`` (``builtin`` first: the group's own generic entries)."""
    if builtin and name in builtin:
        return builtin[name]
    registered = _registered(group)
    if name not in registered:
        known = plugin_names(group, builtin)
        near = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise PluginError(f"{where + ': ' if where else ''}{name!r} is not a known {group} plug-in{hint}; known: "
                          f"{', '.join(known) or 'none'} (a package registers more through its entry points)")
    return registered[name].load()
