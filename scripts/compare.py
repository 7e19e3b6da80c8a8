"""`make compare RUNS="runs/a runs/b"`: recipe differences, eval numbers and curves side by side.

Writes <out>/compare.md and one PNG per metric (default out: runs/compare) and prints the markdown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from anyloom.evaluation.compare import compare_markdown, load_run, plot_curves


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default="runs/compare", help="folder for compare.md and the plots")
    args = p.parse_args(argv)
    try:
        runs = [load_run(r) for r in args.runs]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = compare_markdown(runs)
    plots = plot_curves(runs, out / "plots")
    if plots:
        text += "\n## Curves\n\n" + "\n".join(f"![{p.stem}](plots/{p.name})" for p in plots) + "\n"
    (out / "compare.md").write_text(text)
    print(text)
    print(f"wrote {out / 'compare.md'} and {len(plots)} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
