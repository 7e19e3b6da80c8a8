"""Who am I in a torchrun job? Read from the environment, so it works before and without init_process_group."""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0 logs, writes samples and prints; the other ranks stay quiet."""
    return rank() == 0
