"""Training: run directories, metrics, seeding, optimizers, checkpoints, distributed setup; the trainers of each
model and the recipe chain behind `make train` (``chain``).

The tokenizer, LM and decoder training loops all build on these pieces; none of them knows about the
others. Distributed (FSDP2/DCP) training adds to this in its own modules.
"""
