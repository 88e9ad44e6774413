"""Inference: sliding-window logits (MONAI) on a canonical CT tensor, the adapted backbone's
probability back on the input grid, and the objects that make up the structure
(:func:`predict`, with :mod:`arenaseg.postprocessing`); the frozen backbone's own reading
(:func:`recognise`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import SimpleITK as sitk
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from torch import nn

from .io.annotations import doubt
from .precision import autocast, reuse_freed_memory
from .postprocessing import Objects, select_objects, threshold

if TYPE_CHECKING:
    from .io.annotations import Annotation
    from .methods import Method
    from .preprocessing import Scan

StatusFn = Callable[..., None]
"""``status(phase, message, done=None, total=None)``: called as each phase starts, ``phase``
one of :data:`arenaseg.pipeline.PHASES`, and within a long phase with its progress (e.g.
inference windows done of ``total``)."""


#: How far (mm, along each axis) from the kept result the doubt that chooses the next slice counts.
NEAR_MM = 10.0


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
    reuse_freed_memory()
    was_training = model.training
    model.eval()
    if hasattr(model, "volume_logits"):  # one pass from the cache of its frozen part
        out = model.volume_logits(x, device)
        model.train(was_training)
        if progress:
            progress(1, 1)
        return out
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


def recognise(model: torch.nn.Module, spec, scan: Scan, device: torch.device):
    """The frozen backbone's own reading of every voxel, before any adaptation.

    Args:
        model: the backbone with its pretrained head (call before adapters are injected).

    Returns:
        ``(classes, names)``: a uint8 image on the input grid holding the index of the class
        each voxel is read as (argmax; for a sigmoid head the most likely class above 0.5, else
        background), and the name of each index; or ``(None, ())`` for a backbone without
        pretrained classes.
    """
    if not spec.classes:
        return None, ()
    logits = sliding_window_logits(model, scan.x, spec.preprocessing.roi_size, device)
    if spec.multilabel:
        top = logits.max(0)
        index, names = torch.where(top.values > 0, top.indices + 1, 0), ("background", *spec.classes)
    else:
        index, names = logits.argmax(0), spec.classes
    return scan.to_input_grid(index.numpy().astype(np.uint8), linear=False), names


def input_probability(tuning: Method, spec, scan: Scan, device: torch.device,
                      status: StatusFn | None = None) -> sitk.Image:
    """The adapted backbone's probability of the structure on the input grid: sliding-window
    logits (MONAI) on the canonical grid, their sigmoid resampled trilinearly (SimpleITK) onto
    exactly the input grid (float32 image). ``status("inference", ...)`` after each window."""
    tuning.model.to(device)
    tuning.merge()
    windows = (lambda done, total: status("inference", "windows", done, total)) if status else None
    try:
        logits = sliding_window_logits(tuning.model, scan.x, spec.preprocessing.roi_size, device,
                                       progress=windows)
    finally:
        tuning.unmerge()
    return scan.to_input_grid(torch.sigmoid(logits[0]).numpy())


def predict(tuning: Method, spec, scan: Scan, device: torch.device, label: int = 1,
            annotation: Annotation | None = None, status: StatusFn | None = None,
            reads_as: sitk.Image | None = None) -> Objects:
    """Segment ``scan`` with the adapted backbone.

    Sliding-window logits (MONAI) on the canonical grid, their sigmoid resampled (trilinear,
    SimpleITK) onto the input grid, thresholded at 0.5; then the objects that make up the
    structure are kept (:func:`~arenaseg.postprocessing.select_objects`): with ``annotation``,
    the painted slices are copied from it and only objects connected to the paint are kept;
    without, every confident object. Voxels outside the scan (``scan.outside``) stay empty.

    Args:
        tuning: the adapted backbone (merged for inference, unmerged after).
        spec: its :class:`~arenaseg.backbones.BackboneSpec` (ROI size).
        scan: the CT on both grids.
        device: where the windows run.
        label: value of the structure in the returned labelmap.
        annotation: the painted slices on the input grid (adapt), or None (segment).
        status: ``status("inference", message)`` after each window.
        reads_as: where the frozen backbone reads the scan as the painted structure
            (:func:`arenaseg.reading.read_as_structure`): without ``annotation``, only objects
            it reads as the structure are kept.

    Returns:
        :class:`~arenaseg.postprocessing.Objects`: ``image`` is a labelmap on exactly the input
        grid, ``label`` inside the structure; with the count and volume (mL) kept and removed,
        and (with ``annotation``) the slice to paint next.

    Raises:
        RuntimeError: out of memory on ``device`` (PyTorch's error; the adapters are unmerged
            again first).

    Examples:
        >>> result = fit(ct, annotation, AdaptSettings(steps=20), structure="liver")  # doctest: +SKIP
        >>> objects = predict(result.tuning, result.spec, result.scan, torch.device("cpu"),
        ...                   label=5, annotation=annotation)                      # doctest: +SKIP
        >>> objects.image.GetSize() == ct.GetSize(), objects.kept                   # doctest: +SKIP
        (True, 1)
    """
    probability = input_probability(tuning, spec, scan, device, status)
    if annotation is None:
        mask, core = threshold(probability, outside=scan.outside)
        del probability
        return select_objects(mask, core, label, reads_as=reads_as)
    mask, core = threshold(probability, annotation, scan.outside)
    uncertain = np.transpose(doubt(sitk.GetArrayViewFromImage(probability)), (2, 1, 0))
    del probability
    objects = select_objects(mask, core, label, annotation.target)
    del mask, core
    # Doubt counts within NEAR_MM (per axis: a box) of the kept result; farther is dropped anyway.
    radius = [max(1, round(NEAR_MM / s)) for s in objects.image.GetSpacing()]
    near = sitk.BinaryDilate(objects.image != 0, radius, sitk.sitkBox)
    objects.next_slice = annotation.next_slice(
        uncertain, np.transpose(sitk.GetArrayViewFromImage(near), (2, 1, 0)).view(bool))
    return objects
