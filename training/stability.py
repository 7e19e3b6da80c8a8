"""Training stability: a non-finite loss or gradient norm skips the optimizer step (and is logged); too many
in a row abort the run; loss spikes (loss well above its recent mean) are logged.

Every rank sees the same all-reduced loss and global gradient norm, so every rank takes the same decision.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


class TrainingDiverged(RuntimeError):
    """Raised after ``max_bad_steps`` consecutive non-finite steps."""


@dataclass(frozen=True)
class StepVerdict:
    skip: bool  # do not apply this step's update (non-finite loss or gradient)
    spike: bool  # finite loss above spike_factor x the mean of the recent window
    reason: str  # "" when the step is fine


class StabilityGuard:
    def __init__(self, max_bad_steps: int = 5, spike_factor: float = 2.0, spike_window: int = 50):
        if max_bad_steps <= 0:
            raise ValueError(f"max_bad_steps must be > 0, got {max_bad_steps}")
        self.max_bad_steps = max_bad_steps
        self.spike_factor = spike_factor
        self.recent: deque[float] = deque(maxlen=spike_window)
        self.bad_in_a_row = 0
        self.skipped_total = 0

    def check(self, step: int, loss: float, grad_norm: float) -> StepVerdict:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.bad_in_a_row += 1
            self.skipped_total += 1
            reason = f"non-finite {'loss' if not math.isfinite(loss) else 'grad norm'} at step {step}"
            if self.bad_in_a_row >= self.max_bad_steps:
                raise TrainingDiverged(
                    f"{reason}: {self.bad_in_a_row} non-finite steps in a row (train.max_bad_steps="
                    f"{self.max_bad_steps}); lower the learning rate or resume from an earlier checkpoint"
                )
            return StepVerdict(skip=True, spike=False, reason=reason)
        self.bad_in_a_row = 0
        # a spike needs a full window of history: early training drops fast and is never a spike
        spike = False
        if len(self.recent) == self.recent.maxlen and self.spike_factor > 0:
            mean = sum(self.recent) / len(self.recent)
            spike = loss > self.spike_factor * mean
        self.recent.append(loss)
        reason = f"loss spike at step {step}: {loss:.4g} > {self.spike_factor} x recent mean" if spike else ""
        return StepVerdict(skip=False, spike=spike, reason=reason)
