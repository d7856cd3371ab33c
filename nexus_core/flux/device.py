"""Accelerator facts the flux steps check before doing any work."""

from __future__ import annotations

from pathlib import Path

from nexus_core.errors import ConfigError


def resolve_device(name: str = "auto") -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; anything else is returned as given."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError([f"device: {name!r} requested but no CUDA device is visible"])
    return name


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bfloat16 instructions (AVX512-BF16 or AMX); emulated bf16 is far too slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def dtype_supported(device: str, dtype: str) -> bool:
    """Whether ``device`` computes in ``dtype`` natively (float32 always)."""
    import torch

    if dtype == "float32":
        return True
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported() if dtype == "bfloat16" else True
    return dtype == "bfloat16" and cpu_has_native_bf16()


def check_dtype(device: str, dtype: str, key: str) -> None:
    """Raise one clear ConfigError naming ``key`` when ``device`` lacks ``dtype``."""
    if not dtype_supported(device, dtype):
        raise ConfigError([f"{key}: {dtype} is not supported on device {device!r}; use float32"
                           + (" or run on a GPU" if device == "cpu" else "")])
