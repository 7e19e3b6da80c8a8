"""`make train`: load a recipe (with overrides), create the run directory, run the recipe's stages.

    python scripts/train.py --recipe world optim.lr=1e-3 train.steps=200
    python scripts/train.py --recipe world pipeline.stages=[world,text_tokenizer]

Stages and where their outputs go: training/chain.py. Running the same command again resumes: finished
stages are skipped (their outputs are keyed on their configs) and the LM continues from its last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys

from anyloom.config import ConfigError
from anyloom.recipes import load_recipe
from anyloom.training.chain import run_pipeline
from anyloom.training.distributed import is_main
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
    log = print if is_main() else (lambda _msg: None)
    log(f"run directory: {run.path} (resolved recipe in {run.recipe_file.name})")
    try:
        ctx = run_pipeline(recipe, run, log=log)
    except KeyboardInterrupt as e:
        print(f"interrupted: {e or 'stopped by the user'}; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:  # a recipe, data or run the stages cannot use: said in one line
        if os.environ.get("ANYLOOM_TRACEBACK"):
            raise
        print(f"error: {e}\n(the stages before it are kept; ANYLOOM_TRACEBACK=1 shows where it came from)",
              file=sys.stderr)
        return 2
    if ctx.timings:
        log((run.path / "summary.md").read_text() if (run.path / "summary.md").is_file() else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
