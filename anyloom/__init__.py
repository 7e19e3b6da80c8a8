"""anyloom: tokenized early-fusion any-to-any generative models.

The components live in folders at the repository root (``tokenizers/``, ``transformer/``, ``decoders/``,
``world/``, ...); the packaging maps each onto a subpackage (``pyproject.toml``, ``[tool.setuptools]
package-dir``), so they import as ``anyloom.tokenizers``, ``anyloom.transformer``, ... from an editable
install (``make setup``) and from a built wheel alike. This folder holds what every component shares: typed
recipes (``config``), safetensors weights with their config (``weights``), progress bars (``progress``) and
device choice (``device``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anyloom.generation.pipeline import Pipeline

__version__ = "0.1.0"


def load(path: str | Path, **kwargs: Any) -> Pipeline:
    """``anyloom.load("runs/world")`` -> a generation Pipeline; see :func:`anyloom.generation.pipeline.load`."""
    from anyloom.generation.pipeline import load as _load

    return _load(path, **kwargs)
