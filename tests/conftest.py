"""Shared test fixtures. Tests use tiny configs; speed belongs in `make bench`, not here."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tmp_recipes(tmp_path):
    """A folder to write throwaway recipe files into."""
    d = tmp_path / "recipes"
    d.mkdir()
    return d
