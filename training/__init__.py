"""Shared training infrastructure: run directories, metrics, progress, seeding, devices, weights, optimizers.

The tokenizer, LM and decoder training loops all build on these pieces; none of them knows about the
others. Distributed (FSDP2/DCP) training adds to this in its own modules.
"""
