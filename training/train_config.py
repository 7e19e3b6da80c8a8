"""The LM training loop's own slice of a recipe: how long, how big a batch, how often to log and save."""

from __future__ import annotations

from dataclasses import dataclass

from anyloom.config import added_field


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # sequences per optimizer step, summed over ranks and accumulation
    seq_len: int = 512
    grad_accum: int = 1  # micro-batches per optimizer step
    log_every: int = 10
    ckpt_every: int = 200  # 0: only at the end
    keep_last: int = 2  # complete checkpoints kept on disk
    sample_every: int = 0  # 0: no periodic samples
    async_checkpoint: bool = False  # write checkpoints in the background (training continues meanwhile)
    max_bad_steps: int = 5  # abort after this many non-finite (skipped) steps in a row
    spike_factor: float = 2.0  # log a spike when loss > spike_factor x its mean over the last spike_window steps
    spike_window: int = 50
    # Wall-clock budget of the training steps in seconds (0: none; checkpoints and samples do not count). The lr
    # schedule then follows whichever of steps and time runs out first (training.optim.TimeBudgetLR), so a run on a
    # slower machine stops early but annealed; how many steps it gets then depends on the machine.
    max_seconds: float = 0.0
    # Pack whole documents: a document that does not fit in what is left of a row starts the next row (the rest
    # is padding, never trained) instead of being split (sequences.packing). Only documents > seq_len are cut.
    whole_documents: bool = False
    # The LM's own seed (initial weights, data order); None: run.seed. run.seed also seeds the audio tokenizer, so a
    # replicate of the LM alone on the same tokenizers sets this instead and keeps every earlier stage up to date.
    seed: int | None = added_field(None)

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "keep_last", "max_bad_steps",
                    "spike_window")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.max_seconds < 0:
            raise ValueError(f"max_seconds must be >= 0 (0: no budget), got {self.max_seconds}")
        if self.ckpt_every < 0 or self.sample_every < 0:
            raise ValueError("ckpt_every and sample_every must be >= 0 (0 disables)")
