"""ARENA adapters: low-rank updates in singular-value form with an l1-gated rank.

A frozen layer ``W0`` becomes ``W0 + B·Diag(v)·A`` (poster eq. 2). ``A`` and ``B`` are trained by
the optimizer; ``v`` by proximal steps ``v ← ξ(v − ρ∇v, ηλ)`` (eq. 5) with the soft-thresholding
operator ξ (eq. 6), so components whose gate reaches zero are switched off and every layer finds
its own effective rank (the number of non-zeros of ``v``). With ``v`` frozen at ones the layer is
exactly LoRA (eq. 1) with scaling 1, which is how the fixed-rank LoRA baseline is run.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def soft_threshold(x: torch.Tensor, tau: float) -> torch.Tensor:
    """ξ(x, τ) of poster eq. 6: ``x − τ`` above τ, ``x + τ`` below −τ, 0 in between
    (``torch.nn.functional.softshrink``). Raises ValueError for τ < 0."""
    if tau < 0:
        raise ValueError(f"threshold must be >= 0, got {tau}")
    return F.softshrink(x, float(tau))


class ArenaLayer(nn.Module):
    """``y = W0·x + B·Diag(v)·A·x`` around a frozen ``nn.Linear`` or ``nn.Conv3d``.

    For a Linear layer (``(…, n) → (…, m)``), ``A`` is ``Linear(n, r)`` and ``B`` ``Linear(r, m)``.
    For a Conv3d (``(B, n, D, H, W) → (B, m, D', H', W')``), ``A`` is a convolution with ``r``
    output channels and the layer's kernel, stride, padding and dilation, and ``B`` a 1×1×1
    convolution to ``m`` channels, so that ``B·Diag(v)·A`` is a rank-``r`` update of the kernel.

    Initialisation follows LoRA: ``A`` Kaiming-uniform, ``B`` zero, ``v`` = ``v0``; the adapted
    network therefore starts equal to the backbone.

    Raises:
        TypeError: the layer is neither Linear nor Conv3d.
        ValueError: grouped convolution, or ``rank < 1``.
    """

    def __init__(self, base: nn.Module, rank: int, v0: float = 1.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        if isinstance(base, nn.Linear):
            self.lora_A = nn.Linear(base.in_features, rank, bias=False)
            self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv3d):
            if base.groups != 1:
                raise ValueError("grouped Conv3d layers are not supported by ARENA adapters")
            self.lora_A = nn.Conv3d(base.in_channels, rank, base.kernel_size, base.stride,
                                    base.padding, base.dilation, bias=False,
                                    padding_mode=base.padding_mode)
            self.lora_B = nn.Conv3d(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"ARENA adapts nn.Linear and nn.Conv3d, not {type(base).__name__}")
        self.lora_A.to(base.weight.device, base.weight.dtype)
        self.lora_B.to(base.weight.device, base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.v = nn.Parameter(torch.full((rank,), float(v0), device=base.weight.device))
        self.allocated = rank  # r0: what :meth:`prune` leaves unchanged
        self._w0: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        """Number of components held: r0 until :meth:`prune`, then the effective rank."""
        return self.v.numel()

    @property
    def effective_rank(self) -> int:
        """Number of non-zero entries of ``v``."""
        return int(torch.count_nonzero(self.v.detach()))

    @property
    def merged(self) -> bool:
        return self._w0 is not None

    def _gate(self, h: torch.Tensor) -> torch.Tensor:
        shape = (-1,) if isinstance(self.base, nn.Linear) else (1, -1, 1, 1, 1)
        return h * self.v.to(h.dtype).view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return self.base(x) + self.lora_B(self._gate(self.lora_A(x)))

    def delta_weight(self) -> torch.Tensor:
        """``B·Diag(v)·A`` over the non-zero components only, shaped like ``W0``."""
        keep = torch.nonzero(self.v.detach(), as_tuple=True)[0]
        a = self.lora_A.weight[keep]
        b = self.lora_B.weight[:, keep].reshape(self.lora_B.weight.shape[0], -1)
        return torch.einsum("or,r,r...->o...", b, self.v[keep], a).to(self.base.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``W0`` for inference (a copy of ``W0`` is kept)."""
        if not self.merged:
            self._w0 = self.base.weight.detach().clone()
            self.base.weight += self.delta_weight()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore ``W0`` exactly (from the kept copy, not by subtraction)."""
        if self.merged:
            self.base.weight.copy_(self._w0)
            self._w0 = None

    @torch.no_grad()
    def prune(self) -> None:
        """Drop the switched-off components (``v = 0``) so ``A``, ``B``, ``v`` have the
        effective rank; the layer's output does not change."""
        keep = torch.nonzero(self.v, as_tuple=True)[0]
        if keep.numel() in (0, self.rank):
            return
        a, b = self.lora_A, self.lora_B
        a.weight = nn.Parameter(a.weight[keep].clone())
        b.weight = nn.Parameter(b.weight[:, keep].clone())
        self.v = nn.Parameter(self.v[keep].clone())
        if isinstance(a, nn.Linear):
            a.out_features = b.in_features = keep.numel()
        else:
            a.out_channels = b.in_channels = keep.numel()


def inject_adapters(model: nn.Module, targets: Sequence[str], rank: int | dict[str, int],
                    v0: float = 1.0) -> dict[str, ArenaLayer]:
    """Wrap every ``nn.Linear`` / ``nn.Conv3d`` whose module name matches one of the regular
    expressions ``targets`` (``re.search``) in an :class:`ArenaLayer`, in place.

    Args:
        model: any network, e.g. a MONAI ``UNet`` or ``SwinUNETR``.
        targets: name patterns, e.g. ``[r"attn\\.qkv$"]`` for Swin attention.
        rank: initial rank r0 for all layers, or per layer name (layers absent or with rank 0
            are left alone).

    Returns:
        Adapted layer name → :class:`ArenaLayer`, in module order.

    Raises:
        ValueError: no Linear/Conv3d layer matches.
    """
    matches = [(name, module) for name, module in model.named_modules()
               if isinstance(module, (nn.Linear, nn.Conv3d)) and not name.endswith((".base", "lora_A", "lora_B"))
               and any(re.search(p, name) for p in targets)]
    if isinstance(rank, dict):
        matches = [(n, m) for n, m in matches if rank.get(n, 0) > 0]
    if not matches:
        raise ValueError(f"no nn.Linear or nn.Conv3d module name matches {list(targets)}")
    layers = {}
    for name, module in matches:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        r = rank[name] if isinstance(rank, dict) else rank
        layer = ArenaLayer(module, r, v0)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def effective_ranks(layers: dict[str, ArenaLayer]) -> dict[str, int]:
    """Layer name → number of non-zero gates."""
    return {name: layer.effective_rank for name, layer in layers.items()}


@torch.no_grad()
def proximal_step(layers: Iterable[ArenaLayer], rho: float, threshold: float) -> None:
    """Poster eq. 5 on every gate: ``v ← ξ(v − ρ·∇v L, threshold)``, threshold = ηλ.

    Uses the gradient already in ``v.grad`` (from the backward pass of the current step) and
    clears it."""
    for layer in layers:
        grad = layer.v.grad if layer.v.grad is not None else torch.zeros_like(layer.v)
        layer.v.copy_(soft_threshold(layer.v - rho * grad, threshold))
        layer.v.grad = None


def adapter_parameters(layers: dict[str, ArenaLayer]) -> list[nn.Parameter]:
    """The ``A`` and ``B`` weights: the block updated by the optimizer (eq. 4)."""
    return [p for layer in layers.values() for p in (layer.lora_A.weight, layer.lora_B.weight)]


def count_parameters(layers: dict[str, ArenaLayer], effective: bool = True) -> int:
    """Adapter parameters (A, B, v): of the active components only when ``effective``."""
    total = 0
    for layer in layers.values():
        r = layer.effective_rank if effective else layer.rank
        per_component = layer.lora_A.weight[0].numel() + layer.lora_B.weight.shape[0] + 1
        total += r * per_component
    return total
