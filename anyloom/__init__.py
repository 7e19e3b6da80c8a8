"""anyloom: tokenized early-fusion any-to-any generative models.

The component folders live at the repository root (``tokenizers/``, ``transformer/``, ``decoders/``, ...)
and import as ``anyloom.<folder>``. The root itself is never put on ``sys.path``: ``tokenizers/`` would
shadow Hugging Face's ``tokenizers`` package there, which is why it has no ``__init__.py`` (a namespace
portion loses to a regular package) and why the root joins this package's search path instead.
Install with ``make setup`` (an editable install of this checkout).
"""

from pathlib import Path

__version__ = "0.1.0"

REPO_ROOT = Path(__file__).resolve().parent.parent
__path__.append(str(REPO_ROOT))  # anyloom.tokenizers -> <repo>/tokenizers, anyloom.transformer -> ...


def load(path, **kwargs):  # noqa: ANN001, ANN201 (typed in anyloom.generation.pipeline.load)
    """``anyloom.load("runs/world")`` -> a generation Pipeline; see :func:`anyloom.generation.pipeline.load`."""
    from anyloom.generation.pipeline import load as _load

    return _load(path, **kwargs)
