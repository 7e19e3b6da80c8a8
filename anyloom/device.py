"""Device selection from a recipe string, and what a device multiplies natively."""

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


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (oneDNN then runs bf16 matmuls on them)."""
    return bool(torch.cpu._is_amx_tile_supported())


def cpu_has_avx512_bf16() -> bool:
    """Whether this CPU has AVX-512 BF16 instructions (oneDNN's bf16 matmuls and convs then outrun fp32 ones)."""
    return bool(torch.cpu._is_avx512_bf16_supported())


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively: AMX tiles or AVX-512 BF16."""
    return cpu_has_amx() or cpu_has_avx512_bf16()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 natively: a CUDA GPU with bf16 support, or such a CPU."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()
