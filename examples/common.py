"""What every example shares: ``--run`` and ``--out`` (paths work from any directory) and loading the run with a
one-line message instead of a traceback when it is missing or incomplete."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from anyloom.generation.pipeline import PipelineError, load

DEFAULT_RUN = Path(__file__).resolve().parents[1] / "runs" / "world"  # where `make train` puts the world run


def parse_args(doc: str | None, add: Any = None) -> argparse.Namespace:
    """``--run`` (default: the repository's runs/world) and ``--out`` (default: <run>/samples/examples), plus what
    ``add(parser)`` adds."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=DEFAULT_RUN, help=f"a run directory (default: {DEFAULT_RUN})")
    p.add_argument("--out", type=Path, help="output folder (default: <run>/samples/examples)")
    if add is not None:
        add(p)
    args = p.parse_args()
    args.out = args.out or args.run / "samples" / "examples"
    return args


def load_run(run: Path) -> Any:
    """The run's pipeline, or exit with a message saying what is missing and how to make it."""
    try:
        return load(run)
    except PipelineError as e:
        sys.exit(f"error: {e}\n(train the world run with `make train`, or pass --run <a run directory>)")
