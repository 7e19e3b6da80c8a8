"""`make eval RUN=runs/<name>`: score a trained run on its data's held-out splits; writes eval.json.

    python scripts/evaluate.py --run runs/world                                  # -> runs/world/eval.json
    python scripts/evaluate.py --run runs/world eval.limit=100 eval.directions=[t2i,i2t]
                                          # -> runs/world/evals/directions=t2i+i2t,limit=100-<hash>/eval.json

Overrides use the recipe's keys (the run's own recipe.yaml is the base). With the run recipe's own eval and
generation settings the results go into the run directory; with any other they go into
<run>/evals/<the differences>-<hash>/, so a partial evaluation never replaces the full one. An evaluation that is
up to date (same settings, same weights) is not run again unless --force is given.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import yaml

from anyloom.config import ConfigError
from anyloom.recipes import build_recipe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run directory written by `make train`")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (e.g. eval.limit=50)")
    p.add_argument("--force", action="store_true", help="evaluate even when an up-to-date eval.json is there")
    args = p.parse_args(argv)
    run = Path(args.run)
    if not (run / "recipe.yaml").is_file():
        print(f"error: {run} is not a run directory (no recipe.yaml); train one with `make train`", file=sys.stderr)
        return 2
    try:
        saved = yaml.safe_load((run / "recipe.yaml").read_text()) or {}
        own = build_recipe(copy.deepcopy(saved), [])  # build_recipe merges the overrides into what it is given
        recipe = build_recipe(saved, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not (run / "export").is_dir():
        print(f"error: {run}/export is missing: the LM has not been exported yet (the 'export' stage of make train, "
              f"or python scripts/export.py --run {run})", file=sys.stderr)
        return 2
    from anyloom.config import to_dict
    from anyloom.evaluation.run_eval import evaluate_run
    from anyloom.generation.pipeline import PipelineError
    from anyloom.training.chain import build_data

    try:
        result = evaluate_run(run, recipe.eval, build_data(recipe), recipe.generation, force=args.force,
                              recipe_settings={"eval": to_dict(own.eval), "generation": to_dict(own.generation)})
    except (PipelineError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((result.folder / "eval.md").read_text())
    print(f"{'kept' if result.up_to_date else 'wrote'} {result.folder / 'eval.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
