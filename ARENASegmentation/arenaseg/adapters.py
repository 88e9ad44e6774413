"""ARENA adapters: low-rank updates in singular-value form with an l1-gated rank.

A frozen layer ``W0`` becomes ``W0 + s·B·Diag(v)·A`` (poster eq. 2), ``s`` the spectral norm of
``W0``, so that a gate is the singular value of the update relative to the layer's own largest
one and one step size means the same in every layer. ``A`` and ``B`` are trained by the
optimizer; the gates ``v`` by proximal steps ``v ← ξ(v − ρη·∇̂v, ηλ)`` (eq. 5, with the gradient
normalised per layer: :class:`GateSteps`) with the soft-thresholding operator ξ (eq. 6), so
components whose gate reaches zero are switched off and every layer finds its own effective rank
(the number of non-zeros of ``v``).

The start is the one of an SVD, as PEFT's AdaLoRA starts its singular values at zero: every gate
at 0 (the adapted network equals the backbone) and ``A``, ``B`` orthonormal, set by
:meth:`ArenaLayer.align` to the leading singular vectors of the loss gradient with respect to
``W0`` on the first batch. Each gate then receives the gradient ``s·σ_i`` from the first step,
and a component turns on only when the loss pulls it up: more allocated components (r0) add
directions of ever smaller gradient, which stay off (``bench/COMPARISON.md``, rank robustness).
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
    """``y = W0·x + s·B·Diag(v)·A·x`` around a frozen ``nn.Linear`` or ``nn.Conv3d``, ``s`` the
    spectral norm of ``W0`` (flattened to ``(out, in·kD·kH·kW)``).

    For a Linear layer (``(…, n) → (…, m)``), ``A`` is ``Linear(n, r)`` and ``B`` ``Linear(r, m)``.
    For a Conv3d (``(B, n, D, H, W) → (B, m, D', H', W')``), ``A`` is a convolution with ``r``
    output channels and the layer's kernel, stride, padding and dilation, and ``B`` a 1×1×1
    convolution to ``m`` channels, so that ``B·Diag(v)·A`` is a rank-``r`` update of the kernel.

    Initialisation: every gate ``v`` at 0, so the adapted network starts equal to the
    backbone; ``A`` (rows) and ``B`` (columns) orthonormal and random until :meth:`align` points
    them at the loss gradient.

    Raises:
        TypeError: the layer is neither Linear nor Conv3d.
        ValueError: grouped convolution, or ``rank < 1``.
    """

    def __init__(self, base: nn.Module, rank: int):
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
        with torch.no_grad():
            nn.init.orthogonal_(self.lora_A.weight.view(rank, -1))
            nn.init.orthogonal_(self.lora_B.weight.view(-1, rank))
        self.v = nn.Parameter(torch.zeros(rank, device=base.weight.device))
        # an all-zero W0 (a layer never trained) still gets a usable step
        self.scale = float(torch.linalg.matrix_norm(base.weight.detach().flatten(1).float(), ord=2)) or 1.0
        self.allocated = rank  # r0: what :meth:`prune` leaves unchanged
        self._w0: torch.Tensor | None = None

    @torch.no_grad()
    def align(self, grad: torch.Tensor) -> None:
        """Point the components at the leading singular directions of ``grad`` (the loss
        gradient with respect to ``W0``, shaped like ``W0``): row ``i`` of ``A`` and column ``i``
        of ``B`` become its ``i``-th right and left singular vectors (``torch.linalg.svd``), so
        gate ``i`` receives the gradient ``s·σ_i``. Components beyond the rank of ``grad``
        (e.g. r0 = 32 on a one-channel 3×3×3 convolution, 27 columns) get zero vectors and
        can never switch on. The gates are set to 0: the layer's output does not change."""
        u, _, vh = torch.linalg.svd(grad.detach().flatten(1).float(), full_matrices=False)
        k = min(self.rank, vh.shape[0])
        a, b = self.lora_A.weight.view(self.rank, -1), self.lora_B.weight.view(-1, self.rank)
        a.zero_()
        b.zero_()
        a[:k] = vh[:k].to(a.dtype)
        b[:, :k] = u[:, :k].to(b.dtype)
        self.v.zero_()

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
        return h * (self.scale * self.v).to(h.dtype).view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return self.base(x) + self.lora_B(self._gate(self.lora_A(x)))

    def delta_weight(self) -> torch.Tensor:
        """``s·B·Diag(v)·A`` over the non-zero components only, shaped like ``W0``."""
        keep = torch.nonzero(self.v.detach(), as_tuple=True)[0]
        a = self.lora_A.weight[keep]
        b = self.lora_B.weight[:, keep].reshape(self.lora_B.weight.shape[0], -1)
        return torch.einsum("or,r,r...->o...", b, self.scale * self.v[keep], a).to(self.base.weight.dtype)

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


def inject_adapters(model: nn.Module, targets: Sequence[str],
                    rank: int | dict[str, int]) -> dict[str, ArenaLayer]:
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
        layer = ArenaLayer(module, r)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def effective_ranks(layers: dict[str, ArenaLayer]) -> dict[str, int]:
    """Layer name → number of non-zero gates."""
    return {name: layer.effective_rank for name, layer in layers.items()}


class GateSteps:
    """The proximal steps on the gates of every layer (poster eq. 5, the gradient normalised
    per layer): ``v ← ξ(v − ρη·m̂/√ŝ, ηλ)``, ``m`` the running mean of each gate's gradient
    (β1 = 0.9) and ``s`` the running mean of the layer's largest squared gate gradient
    (β2 = 0.999), both bias-corrected as in Adam.

    Why normalised: the gates' raw gradients differ by three orders of magnitude between
    layers (σ1 of the first batch's gradient: 3.7 in the first convolution, 0.003 in the
    bottleneck), so a plain step ``ρ∇v`` either moves nothing deep or overshoots near the input.
    One denominator per layer keeps the ratios between a layer's gates: its components still
    compete by how strongly the loss pulls them.
    """

    def __init__(self, layers: Iterable[ArenaLayer], betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-12):
        self.layers, self.betas, self.eps = list(layers), betas, eps
        self.moments: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.layers)
        self.count = 0

    @torch.no_grad()
    def step(self, size: float, threshold: float) -> None:
        """One proximal step of every gate with step ``size`` (ρη) and soft threshold
        ``threshold`` (ηλ), from the gradient in ``v.grad`` (cleared). The running moments
        start where the gates are (device, size), and again after a layer was pruned."""
        self.count += 1
        b1, b2 = self.betas
        for i, layer in enumerate(self.layers):
            g = layer.v.grad if layer.v.grad is not None else torch.zeros_like(layer.v)
            if self.moments[i] is None or self.moments[i][0].shape != g.shape \
                    or self.moments[i][0].device != g.device:
                self.moments[i] = (torch.zeros_like(g), torch.zeros((), device=g.device))
            m, s = self.moments[i]
            m = b1 * m + (1 - b1) * g
            s = b2 * s + (1 - b2) * g.square().max()
            self.moments[i] = (m, s)
            direction = (m / (1 - b1 ** self.count)) / ((s / (1 - b2 ** self.count)).sqrt() + self.eps)
            layer.v.copy_(soft_threshold(layer.v - size * direction, threshold))
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
