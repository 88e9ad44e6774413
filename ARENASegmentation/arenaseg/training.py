"""The training loop shared by every method: for ARENA, block coordinate descent on (A, B, head)
and proximal steps on v.

Before the first step the method may start from one batch's gradient (ARENA's SVD start). Each
step (poster eq. 4–5): crops of the canonical CT around painted voxels go through the
network; the logits are sampled (trilinearly) at the exact positions of the painted voxels, so
the loss sees only the painted slices, at their own resolution, whatever the grids; an AdamW step
(learning rate η) updates the method's trainable parameters (for ARENA: A, B and the head); then
the method's hook runs (for ARENA every gate is updated by ``v ← ξ(v − ρη·∇̂v L, ηλ)``, the
gradient of the same backward pass normalised per layer; see :mod:`arenaseg.methods`). On a
backbone whose decoder starts untrained, the decoder first becomes the frozen-feature linear
probe fitted on all painted voxels (``model.start_decoder``: linear probing, then fine-tuning;
Kumar et al., ICLR 2022), and η warms up linearly over the first steps (``Method.warmup``,
PyTorch ``LinearLR``); the gates' step keeps the full η.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from .config import DEFAULT_LR, FULL_FINE_TUNING_LR, AdaptSettings  # noqa: F401 (re-exported)
from .errors import ArenaError, Cancelled  # noqa: F401 (Cancelled is re-exported)
from .precision import autocast, guard_bf16_defects, reuse_freed_memory
from .methods import Method

ProgressFn = Callable[[int, float, dict], None]


@dataclass
class TrainingLog:
    """Loss and total effective rank after each step, and the per-layer ranks at the end."""

    loss: list[float] = field(default_factory=list)
    total_rank: list[int] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    #: wall seconds of all steps by part: forward, backward, optimizer, method hook, progress
    parts: dict[str, float] = field(default_factory=dict)

    def extend(self, more: "TrainingLog") -> None:
        """Append the log of a further training (a round of self-training) to this one."""
        self.loss += more.loss
        self.total_rank += more.total_rank
        self.ranks = more.ranks
        self.seconds += more.seconds
        for part, seconds in more.parts.items():
            self.parts[part] = self.parts.get(part, 0.0) + seconds


def default_loss() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Dice + binary cross-entropy on logits (MONAI ``DiceCELoss(sigmoid=True)``); inputs
    ``(1, 1, N)`` logits and targets at the painted voxels."""
    return DiceCELoss(sigmoid=True)


def _crop_starts(center: np.ndarray, shape, roi, rng) -> np.ndarray:
    jitter = rng.integers(-np.asarray(roi) // 4, np.asarray(roi) // 4 + 1)
    start = np.round(center).astype(int) - np.asarray(roi) // 2 + jitter
    return np.clip(start, 0, np.asarray(shape) - np.asarray(roi))


def _inside(coords: np.ndarray, start: np.ndarray, roi, most: int, rng) -> torch.Tensor:
    """Indices of the ``(N, 3)`` points inside the crop at ``start`` (at most ``most``, random)."""
    inside = np.flatnonzero(np.all((coords >= start) & (coords <= start + roi - 1), axis=1))
    if inside.size > most:
        inside = rng.choice(inside, most, replace=False)
    return torch.as_tensor(inside)


def sample_logits(logits: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``logits`` ``(1, C, X, Y, Z)`` at continuous voxel coordinates
    ``coords`` ``(N, 3)`` (x, y, z order) → ``(1, C, N)`` (``torch.nn.functional.grid_sample``)."""
    size = torch.tensor(logits.shape[2:], dtype=coords.dtype, device=coords.device)
    norm = 2 * coords / (size - 1) - 1
    grid = norm.flip(-1).view(1, 1, 1, -1, 3).to(logits.dtype)  # grid_sample wants (z, y, x)
    return F.grid_sample(logits, grid, mode="bilinear", align_corners=True).view(1, logits.shape[1], -1)


def run_steps(step_loss: Callable[[int], torch.Tensor], optimizer: torch.optim.Optimizer | None,
              steps: int, scheduler=None,
              after_step: Callable[[int, torch.Tensor], None] | None = None,
              seconds: dict[str, float] | None = None) -> None:
    """The optimisation loop of every training in arenaseg (:func:`train`, and
    :func:`arenaseg.pretrain.pretrain`): for step = 1 … ``steps``, the loss
    ``step_loss(step)`` (a scalar tensor with its graph), its gradients, an optimizer step, a
    scheduler step when given, then ``after_step(step, loss)`` (a method's hook, logging,
    progress; it may raise to stop, e.g. :class:`Cancelled`).

    Args:
        step_loss: builds the step's batch and returns its loss; may raise (e.g. a
            non-finite loss as :class:`~arenaseg.errors.ArenaError`).
        optimizer: updates the trained parameters; None only with ``steps == 0``.
        steps: number of steps (0: nothing runs).
        scheduler: a learning-rate scheduler stepped after each optimizer step, or None.
        seconds: when given, wall seconds are added up in it under ``forward`` (batch, network,
            loss), ``backward``, ``optimizer`` and ``after step``.
    """
    clock, spent = time.perf_counter, {"forward": 0.0, "backward": 0.0, "optimizer": 0.0,
                                       "after step": 0.0}
    for step in range(1, steps + 1):
        t0 = clock()
        loss = step_loss(step)
        t1 = clock()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = clock()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        t3 = clock()
        if after_step is not None:
            after_step(step, loss)
        for part, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2, clock() - t3)):
            spent[part] += dt
    if seconds is not None:
        for part, dt in spent.items():
            seconds[part] = seconds.get(part, 0.0) + dt


class ImageCrops:
    """Crops of the canonical CT itself, padded at the end up to the crop size (coordinates stay
    valid): what every backbone without a cache of its frozen part (``model.crops``) trains on.

    Attributes:
        shape: ``(X, Y, Z)`` of the padded volume.
    """

    def __init__(self, x: torch.Tensor, roi):
        pad = [int(max(r - s, 0)) for s, r in zip(x.shape[1:], roi)]
        self.x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        self.shape = tuple(self.x.shape[1:])

    def crop(self, start, roi, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
        """``(1, 1, *roi)`` at ``start`` ``(X, Y, Z)`` on ``device``, and ``start``."""
        s = start
        return self.x[None, :, s[0]:s[0] + roi[0], s[1]:s[1] + roi[1], s[2]:s[2] + roi[2]].to(device), s


def train(tuning: Method, x: torch.Tensor, coords: np.ndarray, targets: np.ndarray, roi_size,
          settings: AdaptSettings, device: torch.device, loss_fn: Callable | None = None,
          progress: ProgressFn | None = None,
          should_stop: Callable[[], bool] | None = None,
          pseudo: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> TrainingLog:
    """Train ``tuning``'s parameters (adapters, head, …) on painted voxels.

    Args:
        tuning: the backbone prepared for the method (:func:`arenaseg.methods.prepare`).
        x: canonical CT ``(1, X, Y, Z)`` in [0, 1] (CPU).
        coords: ``(N, 3)`` canonical voxel coordinates of the painted voxels (float).
        targets: ``(N,)`` 1 = structure, 0 = background.
        roi_size: crop size in voxels (the backbone's ROI).
        loss_fn: ``(logits (1, 1, M), targets (1, 1, M)) → scalar``; default Dice + CE.
        progress: called after each step with (step, loss, per-layer effective ranks).
            Zero-shot (nothing to train) runs no step.
        should_stop: polled every step; when it returns True, :class:`Cancelled` is raised.
        pseudo: weak labels ``(coords (M, 3), targets (M,), weights (M,))`` in canonical voxel
            coordinates (e.g. :func:`arenaseg.io.annotations.interpolate`): a weighted binary
            cross-entropy on them is added to the loss.

    Returns:
        A :class:`TrainingLog`.
    """
    reuse_freed_memory()
    loss_fn = loss_fn or default_loss()
    rng = np.random.default_rng(settings.seed)
    roi = np.maximum(np.asarray(roi_size), 1)
    coords_t = torch.as_tensor(coords, dtype=torch.float32)
    targets_t = torch.as_tensor(targets, dtype=torch.float32)
    positive = np.flatnonzero(targets > 0.5)
    if pseudo is not None and len(pseudo[0]):
        pseudo_t = [torch.as_tensor(a, dtype=torch.float32) for a in pseudo]
    else:
        pseudo = None

    model = guard_bf16_defects(tuning.model)
    params = tuning.parameters()
    lr = settings.learning_rate
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if params else None
    model.to(device).train()
    source = model.crops(x, device, roi) if hasattr(model, "crops") else ImageCrops(x, roi)
    start_decoder = getattr(model, "start_decoder", None)
    if tuning.fresh_decoder and start_decoder:
        start_decoder(source, coords, targets, device)
        tuning.fresh_decoder = False
    shape = np.asarray(source.shape)
    log = TrainingLog()
    start = time.perf_counter()

    def step_loss(step: int) -> torch.Tensor:
        crops, picks = [], []
        for c in range(settings.crops_per_step):
            pool = positive if (c % 2 == 0 and positive.size) else np.arange(len(coords))
            crop, s = source.crop(_crop_starts(coords[rng.choice(pool)], shape, roi, rng), roi, device)
            s = np.asarray(s)
            inside = _inside(coords, s, roi, settings.max_points, rng)
            crops.append(crop)
            picks.append((torch.as_tensor(s, dtype=torch.float32), inside,
                          _inside(pseudo[0], s, roi, settings.max_points, rng) if pseudo else None))
        with autocast(device):  # cached features come as one state per crop
            logits = model(torch.cat(crops)) if torch.is_tensor(crops[0]) else \
                torch.cat([model(crop) for crop in crops])
        sampled = torch.cat([sample_logits(logits[b:b + 1].float(),
                                           (coords_t[idx] - s).to(device))
                             for b, (s, idx, _) in enumerate(picks)], dim=-1)
        target = torch.cat([targets_t[idx] for _, idx, _ in picks]).to(device).view(1, 1, -1)
        loss = loss_fn(sampled, target) + tuning.penalty()
        if pseudo:
            weak = torch.cat([sample_logits(logits[b:b + 1].float(), (pseudo_t[0][idx] - s).to(device))
                              for b, (s, _, idx) in enumerate(picks)], dim=-1).view(-1)
            idx = torch.cat([idx for _, _, idx in picks])
            if len(idx):
                bce = F.binary_cross_entropy_with_logits(weak, pseudo_t[1][idx].to(device),
                                                         reduction="none")
                loss = loss + (pseudo_t[2][idx].to(device) * bce).mean()
        if not torch.isfinite(loss):
            raise ArenaError(f"the training loss became {loss.item()} at step {step} (learning "
                             f"rate {lr}): lower --lr, or start without --warm-start")
        return loss

    def after_step(step: int, loss: torch.Tensor) -> None:
        t = time.perf_counter()
        tuning.after_step(step, lr, settings)
        log.parts["method hook"] = log.parts.get("method hook", 0.0) + time.perf_counter() - t
        ranks = tuning.ranks()
        loss_value = loss.item()
        log.loss.append(loss_value)
        log.total_rank.append(sum(ranks.values()))
        if progress:
            progress(step, loss_value, ranks)
        if should_stop and should_stop():
            raise Cancelled()

    if opt:  # ARENA's SVD start: one more batch before step 1, counted as its own part
        started = time.perf_counter()
        tuning.initialise(lambda: step_loss(0))
        log.parts["start (method)"] = time.perf_counter() - started
    warmup = torch.optim.lr_scheduler.LinearLR(opt, 0.05, total_iters=tuning.warmup) \
        if opt and tuning.warmup else None
    run_steps(step_loss, opt, settings.steps if opt else 0, scheduler=warmup,
              after_step=after_step, seconds=log.parts)
    if "after step" in log.parts:  # the method's hook, then logging and progress
        log.parts["progress"] = log.parts.pop("after step") - log.parts.get("method hook", 0.0)
    model.eval()
    log.ranks = tuning.ranks()
    log.seconds = time.perf_counter() - start
    return log
