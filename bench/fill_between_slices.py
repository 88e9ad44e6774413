"""Slicer's *Fill between slices*, the baseline every Dice stands next to.

The Segment Editor effect runs ITK's morphological contour interpolation
(``vtkITKMorphologicalContourInterpolator``, a wrapper of
``itk::MorphologicalContourInterpolator`` with its default settings) on the painted labelmap; the
same filter comes from PyPI as ``itk-morphologicalcontourinterpolation`` (Albu, Beugeling and
Laurendeau 2008; Zukić et al., Insight Journal 2016).

The filter runs in its own Python process: ITK's wheels and SimpleITK (which carries its own
ITK) in one process corrupt the heap (glibc aborts with "unaligned fastbin chunk detected",
reproduced with the two libraries alone), and every benchmark reads images with SimpleITK.
"""

from __future__ import annotations

import atexit
import pickle
import subprocess
import sys

import numpy as np

_SERVER = r"""
import pickle, sys
import numpy as np
import itk  # itk-morphologicalcontourinterpolation (bench extra); no SimpleITK in this process
src, dst = sys.stdin.buffer, sys.stdout.buffer
while True:
    try:
        painted, spacing = pickle.load(src)
    except EOFError:
        break
    image = itk.image_from_array(np.ascontiguousarray(np.transpose(painted, (2, 1, 0))).astype(np.uint8))
    image.SetSpacing([float(s) for s in spacing])
    filled = np.transpose(itk.array_from_image(itk.morphological_contour_interpolator(image)), (2, 1, 0)) > 0
    pickle.dump(filled, dst)
    dst.flush()
"""
_process: subprocess.Popen | None = None


def _close() -> None:
    if _process is not None and _process.poll() is None:
        _process.stdin.close()
        _process.wait(timeout=30)


def fill_between_slices(painted: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """3D segment interpolated between painted slices, as Slicer's effect makes it.

    Args:
        painted: ``(I, J, K)`` array, non-zero on the painted voxels of one structure (its
            painted slices; every other slice empty).
        spacing: voxel spacing in mm along I, J, K.

    Returns:
        boolean ``(I, J, K)``: the painted slices and the contours interpolated between them
        (nothing beyond the first and last painted slice).
    """
    global _process
    if _process is None or _process.poll() is not None:
        _process = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE)
        atexit.register(_close)
    try:
        pickle.dump((np.asarray(painted) > 0, tuple(float(s) for s in spacing)), _process.stdin)
        _process.stdin.flush()
        return pickle.load(_process.stdout)
    except (BrokenPipeError, EOFError):
        raise RuntimeError(f"the Fill between slices process ended (exit code {_process.wait()}; "
                           "without ITK, install the bench extra: pip install -e '.[bench]')") from None
