"""Image I/O and world-space geometry (SimpleITK).

Every image keeps SimpleITK's LPS world geometry (size, spacing in mm, origin, direction). Labels
are brought onto an image's grid by nearest-neighbour resampling in world space, and every output
is written atomically (temporary file, then rename) so a failure never leaves half a file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import ArenaError

# LPS (SimpleITK, DICOM) <-> RAS (NIfTI, MONAI, Slicer) flips the first two world axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def read_image(path: str | os.PathLike, what: str = "image") -> sitk.Image:
    """Read a 3D image: any file SimpleITK reads (NIfTI, NRRD, MHA, ...) or a DICOM series folder.

    Raises:
        ArenaError: the path is missing, unreadable, not 3D (a single slice counts as 2D) or
            has more than one component per voxel.
    """
    path = Path(path)
    if not path.exists():
        raise ArenaError(f"{what} '{path}' does not exist: check the path")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
            sitk.ProcessObject.SetGlobalWarningDisplay(False)  # our message says it in one line
            try:
                files = reader.GetGDCMSeriesFileNames(str(path))
            finally:
                sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
            if not files:
                raise ArenaError(f"{what} folder '{path}' holds no DICOM series: "
                                 "point to a folder of DICOM slices or to an image file")
            reader.SetFileNames(files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown reason"
        raise ArenaError(f"{what} '{path}' cannot be read ({first}): give a NIfTI, NRRD, MHA "
                         "file or a DICOM series folder") from None
    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        kind = "2D" if image.GetDimension() < 3 or min(image.GetSize()) < 2 else f"{image.GetDimension()}D"
        raise ArenaError(f"{what} '{path}' is {kind} (size {image.GetSize()}): ARENA needs a 3D "
                         "volume with at least 2 slices along every axis")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ArenaError(f"{what} '{path}' has {image.GetNumberOfComponentsPerPixel()} "
                         "components per voxel: give a scalar (grey-level) image")
    return image


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(temporary_path)`` next to ``path``, then rename it to ``path`` with the usual
    permissions (umask); on any failure or interruption, remove the temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write ``image`` to ``path`` atomically; the format follows the file extension."""
    return atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, compress))


def index_to_world_matrix(image: sitk.Image) -> np.ndarray:
    """4×4 matrix mapping voxel index (i, j, k, 1) to LPS world coordinates in mm."""
    m = np.eye(4)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    m[:3, :3] = direction @ np.diag(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return m


def ras_affine(image: sitk.Image) -> np.ndarray:
    """4×4 affine from voxel index (i, j, k) to RAS world mm, as NIfTI and MONAI use it."""
    flip = np.eye(4)
    flip[:3, :3] = LPS_TO_RAS
    return flip @ index_to_world_matrix(image)


def image_from_ras_affine(array_ijk: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """Build a SimpleITK image from an array indexed (i, j, k) and its RAS affine."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=float)[:3, :4]
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_ijk, (2, 1, 0))))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    return image


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """True when both images share size, spacing, origin and direction (within ``tol``)."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def resample_to(image: sitk.Image, reference: sitk.Image, linear: bool = False,
                default: float = 0.0) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid in world space (nearest neighbour unless
    ``linear``). The result has exactly the reference's size, spacing, origin and direction."""
    if same_grid(image, reference):
        out = sitk.Image(image)
        out.CopyInformation(reference)
        return out
    interp = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    return sitk.Resample(image, reference, sitk.Transform(), interp, default,
                         image.GetPixelID())


def world_overlap(a: sitk.Image, b: sitk.Image) -> bool:
    """True when the world-space bounding boxes of ``a`` and ``b`` intersect."""
    def box(img):
        size = np.array(img.GetSize()) - 1
        corners = np.array([[x, y, z, 1] for x in (0, size[0]) for y in (0, size[1])
                            for z in (0, size[2])], dtype=float)
        world = corners @ index_to_world_matrix(img).T
        half = np.abs(index_to_world_matrix(img)[:3, :3]).sum(axis=1) / 2
        return world[:, :3].min(0) - half, world[:, :3].max(0) + half
    lo_a, hi_a = box(a)
    lo_b, hi_b = box(b)
    return bool(np.all(lo_a < hi_b) and np.all(lo_b < hi_a))


def array_ijk(image: sitk.Image) -> np.ndarray:
    """Voxel array indexed (i, j, k), i.e. SimpleITK's (z, y, x) array transposed."""
    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))


def image_like(array_ijk_: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Image from an (i, j, k) array with ``reference``'s geometry."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_ijk_, (2, 1, 0))))
    out.CopyInformation(reference)
    return out


def read_labels_on(image: sitk.Image, path: str | os.PathLike, what: str = "annotations") -> sitk.Image:
    """Read a labelmap and bring it onto ``image``'s grid (nearest neighbour in world space).

    The labelmap may have any grid or orientation; only world positions count.

    Raises:
        ArenaError: unreadable file; values that are not labels (negative or fractional, e.g. a
            CT in HU given as annotations); no overlap with the image in world space.
    """
    labels = read_image(path, what)
    values = sitk.GetArrayViewFromImage(labels)
    low = values.min()
    fractional = (values != np.round(values)) if np.issubdtype(values.dtype, np.floating) else None
    if low < 0 or (fractional is not None and fractional.any()):
        bad = low if low < 0 else values[fractional].flat[0]
        raise ArenaError(f"{what} '{path}' holds the value {bad:g}: a labelmap holds whole "
                         "numbers >= 0 (0 = not painted). Is this the CT itself? Give the "
                         "labelmap (segmentation) painted on it instead")
    if not world_overlap(image, labels):
        raise ArenaError(f"{what} '{path}' do not overlap the image in world space (origin "
                         f"{tuple(round(o, 1) for o in labels.GetOrigin())} mm vs image origin "
                         f"{tuple(round(o, 1) for o in image.GetOrigin())} mm): use the labels "
                         "drawn on this scan")
    labels = sitk.Cast(labels, sitk.sitkInt32) if labels.GetPixelID() in (
        sitk.sitkFloat32, sitk.sitkFloat64) else labels
    return resample_to(labels, image, linear=False, default=0)
