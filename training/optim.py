"""AdamW with no-decay parameter groups and learning-rate schedules (warmup + cosine / WSD / constant)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only; norms, biases and embeddings are exempt
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine and wsd)
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay: tuple[str, ...] = ()) -> list[dict]:
    """Two groups: 2-D weights of linear layers decay; embeddings, norms, biases and the parameters named in
    ``no_decay`` (a head whose frozen rows must not shrink) do not."""
    no_decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    no_decay_ids |= {id(p) for name, p in model.named_parameters()
                     if name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "") in no_decay}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in no_decay_ids else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, no_decay: tuple[str, ...] = ()) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, no_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=False
    )


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier on ``cfg.lr`` at ``step`` (0-based) of ``total_steps``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    # wsd: warmup, stable at the peak, then a linear decay over the last decay_fraction of training
    decay_steps = max(1, int(round(total_steps * cfg.decay_fraction)))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    t = min(1.0, (step - decay_start) / decay_steps)
    return 1.0 + (floor - 1.0) * t


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))


def budget_position(step: int, elapsed: float, total_steps: int, max_seconds: float) -> int:
    """Where a schedule of ``total_steps`` stands after ``step`` steps and ``elapsed`` seconds of a ``max_seconds``
    budget (0: none): the larger of the step and the time fraction, so a run the clock stops still ends annealed.
    The budget is spent exactly when this reaches ``total_steps`` by time."""
    if max_seconds <= 0:
        return step
    return max(step, int(total_steps * elapsed / max_seconds))


class TimeBudgetLR:
    """The LM's lr schedule: ``lr_factor`` at the step, or, with a wall-clock budget (``train.max_seconds`` > 0), at
    whichever of steps and training time runs out first (:func:`budget_position`).

    ``elapsed`` comes from the caller (agreed over ranks) and is part of the state, so a resumed run keeps counting
    from where it stopped. How many steps a budget buys depends on the machine: the result is deterministic only
    while the step count, not the clock, ends the run. Without a budget the lrs equal LambdaLR's over ``lr_factor``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig, max_seconds: float = 0.0):
        if max_seconds < 0:
            raise ValueError(f"max_seconds must be >= 0 (0: no budget), got {max_seconds}")
        self.optimizer, self.total_steps, self.cfg, self.max_seconds = optimizer, total_steps, cfg, max_seconds
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.step_count = 0  # optimizer steps done
        self.elapsed = 0.0  # training seconds so far, over resumes
        self._apply()

    @property
    def spent(self) -> bool:
        return self.max_seconds > 0 and self.elapsed >= self.max_seconds

    def _apply(self) -> None:
        position = budget_position(self.step_count, self.elapsed, self.total_steps, self.max_seconds)
        factor = lr_factor(min(position, self.total_steps), self.total_steps, self.cfg)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def step(self, step: int, elapsed: float) -> None:
        """After optimizer step ``step`` (1-based count of steps done), ``elapsed`` training seconds in total."""
        self.step_count, self.elapsed = step, elapsed
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "elapsed": self.elapsed, "max_seconds": self.max_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # checkpoints written before this scheduler hold a LambdaLR state: its step, and no clock
        self.step_count = int(state.get("step_count", state.get("last_epoch", 0)))
        self.elapsed = float(state.get("elapsed", 0.0))
        self._apply()
