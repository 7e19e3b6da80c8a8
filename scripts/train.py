"""`make train`: load a recipe (with overrides), create the run directory, run the recipe's stages.

    python scripts/train.py --recipe world optim.lr=1e-3 train.steps=200
"""

from __future__ import annotations

import argparse
import sys

from anyloom.config import ConfigError
from anyloom.recipes import load_recipe
from anyloom.training.run import RunDir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="world", help="recipe name in recipes/ or a path to a YAML file")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, applied after the recipe's bases")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = RunDir.from_config(recipe.run)
    run.write_recipe(recipe)
    print(f"run directory: {run.path} (resolved recipe in {run.recipe_file.name})")
    print(
        "error: the training stages are not built yet: world data (issue #3), tokenizers (#4, #5, #6), "
        "LM training (#8)",
        file=sys.stderr,
    )
    return 3


if __name__ == "__main__":
    sys.exit(main())
