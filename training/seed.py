"""One place that seeds every random number generator the project uses."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); returns a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def step_seed(seed: int, step: int) -> int:
    """The seed of one training step: what a step draws is a pure function of (run seed, step), so a resumed run
    draws what an uninterrupted one would."""
    return seed * 1_000_003 + step


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator seeded with ``step_seed(seed, step)``."""
    return torch.Generator().manual_seed(step_seed(seed, step))
