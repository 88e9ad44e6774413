"""Numerical precision and memory on the CPU and CUDA: bf16 autocast where the hardware runs it
natively, the float32 route around oneDNN's bf16 Conv3d defect, and glibc's allocator settings
for 3D networks. Used by training, inference and pretraining alike."""

from __future__ import annotations

import contextlib
import ctypes
import platform

import torch
from torch import nn


def native_bf16() -> bool:
    """The CPU has bf16 instructions (AVX512-BF16 or AMX), so that oneDNN runs bf16
    convolutions natively; elsewhere bf16 would be emulated and slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (halves activation memory) and on CPUs with :func:`native_bf16`
    (a training step in about 70 % of float32's time, ``bench/PROFILE.md``); otherwise a no-op."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bf16_defective(x: torch.Tensor, kernel_size) -> bool:
    """True where a 3D convolution of ``x`` ``(B, C, D, H, W)`` must not run in bf16 on the CPU:
    under CPU autocast, ``D == 2`` and a kernel deeper than 1. There oneDNN's bf16 kernel
    (PyTorch 2.13, seen on an AVX512-BF16 CPU) reads memory it did not write and returns a wrong
    weight gradient, off by more than its own norm and at times non-finite
    (``Testing/test_precision.py``). Only the deepest level of a crop that is thin across the
    first axis (a 32-voxel slab painted on sagittal slices) meets it, so the float32 work is small."""
    return (x.device.type == "cpu" and x.dim() == 5 and x.shape[2] == 2 and kernel_size[0] > 1
            and torch.is_autocast_enabled("cpu"))


class _Bf16SafeConv3d(nn.Conv3d):
    """A ``Conv3d`` that computes in float32 where :func:`bf16_defective`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bf16_defective(x, self.kernel_size):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def guard_bf16_defects(model: nn.Module) -> nn.Module:
    """Make every ``nn.Conv3d`` of ``model`` (adapters included) a :class:`_Bf16SafeConv3d`,
    in place: same weights, same state-dict keys, same results in float32. Call it on a model
    about to be trained under :func:`autocast`; returns ``model``. (AdaLoRA's functional
    convolution checks :func:`bf16_defective` itself.)"""
    for module in model.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = _Bf16SafeConv3d
    return model


_REUSING: bool | None = None


def reuse_freed_memory() -> bool:
    """Let glibc keep freed memory in the process instead of returning it to the system after
    every tensor: ``mallopt`` M_MMAP_THRESHOLD at 32 MiB on 64-bit (the largest glibc accepts,
    4 Mi × ``sizeof(long)``) and M_TRIM_THRESHOLD at 256 MiB. PyTorch has no caching allocator
    on the CPU, and a 3D network frees tens of MB per layer, so each step otherwise spends much
    of its time in the kernel mapping and zeroing pages (a training step about 2× faster on the
    2-core benchmark machine, ``bench/PROFILE.md``). Blocks above the threshold (whole volumes)
    are still returned at once. Once per process; nothing where the C library is not glibc.

    Returns:
        True when glibc took both settings.
    """
    global _REUSING
    if _REUSING is not None:
        return _REUSING
    _REUSING = False
    if platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL(None)
            mmap = libc.mallopt(-3, 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long))  # M_MMAP_THRESHOLD
            trim = libc.mallopt(-1, 256 * 1024 * 1024)  # M_TRIM_THRESHOLD
            _REUSING = mmap == 1 and trim == 1
        except (OSError, AttributeError):
            pass
    return _REUSING
