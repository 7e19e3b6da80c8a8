"""Fault injection for tests and failure drills, driven by environment variables (so it reaches every
rank of a torchrun job). Nothing here is active unless one of these variables is set:

- ``ANYLOOM_FAULT_NAN_STEPS=3,7``: the loss of those optimizer steps (1-based) is multiplied by NaN, as a
  corrupt batch would do; the stability guard must skip the step.
- ``ANYLOOM_FAULT_KILL_SAVE_STEP=6``: while writing the checkpoint of step 6, the coordinating rank SIGKILLs
  itself after every data file is written but before DCP's ``.metadata`` is: an incomplete checkpoint.
"""

from __future__ import annotations

import os
import signal

import torch

NAN_STEPS = "ANYLOOM_FAULT_NAN_STEPS"
KILL_SAVE_STEP = "ANYLOOM_FAULT_KILL_SAVE_STEP"


def _steps(var: str) -> set[int]:
    raw = os.environ.get(var, "").strip()
    if not raw:
        return set()
    try:
        return {int(s) for s in raw.split(",") if s.strip()}
    except ValueError as e:
        raise ValueError(f"{var}={raw!r}: expected comma-separated step numbers") from e


def maybe_nan_loss(loss: torch.Tensor, step: int) -> torch.Tensor:
    """``loss`` unchanged, or ``loss * NaN`` (gradients become NaN too) if ``step`` is listed."""
    if step in _steps(NAN_STEPS):
        return loss * float("nan")
    return loss


def maybe_kill_during_save(step: int) -> None:
    if step in _steps(KILL_SAVE_STEP):
        os.kill(os.getpid(), signal.SIGKILL)
