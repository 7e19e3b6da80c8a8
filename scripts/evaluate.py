"""`make eval RUN=runs/<name>`: score a trained run on the world's held-out splits; writes <run>/eval.json.

    python scripts/evaluate.py --run runs/world eval.limit=100 eval.directions=[t2i,i2t]

Overrides use the recipe's keys (the run's own recipe.yaml is the base).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from anyloom.config import ConfigError
from anyloom.recipes import build_recipe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run directory written by `make train`")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (e.g. eval.limit=50)")
    args = p.parse_args(argv)
    run = Path(args.run)
    if not (run / "recipe.yaml").is_file():
        print(f"error: {run} is not a run directory (no recipe.yaml); train one with `make train`", file=sys.stderr)
        return 2
    try:
        recipe = build_recipe(yaml.safe_load((run / "recipe.yaml").read_text()) or {}, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not (run / "export").is_dir():
        print(f"error: {run}/export is missing: the LM has not been exported yet (the 'export' stage of make train, "
              f"or python scripts/export.py --run {run})", file=sys.stderr)
        return 2
    from anyloom.evaluation.run_eval import evaluate_run
    from anyloom.training.chain import build_data

    evaluate_run(run, recipe.eval, build_data(recipe), generation=recipe.generation)
    print((run / "eval.md").read_text())
    print(f"wrote {run / 'eval.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
