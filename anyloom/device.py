"""Device selection from a recipe string."""

from __future__ import annotations

import torch


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda (this rank's GPU under torchrun) if available, else cpu; otherwise as named."""
    from anyloom.training.distributed import local_rank

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={name!r} but no CUDA device is available here; use 'auto' or 'cpu'")
    return device
