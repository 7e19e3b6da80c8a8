"""The decoder-only transformer (Llama-style with Chameleon's QK-norm and z-loss), its attention backends,
fused Triton kernels, KV cache and importers of Chameleon / Emu3 / Llama language models. Trains on integer
ids only: nothing here imports tokenizers, sequences or decoders."""
