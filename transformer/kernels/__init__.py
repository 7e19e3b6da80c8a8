"""Fused kernels: Triton implementations registered as torch custom ops, each next to a PyTorch fallback with
the same API. Triton is imported lazily, only when a Triton path is actually taken."""
