"""Shared test fixtures. Tests use tiny configs; speed belongs in `make bench`, not here."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def _gpu_missing() -> str | None:
    """Why tests marked ``gpu`` cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "needs a CUDA device (torch.cuda.is_available() is False)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "needs triton (pip install '.[gpu]')"
    return None


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, with the reason, on a machine without CUDA or triton (``make test`` on a
    GPU machine runs them)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    reason = _gpu_missing() if gpu_items else None
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convs spend their time in thread synchronisation when the shared machine is loaded: a module that
    uses this fixture (``pytestmark = pytest.mark.usefixtures("one_thread")``) runs on one torch thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tmp_recipes(tmp_path):
    """A folder to write throwaway recipe files into."""
    d = tmp_path / "recipes"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A tiny world (tens of items per split, with speech), generated once per test session.

    Returns ``anyloom.world.dataset.WorldPaths``: ``.dir``, manifests ``.train .val .test .compositional``.
    """
    from anyloom.world.dataset import WorldConfig, build_world

    cfg = WorldConfig(n_train=48, n_val=16, n_test=16, n_compositional=16,
                      root=str(tmp_path_factory.mktemp("world")))
    return build_world(cfg, workers=1)
