"""Recipes: typed YAML files that derive from one another.

A recipe is a YAML mapping whose sections match :class:`anyloom.recipes.schema.Recipe`. It may name a
``base:`` (a recipe name from this folder, or a path relative to the file; or a list of them, merged in
order); its own keys are merged over the base, section by section. Command-line overrides
``section.key=value`` are applied last. The result is built into typed dataclasses, so unknown keys,
wrong types and missing values fail with the key's dotted name (see :mod:`anyloom.config`).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from anyloom.config import ConfigError, build, deep_merge, parse_override, set_dotted
from anyloom.recipes.schema import Recipe

RECIPES_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    """Names of the recipes shipped in this folder (``scale/lm_1b`` for those in its subfolders)."""
    return sorted(p.relative_to(RECIPES_DIR).with_suffix("").as_posix() for p in RECIPES_DIR.rglob("*.yaml"))


def recipe_path(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    """A recipe name (``world``) or a path (``my/recipe.yaml``) -> an existing file."""
    text = str(name_or_path)
    candidates = []
    if relative_to is not None:
        candidates.append(relative_to / text)
    candidates += [Path(text), RECIPES_DIR / text, RECIPES_DIR / f"{text}.yaml"]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    near = difflib.get_close_matches(Path(text).stem, available(), n=1)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    raise ConfigError(f"no recipe named '{text}' (recipes: {', '.join(available())}){hint}")


def load_tree(name_or_path: str | Path, relative_to: Path | None = None, _chain: tuple = ()) -> dict[str, Any]:
    """The merged (untyped) mapping of a recipe and its bases."""
    path = recipe_path(name_or_path, relative_to)
    if path in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path))
        raise ConfigError(f"recipe bases form a cycle: {cycle}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, load_tree(base, path.parent, (*_chain, path)))
    merged = deep_merge(merged, data)
    if not _chain:
        # The run is named after the recipe actually asked for, unless that file names it itself: a
        # derived recipe must not write into its base's run directory.
        own_run = data.get("run") if isinstance(data.get("run"), dict) else {}
        if "name" not in own_run:
            merged.setdefault("run", {})["name"] = path.stem
    return merged


def build_recipe(tree: dict[str, Any], overrides: Sequence[str] = ()) -> Recipe:
    """Apply ``section.key=value`` overrides to a recipe mapping and type-check it (a run's recipe.yaml, say)."""
    for text in overrides:
        keys, value = parse_override(text)
        set_dotted(tree, keys, value)
    return build(Recipe, tree)


def load_recipe(name_or_path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load, merge, override and type-check a recipe."""
    return build_recipe(load_tree(name_or_path), overrides)


__all__ = ["Recipe", "ConfigError", "available", "build_recipe", "load_recipe", "load_tree", "recipe_path"]
