"""Few-slice annotations: which slices are painted, what they say, and Dice off those slices.

Convention: the annotated slices are the slices, along one voxel axis of the image, that contain
the target label value. On those slices, every voxel that is not the target is background;
voxels on other slices are unknown and never enter the loss, except those painted with an
optional background label (voxels known not to be the structure, anywhere).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import compute_dice

from ..errors import ArenaError

AXIS_NAMES = {"i": 0, "j": 1, "k": 2}


@dataclass(frozen=True)
class Annotation:
    """Painted slices of one structure on the image grid.

    Attributes:
        axis: voxel axis (0 = i, 1 = j, 2 = k) across which the slices were painted.
        slices: indices of the painted slices along ``axis``.
        target: boolean ``(I, J, K)`` array, True where the structure was painted.
        background: boolean ``(I, J, K)`` array of voxels painted as "not the structure" on any
            slice, or None.
    """

    axis: int
    slices: tuple[int, ...]
    target: np.ndarray
    background: np.ndarray | None = None

    @property
    def known(self) -> np.ndarray:
        """Boolean ``(I, J, K)``: True where the answer is known: on the painted slices (target
        or background) and on the painted background voxels."""
        mask = np.zeros(self.target.shape, bool) if self.background is None else self.background.copy()
        index = [slice(None)] * 3
        index[self.axis] = list(self.slices)
        mask[tuple(index)] = True
        return mask

    def next_slice(self, doubt: np.ndarray, near: np.ndarray | None = None) -> int | None:
        """The unpainted slice to paint next: where the prediction is least sure, the largest
        sum over the slice of ``p·(1 − p)`` (the expected number of wrong voxels when each
        voxel is right with its own probability; interactive-segmentation benchmarks put the
        next click where the result is worst).

        Args:
            doubt: ``(I, J, K)`` ``p·(1 − p)`` per voxel on the image grid, at any scale (e.g.
                :func:`doubt` in 8 bits).
            near: boolean ``(I, J, K)``, where doubt counts (e.g. around the kept result):
                doubt far from it is removed with the objects not connected to the paint, and
                would send the user to a slice without the structure.

        Returns:
            The slice index along :attr:`axis`, or None when no unpainted slice holds doubt
            (where it counts).
        """
        sums = np.zeros(doubt.shape[self.axis])
        for i in set(range(len(sums))) - {int(s) for s in self.slices}:  # no full-size temporaries
            d = np.take(doubt, i, axis=self.axis)
            if near is not None:
                d = d[np.take(near, i, axis=self.axis)]
            sums[i] = d.sum(dtype=float)
        return int(np.argmax(sums)) if sums.max() > 0 else None

    def points(self) -> tuple[np.ndarray, np.ndarray]:
        """``(N, 3)`` voxel indices of every voxel on the painted slices and their ``(N,)``
        float targets (1 = structure, 0 = background)."""
        known = self.known
        return np.argwhere(known), self.target[known].astype(np.float32)


def _signed_distance_mm(mask: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Signed distance (mm, negative inside) to the outline of a 2D boolean mask, halfway between
    the inside and outside pixels along it (SimpleITK ``SignedMaurerDistanceMap`` of the mask and
    of its complement, averaged); an empty mask is far outside everywhere, a full one far inside."""
    if not mask.any() or mask.all():
        return np.full(mask.shape, 1e4 if not mask.any() else -1e4, np.float32)

    def signed(m: np.ndarray) -> np.ndarray:
        image = sitk.GetImageFromArray(m.T.astype(np.uint8))  # SimpleITK arrays are (y, x)
        image.SetSpacing(tuple(float(s) for s in spacing))
        return sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
            image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)).T

    return (signed(mask) - signed(~mask)) / 2


def interpolate(annotation: Annotation, spacing_mm, half_life_mm: float, band_mm: float = 10.0,
                max_points: int = 200_000, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pseudo-labels on the unpainted slices between painted ones, by shape-based interpolation
    (Herman, Zheng & Bucholtz, IEEE CG&A 1992): on a slice at fraction w of the way from one
    painted slice to the next, the structure is where ``(1 − w)·d₀ + w·d₁ < 0``, with ``d`` the
    signed distance (mm) to the painted outline on each of the two. Interpolation is usually right
    near a painted slice and least sure halfway, so each pseudo-label is weighted
    ``0.5 ** (distance to the nearest painted slice / half_life_mm)``.

    Only voxels inside the interpolated structure or within ``band_mm`` of its outline are kept
    (farther background is known from the painted slices), sampled evenly across slices up to
    ``max_points`` in all. Voxels painted as background are left out. Nothing is extrapolated
    beyond the first and last painted slices.

    Args:
        annotation: the painted slices.
        spacing_mm: voxel spacing ``(3,)`` of the image grid (mm).
        half_life_mm: distance from the nearest painted slice (mm) at which the weight halves.

    Returns:
        ``(M, 3)`` voxel indices, ``(M,)`` float targets (1 = structure) and ``(M,)`` weights in
        (0, 1]; empty arrays when no unpainted slice lies between two painted ones.
    """
    axis, slices = annotation.axis, sorted(annotation.slices)
    plane = [float(s) for a, s in enumerate(spacing_mm) if a != axis]
    between = [(a, b, t) for a, b in zip(slices, slices[1:]) for t in range(a + 1, b)]
    rng = np.random.default_rng(seed)
    quota = max_points // max(len(between), 1)
    points, targets, weights = [], [], []
    distances = {}
    for a, b, t in between:
        for s in (a, b):
            if s not in distances:
                distances[s] = _signed_distance_mm(np.take(annotation.target, s, axis=axis), plane)
        w = (t - a) / (b - a)
        d = (1 - w) * distances[a] + w * distances[b]
        keep = d < band_mm
        if annotation.background is not None:
            keep &= ~np.take(annotation.background, t, axis=axis)
        uv = np.argwhere(keep)
        if len(uv) > quota:
            uv = uv[rng.choice(len(uv), quota, replace=False)]
        ijk = np.insert(uv, axis, t, axis=1)
        points.append(ijk)
        targets.append((d[uv[:, 0], uv[:, 1]] < 0).astype(np.float32))
        from_painted = min(t - a, b - t) * spacing_mm[axis]  # mm to the nearest painted slice
        weights.append(np.full(len(uv), 0.5 ** (from_painted / half_life_mm), np.float32))
    if not points:
        return np.zeros((0, 3), int), np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(points), np.concatenate(targets), np.concatenate(weights)


def find_annotation(labels: np.ndarray, value: int, axis: int | None = None,
                    source: str = "annotations", background: int | None = None) -> Annotation:
    """Locate the slices painted with ``value`` in an ``(I, J, K)`` labelmap on the image grid.

    Args:
        labels: labelmap already resampled onto the image grid.
        value: label value of the target structure.
        axis: voxel axis of the painted slices; None detects it as the axis along which the
            structure touches the fewest slices.
        source: file name used in error messages.
        background: optional label value of voxels known not to be the structure.

    Raises:
        ArenaError: nothing painted at all, ``value`` absent (the message lists the values
            present), ``background`` 0 (0 is "not painted"), paint in two views or across the
            grid's slices, fewer than :data:`MIN_PAINTED_VOXELS` structure voxels (a stray
            click), or a slice painted in every voxel.
    """
    if background == 0:
        raise ArenaError(f"background label 0 cannot mean painted background: 0 is every voxel nobody "
                         f"painted in '{source}', so all of them would count as known background; paint "
                         "the background with a value of its own (e.g. 2) and give --background-label 2, "
                         "or leave --background-label out")
    present = np.unique(labels)
    present = present[present != 0]
    if present.size == 0:
        raise ArenaError(f"no annotated slice: '{source}' has no painted voxel on the image "
                         "grid; paint the structure on a few slices first")
    target = labels == value
    if not target.any():
        raise ArenaError(f"label value {value} is absent from '{source}' (values present: "
                         f"{', '.join(map(str, present[:20].tolist()))}): pass one of them "
                         "with --label")
    counts = [int(np.any(target, axis=tuple(a for a in range(3) if a != ax)).sum())
              for ax in range(3)]
    detected = int(np.argmin(counts))
    if axis is None:
        axis = detected
    if axis not in (0, 1, 2):
        raise ArenaError(f"slice axis {axis} is not 0, 1 or 2 (i, j, k): give --slice-axis "
                         "auto, 0, 1 or 2")
    if counts[axis] > 2 * counts[detected]:  # every slice it touches would count as painted
        raise ArenaError(f"--slice-axis {axis}: '{source}' is painted on {counts[detected]} slices "
                         f"across voxel axis {'ijk'[detected]} ({detected}), and touches "
                         f"{counts[axis]} across axis {'ijk'[axis]}, all of which would count as "
                         f"painted slices, the rest of them as background: give --slice-axis "
                         f"{detected}, or auto")
    slices = np.flatnonzero(np.any(target, axis=tuple(a for a in range(3) if a != axis)))
    _refuse_other_view(target, axis, slices, source)
    _refuse_implausible_paint(target, value, axis, slices, source)
    if background is not None and background == value:
        raise ArenaError(f"background label {background} equals the structure's label: give "
                         "another value")
    if background is not None and not np.any(labels == background):
        raise ArenaError(f"background label {background} is absent from '{source}' (values "
                         f"present: {', '.join(map(str, present[:20].tolist()))}): pass one of "
                         "them or leave --background-label out")
    return Annotation(axis=axis, slices=tuple(int(s) for s in slices), target=target,
                      background=None if background is None else labels == background)


#: Fewest painted structure voxels that can teach a structure: below, a stray click.
MIN_PAINTED_VOXELS = 10


def _refuse_implausible_paint(target: np.ndarray, value: int, axis: int, slices: np.ndarray,
                              source: str) -> None:
    """Refuse paint that cannot be a structure drawn on slices: a stray click of a few voxels
    (trained, it gave a few-voxel result with exit 0), or a slice painted in every voxel (no
    background left on it: everything learns to be the structure)."""
    count = int(target.sum())
    if count < MIN_PAINTED_VOXELS:
        at = "; ".join(str(tuple(int(i) for i in v)) for v in np.argwhere(target)[:3])
        raise ArenaError(f"label {value} covers only {count} voxel{'s' * (count != 1)} in "
                         f"'{source}' (voxel (i, j, k) {at}): a stray click? paint the "
                         f"structure's whole cross-section on a few slices (at least "
                         f"{MIN_PAINTED_VOXELS} voxels)")
    per_slice = target.shape[(axis + 1) % 3] * target.shape[(axis + 2) % 3]
    full = [int(s) for s in slices if target.take(s, axis=axis).sum() == per_slice]
    if full:
        raise ArenaError(f"'{source}' has label {value} on every voxel of slice "
                         f"{', '.join(map(str, full[:5]))} across voxel axis {'ijk'[axis]}: "
                         "nothing on it is left as background; paint only the structure there "
                         "(erase the fill, or fill inside its outline)")


def _refuse_other_view(target: np.ndarray, axis: int, slices: np.ndarray, source: str) -> None:
    """Refuse paint on slices of two views (e.g. axial and sagittal). A slice painted in the other
    view crosses this axis's slices as a line one voxel thick, at the same index, on a run of
    consecutive slices; read along this axis, each of them would count as painted, everything
    else on it as background."""
    for other in (a for a in range(3) if a != axis):
        third = 3 - axis - other
        lines = {}
        for s in slices:
            index = [slice(None)] * 3
            index[axis] = s
            voxels = np.argwhere(target[tuple(index)])  # columns: the two other axes, in order
            at, span = (voxels[:, 0], voxels[:, 1]) if other < third else (voxels[:, 1], voxels[:, 0])
            if np.ptp(at) == 0 and np.ptp(span) >= 2:
                lines[int(s)] = int(at[0])
        for index in set(lines.values()):
            run = sorted(s for s, at in lines.items() if at == index)
            longest = max(len(list(group)) for _, group in
                          itertools.groupby(enumerate(run), lambda p: p[1] - p[0]))
            if longest >= 3:
                raise ArenaError(
                    f"'{source}' has paint in two views: {len(slices)} slices across voxel axis "
                    f"{'ijk'[axis]}, and slice {index} across axis {'ijk'[other]}, which crosses "
                    f"{len(run)} of them as a line: paint all slices in one view (axial, sagittal "
                    "or coronal) and erase the strokes made in the other")


def paint_slices(labels: np.ndarray, value: int, k: int = 3, axis: int = 2) -> np.ndarray:
    """Simulate a user who paints ``k`` slices of a structure from a full reference labelmap.

    The slices are spread evenly inside the structure's extent along ``axis`` (at fractions
    1/(k+1), …, k/(k+1)), each moved to the nearest slice that contains the structure.

    Returns:
        uint8 ``(I, J, K)`` labelmap: ``value`` on the painted voxels, 0 elsewhere.

    Raises:
        ArenaError: ``value`` absent from ``labels``.
    """
    target = labels == value
    occupied = np.flatnonzero(np.any(target, axis=tuple(a for a in range(3) if a != axis)))
    if occupied.size == 0:
        raise ArenaError(f"label value {value} is absent from the reference labels: choose a "
                         f"value present in them ({', '.join(map(str, np.unique(labels)[1:21].tolist()))})")
    lo, hi = occupied[0], occupied[-1]
    wanted = [lo + (hi - lo) * (i + 1) / (k + 1) for i in range(k)]
    chosen = sorted({int(occupied[np.argmin(np.abs(occupied - w))]) for w in wanted})
    painted = np.zeros(labels.shape, np.uint8)
    index = [slice(None)] * 3
    index[axis] = chosen
    painted[tuple(index)] = target[tuple(index)] * value
    return painted


def doubt(probability: np.ndarray) -> np.ndarray:
    """``p·(1 − p)`` per voxel of a probability array, in 8 bits (255 at p = 0.5), computed one
    slice of the first axis at a time: a quarter of the probability's memory, no float
    temporaries of its size (for :meth:`Annotation.next_slice`)."""
    out = np.empty(probability.shape, np.uint8)
    for i, p in enumerate(probability):
        out[i] = np.rint(1020.0 * p * (1.0 - p))
    return out


def dice(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Dice of two boolean volumes (MONAI ``compute_dice``), optionally only where ``mask``."""
    if mask is not None:
        pred, ref = pred[mask], ref[mask]
    p = torch.from_numpy(np.asarray(pred, bool)).float().reshape(1, 1, -1)
    r = torch.from_numpy(np.asarray(ref, bool)).float().reshape(1, 1, -1)
    return float(compute_dice(p, r, include_background=True, ignore_empty=False)[0, 0])
