"""From the network's probability on the input grid to the structure: which objects to keep.

The loss sees only the painted slices, so look-alike tissue far from them (fluid for a bladder,
muscle for a psoas) is never shown as background. Two rules follow, one per job:

- **adapt** (the paint is given): the structure is what is connected to the paint. Everything
  else is removed, and its volume is reported: those are the adapter's false positives.
- **segment** (a new scan, no paint): every object the model is confident about is kept, however
  many there are (both kidneys painted as one structure stay two objects), whole or cut by the
  field of view. An object is confident when it holds a core of at least :data:`CORE_ML` mL at
  probability ≥ :data:`CORE_PROBABILITY`, and, when the adapter holds the frozen backbone's
  reading of the paint, when the backbone reads it as it read the paint: at least
  :data:`MATCH_SHARE` of its voxels are read as the structure (when none is, the best-read one
  when :data:`BEST_SHARE` of it is; :mod:`arenaseg.reading`: its
  pretrained classes, or its deepest features). A few-shot adapter is confident far outside
  what it was shown (a liver adapter finds "liver" in the bladder at probability 0.96), but the
  frozen backbone still tells bladder from liver. When no object is kept, the result is empty:
  the structure is absent.

Everything stays in SimpleITK images at one byte per voxel where it can: a thin-slice CT has 10⁸
voxels. The float probability is thresholded (:func:`threshold`) and dropped before the objects
are labelled (a uint32 map, the largest image here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .io.annotations import Annotation

CORE_PROBABILITY = 0.9
CORE_ML = 1.0
#: A backbone class belongs to the painted structure's profile above this share of its voxels.
PROFILE_SHARE = 0.05
#: An object is read as the structure when this share of its voxels are (:mod:`arenaseg.reading`).
MATCH_SHARE = 0.5
#: When no confident object reaches :data:`MATCH_SHARE`, the best-read one is kept if this share
#: of it is read as the structure: a portal vein cut by the field of view read at 0.49, a bladder
#: under a liver adapter at 0.23 (``bench/OBJECT_CHECK.md``).
BEST_SHARE = 0.4


@dataclass
class Objects:
    """The kept objects as a labelmap, and what was removed.

    Attributes:
        image: labelmap on the probability's grid: ``label`` in the kept objects, 0 elsewhere
            (the smallest unsigned type that holds ``label``).
        kept: number of kept connected objects (face connectivity).
        kept_ml: their volume in mL.
        removed: number of objects predicted (probability > 0.5) but not kept.
        removed_ml: their volume in mL.
        next_slice: with painted slices, the unpainted one to paint next, where the prediction
            is least sure (:meth:`~arenaseg.io.annotations.Annotation.next_slice`); else None.
    """

    image: sitk.Image
    kept: int
    kept_ml: float
    removed: int
    removed_ml: float
    next_slice: int | None = None


def _zyx(array_ijk: np.ndarray) -> np.ndarray:
    return np.transpose(array_ijk, (2, 1, 0))


def profile(classes: sitk.Image, names: tuple[str, ...], where: np.ndarray) -> dict[str, float]:
    """How the backbone reads a structure: the share of ``where``'s voxels in each class.

    Args:
        classes: the backbone's class index per voxel, on the input grid (uint8).
        names: class name of each index.
        where: boolean ``(I, J, K)``, e.g. the painted structure voxels.

    Returns:
        ``{class name: share}`` of the classes holding at least :data:`PROFILE_SHARE` of the
        voxels, largest first (e.g. ``{"liver": 0.98}``; ``{"background": 0.97}`` for a structure
        the backbone was not trained on).
    """
    values = sitk.GetArrayViewFromImage(classes)[_zyx(where)]
    shares = np.bincount(values, minlength=len(names)) / max(values.size, 1)
    return {names[i]: round(float(shares[i]), 3) for i in np.argsort(-shares, kind="stable")
            if shares[i] >= PROFILE_SHARE}


def threshold(probability: sitk.Image, paint: Annotation | None = None,
              outside: np.ndarray | None = None) -> tuple[sitk.Image, sitk.Image | None]:
    """Threshold the probability on the input grid: ``(mask, core)``.

    Args:
        probability: float image of the structure's probability, on the input grid.
        paint: the painted slices (adapt), or None: where the user gave the answer (the painted
            slices, and background voxels), it replaces the prediction.
        outside: boolean ``(I, J, K)``: voxels with no image (NaN/inf in the CT), never predicted.

    Returns:
        uint8 images: ``mask`` (probability > 0.5, with the paint and ``outside`` applied) and,
        without ``paint``, ``core`` (probability ≥ :data:`CORE_PROBABILITY`), else None.
    """
    core = probability >= CORE_PROBABILITY if paint is None else None
    if paint is None and outside is None:
        return probability > 0.5, core
    values = sitk.GetArrayFromImage(probability > 0.5)
    if outside is not None:
        values[_zyx(outside)] = 0
    if paint is not None:  # slice by slice: no full-size "known" array
        if paint.background is not None:
            values[_zyx(paint.background)] = 0
        index = [slice(None)] * 3
        index[2 - paint.axis] = list(paint.slices)
        values[tuple(index)] = _zyx(paint.target)[tuple(index)]
    return _image(values, probability), core


def select_objects(mask: sitk.Image, core: sitk.Image | None, label: int = 1,
                   target: np.ndarray | None = None, reads_as: sitk.Image | None = None) -> Objects:
    """Keep the objects of ``mask`` that make up the structure.

    Args:
        mask, core: the thresholded probability on the input grid (:func:`threshold`).
        label: value written in the kept objects.
        target: boolean ``(I, J, K)``: painted structure voxels (adapt): only objects connected
            to the paint are kept. Without it (segment), confident objects are kept.
        reads_as: uint8 image on the input grid, 1 where the frozen backbone reads the voxel
            as the painted structure (:func:`arenaseg.reading.read_as_structure`), or None;
            without paint, an object is kept only when :data:`MATCH_SHARE` of it is (or, when
            none is, the best-read one when :data:`BEST_SHARE` of it is).

    Returns:
        :class:`Objects`.
    """
    voxel_ml = float(np.prod(mask.GetSpacing())) / 1000.0
    # SimpleITK filters throughout: a NumPy view of the uint32 object map costs a copy of it, and
    # indexing with it an int64 copy (8 bytes per voxel).
    objects = sitk.ConnectedComponent(mask)  # face connectivity, as ITK's default
    stats = sitk.LabelStatisticsImageFilter()
    if target is not None:  # every painted voxel lies in an object: the paint was copied in
        stats.Execute(_image(_zyx(target), mask), objects)
        keep = [n for n in stats.GetLabels() if n and stats.GetSum(n) > 0]
    else:
        stats.Execute(core, objects)
        keep = [n for n in stats.GetLabels() if n and stats.GetSum(n) * voxel_ml >= CORE_ML]
        if reads_as is not None:
            stats.Execute(reads_as, objects)
            share = {n: stats.GetMean(n) for n in keep}
            best = max(keep, key=share.get, default=None)
            keep = [n for n in keep if share[n] >= MATCH_SHARE]
            if not keep and best is not None and share[best] >= BEST_SHARE:
                keep = [best]  # a thin structure cut by the field of view reads weaker
    sizes = {n: stats.GetCount(n) for n in stats.GetLabels() if n}
    del stats
    if label <= 255:  # written straight as the label: no cast, no product image
        result = _any_of(objects, keep, label)
    else:
        pixel = sitk.sitkUInt16 if label <= 65535 else sitk.sitkUInt32
        result = sitk.Cast(_any_of(objects, keep), pixel) * label
    del objects
    kept_voxels = sum(sizes[n] for n in keep)
    return Objects(result, len(keep), kept_voxels * voxel_ml, len(sizes) - len(keep),
                   (sum(sizes.values()) - kept_voxels) * voxel_ml)


def _any_of(image: sitk.Image, values, inside: int = 1) -> sitk.Image:
    """uint8 image: ``inside`` where ``image`` holds one of ``values``, 0 elsewhere."""
    out = sitk.Image(image.GetSize(), sitk.sitkUInt8) if len(values) == 0 else None
    if out is not None:
        out.CopyInformation(image)
    for value in values:
        hit = sitk.BinaryThreshold(image, float(value), float(value), inside, 0)
        out = hit if out is None else out | hit
    return out


def _image(values_zyx: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(values_zyx.view(np.uint8) if values_zyx.dtype == bool else values_zyx)
    image.CopyInformation(reference)
    return image
