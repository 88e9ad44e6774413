"""Sliding-window inference (MONAI) on a canonical CT tensor."""

from __future__ import annotations

import contextlib

import torch
from monai.inferers import sliding_window_inference
from torch import nn


def autocast(device: torch.device):
    """bf16 autocast on CUDA (halves activation memory), a no-op on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def sliding_window_logits(model: nn.Module, x: torch.Tensor, roi_size, device: torch.device,
                          overlap: float = 0.25) -> torch.Tensor:
    """Logits of ``model`` over a whole canonical volume.

    Args:
        model: network mapping ``(B, 1, *roi_size)`` to ``(B, C, *roi_size)``.
        x: canonical CT ``(1, X, Y, Z)`` (CPU).
        roi_size: window size in voxels; windows overlap by ``overlap`` with Gaussian blending
            (MONAI ``sliding_window_inference``).
        device: where the windows run; the full-size result is kept on the CPU.

    Returns:
        float32 logits ``(C, X, Y, Z)`` on the CPU.
    """
    was_training = model.training
    model.eval()
    with autocast(device):
        out = sliding_window_inference(x[None], roi_size=roi_size, sw_batch_size=1,
                                       predictor=model, overlap=overlap, mode="gaussian",
                                       sw_device=device, device=torch.device("cpu"))
    model.train(was_training)
    return out[0].float()


def pick_device(requested: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without CUDA raises :class:`ArenaError`;
    a ``torch.device`` is returned as it is."""
    from .errors import ArenaError

    if isinstance(requested, torch.device):
        return requested
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ArenaError("--device cuda was asked for but no CUDA GPU is visible to PyTorch "
                         f"(torch {torch.__version__}): use --device cpu or auto, or install a "
                         "CUDA build of PyTorch")
    if requested not in ("cpu", "cuda"):
        raise ArenaError(f"--device '{requested}' is not one of auto, cpu, cuda")
    return torch.device(requested)
