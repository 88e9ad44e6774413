"""Reading a 3D image (any file SimpleITK reads, or a DICOM series folder) and writing one.

Every output is written through :mod:`.outputs`: verified by reading it back, then renamed into
place, so a failure never leaves half a file nor looks like success.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from ..errors import ArenaError
from .checks import (check_grid, check_nifti_complete, check_nifti_transforms, explain_read_error,
                     restore_nifti_non_finite)
from .dicom import is_dicom_file, read_dicom_file, read_series
from .outputs import Outputs, WriteMismatch, atomic_write  # noqa: F401 (atomic_write: public here too)


def read_image(path: str | os.PathLike, what: str = "image", series: str | None = None,
               match: Callable[[], np.ndarray] | None = None, warn=None, min_slices: int = 2) -> sitk.Image:
    """Read a 3D image: any file SimpleITK reads (NIfTI, NRRD, MHA, ...) or a DICOM series folder.

    Args:
        series: SeriesInstanceUID to read from a DICOM folder (``--series``).
        match: ``match()`` gives the painted voxels' world (LPS) positions, (N, 3) in mm, e.g.
            ``functools.partial(labels.painted_points, path)``; in a DICOM folder with several
            series, the one they lie on is chosen (:func:`.dicom.choose_series`); called only
            then.
        warn: ``warn(message)`` for one-line warnings (default: the ``arenaseg`` logger).
        min_slices: fewest voxels along every axis: 2 for a CT; 1 for a labelmap, whose single
            painted slice (dcmqi exports one so) lies on the CT in world space.

    Raises:
        ArenaError: the path is missing or unreadable, a folder holds no or several series
            (listed), the slices or the header do not form a regular grid
            (:mod:`.checks`, :mod:`.dicom`), the image is not 3D (a single slice counts as 2D) or has
            more than one component per voxel.
    """
    path = Path(path)
    if not path.exists():
        raise ArenaError(f"{what} '{path}' does not exist: check the path")
    if series is not None and not path.is_dir():
        raise ArenaError(f"--series {series} chooses a series in a DICOM folder, but {what} "
                         f"'{path}' is a file: drop --series")
    try:
        if path.is_dir():
            image = read_series(path, what, series, match, warn)
        elif is_dicom_file(path):  # a multi-frame file's frames are checked like a series
            image = read_dicom_file(path, what, warn)
        else:
            image = restore_nifti_non_finite(sitk.ReadImage(str(path)), path)
            check_nifti_complete(path, what)
            check_nifti_transforms(image, path, what, warn)
    except RuntimeError as err:
        raise explain_read_error(err, path, what) from None
    if image.GetDimension() != 3 or min(image.GetSize()) < min_slices:
        kind = "2D" if image.GetDimension() < 3 or min(image.GetSize()) < 2 else f"{image.GetDimension()}D"
        raise ArenaError(f"{what} '{path}' is {kind} (size {image.GetSize()}): ARENA needs a 3D "
                         f"volume with at least {min_slices} slice{'s' if min_slices > 1 else ''} along every axis")
    if image.GetNumberOfComponentsPerPixel() != 1:
        fix = ("give a labelmap with one label value per voxel (a Slicer .seg.nrrd is read with "
               "its segments)" if what != "image" else "give the CT as a scalar (grey-level) "
               "image in HU, not a colour or vector image")
        raise ArenaError(f"{what} '{path}' has {image.GetNumberOfComponentsPerPixel()} "
                         f"components per voxel: {fix}")
    check_grid(image, path, what)
    return image


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True, *,
                what: str = "output image", option: str | None = None,
                outputs: Outputs | None = None) -> Path:
    """Write ``image`` to ``path`` (format from the extension) through
    :func:`~arenaseg.io.outputs.atomic_write`: published only after it reads back with the same
    voxels and geometry, because SimpleITK's NIfTI writer returns normally after a short write
    (full disk), leaving a truncated file that still opens. With ``outputs``, it is published
    with that job's other files.

    Raises:
        ArenaError: the write failed or the file read back differs (file, cause, fix);
            nothing was published.
    """
    def verify(tmp: str) -> None:
        back = sitk.ReadImage(tmp)
        if back.GetSize() != image.GetSize() or not np.array_equal(
                sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image)):
            raise WriteMismatch("the voxels read back differ from the image")
        # NIfTI stores the geometry in float32: allow its rounding, nothing more.
        if not (np.allclose(back.GetSpacing(), image.GetSpacing(), rtol=1e-6, atol=1e-4)
                and np.allclose(back.GetOrigin(), image.GetOrigin(), rtol=1e-6, atol=1e-3)
                and np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-4)):
            raise WriteMismatch("the geometry read back differs from the image")

    return atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, compress), verify,
                        what, option, outputs)
