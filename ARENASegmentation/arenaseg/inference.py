"""Sliding-window inference (MONAI) on a canonical CT tensor."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from torch import nn


def autocast(device: torch.device):
    """bf16 autocast on CUDA (halves activation memory), a no-op on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def sliding_window_logits(model: nn.Module, x: torch.Tensor, roi_size, device: torch.device,
                          overlap: float = 0.25,
                          progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Logits of ``model`` over a whole canonical volume.

    Args:
        model: network mapping ``(B, 1, *roi_size)`` to ``(B, C, *roi_size)``.
        x: canonical CT ``(1, X, Y, Z)`` (CPU).
        roi_size: window size in voxels; windows overlap by ``overlap`` with Gaussian blending
            (MONAI ``sliding_window_inference``).
        device: where the windows run; the full-size result is kept on the CPU.
        progress: called after each window with (windows done, windows in all).

    Returns:
        float32 logits ``(C, X, Y, Z)`` on the CPU.
    """
    was_training = model.training
    model.eval()
    predictor = model
    if progress:
        total, done = window_count(x.shape[1:], roi_size, overlap), 0

        def predictor(window):
            nonlocal done
            out = model(window)
            done += 1
            progress(min(done, total), total)
            return out
    with autocast(device):
        out = sliding_window_inference(x[None], roi_size=roi_size, sw_batch_size=1,
                                       predictor=predictor, overlap=overlap, mode="gaussian",
                                       sw_device=device, device=torch.device("cpu"))
    model.train(was_training)
    return out[0].float()


def window_count(size, roi_size, overlap: float) -> int:
    """Number of windows MONAI's ``sliding_window_inference`` runs over a volume of ``size``
    (it pads the volume to at least ``roi_size`` and steps by ``roi·(1 − overlap)``)."""
    size = [max(s, r) for s, r in zip(size, roi_size)]
    interval = [int(r * (1 - overlap)) if r < s else r for s, r in zip(size, roi_size)]
    return len(dense_patch_slices(size, roi_size, [max(i, 1) for i in interval]))


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
