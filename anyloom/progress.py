"""Progress bars: tqdm on rank 0 in a terminal, silent elsewhere (logs carry the numbers)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

from anyloom.training.distributed import is_main


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "", **kw: Any) -> tqdm:
    """A tqdm bar that is shown only on rank 0 and only when stderr is a terminal."""
    disable = not is_main() or not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True, **kw)
