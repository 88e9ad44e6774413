"""The ARENA training loop: block coordinate descent on (A, B, head) and proximal steps on v.

Each step (poster eq. 4–5): crops of the canonical CT around painted voxels go through the
network; the logits are sampled (trilinearly) at the exact positions of the painted voxels, so
the loss sees only the painted slices, at their own resolution, whatever the grids; an AdamW step
(learning rate η) updates A, B and the head; then every gate is updated by
``v ← ξ(v − ρ∇v L, ηλ)`` using the gradient of the same backward pass.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from .adapters import ArenaLayer, adapter_parameters, effective_ranks, proximal_step
from .errors import ArenaError
from .inference import autocast

ProgressFn = Callable[[int, float, dict], None]


class Cancelled(Exception):
    """Raised inside training when the caller asks to stop (e.g. SIGTERM in the worker)."""


@dataclass
class AdaptSettings:
    """Settings of one adaptation (defaults chosen by the sweep in ``bench/SWEEP.md``).

    Attributes:
        method: ``"arena"`` (gated, proximal l1) or ``"lora"`` (same layers, ``v`` fixed to 1,
            no penalty: fixed-rank LoRA).
        rank: initial rank r0 of every adapted layer.
        lam: λ, weight of the l1 penalty on ``v`` (eq. 3); threshold per step is ``lr·lam``.
        lr: η, AdamW learning rate of A, B and the head (eq. 4).
        rho: ρ, gradient step on ``v`` before soft thresholding (eq. 5).
        steps: optimizer steps.
        v0: initial value of every gate.
        crops_per_step: random crops per step around painted voxels, half of them centred on
            the structure.
        slab: crop thickness in voxels across the painted slices (the ROI elsewhere): the loss
            lives on the painted slices only, so thin slabs save most of the compute.
        max_points: painted voxels sampled per crop for the loss (memory bound).
        seed: random seed of crops and initialisation.
    """

    method: str = "arena"
    rank: int = 8
    lam: float = 4.0
    lr: float = 5e-3
    rho: float = 5.0
    steps: int = 60
    v0: float = 1.0
    crops_per_step: int = 2
    slab: int = 32
    max_points: int = 50_000
    seed: int = 0

    def __post_init__(self):
        problems = [f"--method '{self.method}' is not arena or lora"] if self.method not in ("arena", "lora") else []
        problems += [f"--{name} {value} must be {rule}" for name, value, ok, rule in (
            ("rank", self.rank, self.rank >= 1, ">= 1"), ("steps", self.steps, self.steps >= 1, ">= 1"),
            ("lambda", self.lam, self.lam >= 0, ">= 0"), ("lr", self.lr, self.lr > 0, "> 0"),
            ("rho", self.rho, self.rho >= 0, ">= 0"), ("slab", self.slab, self.slab >= 16 and self.slab % 16 == 0, "a multiple of 16"),
            ("crops_per_step", self.crops_per_step, self.crops_per_step >= 1, ">= 1")) if not ok]
        if problems:
            raise ArenaError("; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainingLog:
    """Loss and total effective rank after each step, and the per-layer ranks at the end."""

    loss: list[float] = field(default_factory=list)
    total_rank: list[int] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def default_loss() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Dice + binary cross-entropy on logits (MONAI ``DiceCELoss(sigmoid=True)``); inputs
    ``(1, 1, N)`` logits and targets at the painted voxels."""
    return DiceCELoss(sigmoid=True)


def _crop_starts(center: np.ndarray, shape, roi, rng) -> np.ndarray:
    jitter = rng.integers(-np.asarray(roi) // 4, np.asarray(roi) // 4 + 1)
    start = np.round(center).astype(int) - np.asarray(roi) // 2 + jitter
    return np.clip(start, 0, np.asarray(shape) - np.asarray(roi))


def sample_logits(logits: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``logits`` ``(1, C, X, Y, Z)`` at continuous voxel coordinates
    ``coords`` ``(N, 3)`` (x, y, z order) → ``(1, C, N)`` (``torch.nn.functional.grid_sample``)."""
    size = torch.tensor(logits.shape[2:], dtype=coords.dtype, device=coords.device)
    norm = 2 * coords / (size - 1) - 1
    grid = norm.flip(-1).view(1, 1, 1, -1, 3).to(logits.dtype)  # grid_sample wants (z, y, x)
    return F.grid_sample(logits, grid, mode="bilinear", align_corners=True).view(1, logits.shape[1], -1)


def train_adapters(model: nn.Module, layers: dict[str, ArenaLayer], head: nn.Module,
                   x: torch.Tensor, coords: np.ndarray, targets: np.ndarray, roi_size,
                   settings: AdaptSettings, device: torch.device,
                   loss_fn: Callable | None = None, progress: ProgressFn | None = None,
                   should_stop: Callable[[], bool] | None = None) -> TrainingLog:
    """Train the adapters and head of ``model`` on painted voxels.

    Args:
        model: backbone with adapters injected (``layers``) and a new ``head``; frozen elsewhere.
        x: canonical CT ``(1, X, Y, Z)`` in [0, 1] (CPU).
        coords: ``(N, 3)`` canonical voxel coordinates of the painted voxels (float).
        targets: ``(N,)`` 1 = structure, 0 = background.
        roi_size: crop size in voxels (the backbone's ROI).
        loss_fn: ``(logits (1, 1, M), targets (1, 1, M)) → scalar``; default Dice + CE.
        progress: called after each step with (step, loss, per-layer effective ranks).
        should_stop: polled every step; when it returns True, :class:`Cancelled` is raised.

    Returns:
        A :class:`TrainingLog`.
    """
    loss_fn = loss_fn or default_loss()
    rng = np.random.default_rng(settings.seed)
    roi = np.maximum(np.asarray(roi_size), 1)
    pad = [int(max(r - s, 0)) for s, r in zip(x.shape[1:], roi)]
    x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))  # at the end: coordinates stay valid
    shape = np.asarray(x.shape[1:])
    coords_t = torch.as_tensor(coords, dtype=torch.float32)
    targets_t = torch.as_tensor(targets, dtype=torch.float32)
    positive = np.flatnonzero(targets > 0.5)

    arena = settings.method == "arena"
    for layer in layers.values():
        layer.v.requires_grad_(arena)
    params = adapter_parameters(layers) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    model.to(device).train()
    log = TrainingLog()
    start = time.perf_counter()
    for step in range(1, settings.steps + 1):
        crops, picks = [], []
        for c in range(settings.crops_per_step):
            pool = positive if (c % 2 == 0 and positive.size) else np.arange(len(coords))
            s = _crop_starts(coords[rng.choice(pool)], shape, roi, rng)
            inside = np.flatnonzero(np.all((coords >= s) & (coords <= s + roi - 1), axis=1))
            if inside.size > settings.max_points:
                inside = rng.choice(inside, settings.max_points, replace=False)
            crops.append(x[:, s[0]:s[0] + roi[0], s[1]:s[1] + roi[1], s[2]:s[2] + roi[2]])
            picks.append((torch.as_tensor(s, dtype=torch.float32), torch.as_tensor(inside)))
        batch = torch.stack(crops).to(device)
        with autocast(device):
            logits = model(batch)
        sampled = torch.cat([sample_logits(logits[b:b + 1].float(),
                                           (coords_t[idx] - s).to(device))
                             for b, (s, idx) in enumerate(picks)], dim=-1)
        target = torch.cat([targets_t[idx] for _, idx in picks]).to(device).view(1, 1, -1)
        loss = loss_fn(sampled, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if arena:
            proximal_step(layers.values(), settings.rho, settings.lr * settings.lam)
        ranks = effective_ranks(layers)
        loss_value = loss.item()
        log.loss.append(loss_value)
        log.total_rank.append(sum(ranks.values()))
        if progress:
            progress(step, loss_value, ranks)
        if should_stop and should_stop():
            raise Cancelled()
    log.ranks = effective_ranks(layers)
    log.seconds = time.perf_counter() - start
    return log
