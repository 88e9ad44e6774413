"""Image I/O and world-space geometry (SimpleITK).

Every image keeps SimpleITK's LPS world geometry (size, spacing in mm, origin, direction). Labels
are brought onto an image's grid by nearest-neighbour resampling in world space, and every output
is written through :mod:`arenaseg.outputs`: verified by reading it back, then renamed into place,
so a failure never leaves half a file nor looks like success.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import ArenaError
from .outputs import Outputs, WriteMismatch, atomic_write  # noqa: F401 (atomic_write: public here too)

# LPS (SimpleITK, DICOM) <-> RAS (NIfTI, MONAI, Slicer) flips the first two world axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def read_image(path: str | os.PathLike, what: str = "image", series: str | None = None,
               match: str | os.PathLike | None = None, warn=None) -> sitk.Image:
    """Read a 3D image: any file SimpleITK reads (NIfTI, NRRD, MHA, ...) or a DICOM series folder.

    Args:
        series: SeriesInstanceUID to read from a DICOM folder (``--series``).
        match: annotations file; in a DICOM folder with several series, the one they lie on is
            chosen (:func:`arenaseg.checks.choose_series`).
        warn: ``warn(message)`` for one-line warnings (default: the ``arenaseg`` logger).

    Raises:
        ArenaError: the path is missing or unreadable, a folder holds no or several series
            (listed), the slices or the header do not form a regular grid
            (:mod:`arenaseg.checks`), the image is not 3D (a single slice counts as 2D) or has
            more than one component per voxel.
    """
    from .checks import (check_grid, check_nifti_complete, explain_read_error, read_series,
                         restore_nifti_non_finite)

    path = Path(path)
    if not path.exists():
        raise ArenaError(f"{what} '{path}' does not exist: check the path")
    if series is not None and not path.is_dir():
        raise ArenaError(f"--series {series} chooses a series in a DICOM folder, but {what} "
                         f"'{path}' is a file: drop --series")
    try:
        if path.is_dir():
            image = read_series(path, what, series, match, warn)
        else:
            image = restore_nifti_non_finite(sitk.ReadImage(str(path)), path)
            check_nifti_complete(path, what)
    except RuntimeError as err:
        raise explain_read_error(err, path, what) from None
    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        kind = "2D" if image.GetDimension() < 3 or min(image.GetSize()) < 2 else f"{image.GetDimension()}D"
        raise ArenaError(f"{what} '{path}' is {kind} (size {image.GetSize()}): ARENA needs a 3D "
                         "volume with at least 2 slices along every axis")
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
    :func:`~arenaseg.outputs.atomic_write`: published only after it reads back with the same
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


def _is_segmentation(path: Path) -> bool:
    """True for a 3D Slicer segmentation file (NRRD with ``Segment<N>_`` fields)."""
    if not path.is_file() or not path.name.lower().endswith((".nrrd", ".nhdr")):
        return False
    try:
        import slicerio

        return bool(slicerio.read_segmentation(str(path), skip_voxels=True).get("segments"))
    except Exception:  # not a segmentation header: read as a plain labelmap
        return False


def _segments(path: Path) -> list[dict]:
    import slicerio

    return slicerio.read_segmentation(str(path), skip_voxels=True)["segments"]


def read_label_layers(path: str | os.PathLike, what: str = "annotations") -> list[tuple[sitk.Image, list[dict]]]:
    """Read a labelmap as ``[(layer image, its segments)]``: a 3D Slicer ``.seg.nrrd`` (read with
    slicerio) gives one labelmap per layer with its segments (``name``, ``labelValue``), since
    overlapping segments are stored in separate layers; any other file gives one labelmap and no
    segment names."""
    path = Path(path)
    if not _is_segmentation(path):
        return [(read_image(path, what), [])]
    import slicerio

    from .checks import check_grid

    segmentation = slicerio.read_segmentation(str(path))
    voxels = segmentation["voxels"]
    layers = voxels if voxels.ndim == 4 else voxels[None]
    matrix = np.asarray(segmentation["ijkToLPS"], float)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    out = []
    for index, layer in enumerate(layers):
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(layer, (2, 1, 0))))
        image.SetSpacing(spacing.tolist())
        image.SetDirection((matrix[:3, :3] / spacing).flatten().tolist())
        image.SetOrigin(matrix[:3, 3].tolist())
        check_grid(image, path, what)
        out.append((image, [s for s in segmentation["segments"] if s.get("layer", 0) == index]))
    return out


def _segment_list(segments: list[dict]) -> str:
    return ", ".join(f"'{s['name']}' ({s.get('labelValue', 1)})" for s in segments)


def resolve_label(path: str | os.PathLike, label: int | str, what: str = "annotations") -> tuple[int, int]:
    """``(label value, layer)`` of ``--label``: a whole number (a label value) or, in a 3D Slicer
    ``.seg.nrrd``, a segment name. A value used in several layers picks the one non-empty
    segment with it.

    Raises:
        ArenaError: a name in a file without segment names, an unknown name (the segments are
            listed), or a value that stands for several non-empty segments.
    """
    path = Path(path)
    text = str(label).strip()
    number = int(text) if text.lstrip("+-").isdigit() else None
    if number is None and text.replace(".", "", 1).lstrip("+-").isdigit():
        raise ArenaError(f"--label {text} is not a whole number: give the label value the "
                         "structure is painted with (e.g. 1), or a segment name")
    if not path.exists():
        if number is not None:  # reading the file reports it, after the image
            return number, 0
        raise ArenaError(f"{what} '{path}' does not exist: check the path")
    if not _is_segmentation(path):
        if number is None:
            raise ArenaError(f"--label '{label}' is a name, but {what} '{path}' is a plain "
                             "labelmap without segment names: give its label value (a whole "
                             "number), or a 3D Slicer .seg.nrrd that names its segments")
        return number, 0
    segments = _segments(path)
    if number is None:
        named = [s for s in segments if s["name"] == text]
        named = named or [s for s in segments if s["name"].lower() == text.lower()]
        if len(named) != 1:
            why = "is not a segment of" if not named else "names several segments in"
            raise ArenaError(f"--label '{label}' {why} {what} '{path}' (segments: "
                             f"{_segment_list(segments)}): give one of these names or values")
        return int(named[0].get("labelValue", 1)), int(named[0].get("layer", 0))
    same = [s for s in segments if int(s.get("labelValue", 1)) == number]
    if len(same) > 1:  # the same value in several layers: an empty segment cannot be the paint
        import slicerio

        segmentation = slicerio.read_segmentation(str(path))
        filled = [s for s in same if slicerio.segment_mask(segmentation, s).any()]
        if len(filled) > 1:
            raise ArenaError(f"--label {number} stands for several segments of {what} '{path}' "
                             f"(in different layers: {_segment_list(same)}): give the segment's "
                             "name instead")
        same = filled or same[:1]
    return number, int(same[0].get("layer", 0)) if same else 0


def read_labels_on(image: sitk.Image, path: str | os.PathLike, what: str = "annotations",
                   label: int | str | None = None) -> sitk.Image:
    """Read a labelmap and bring it onto ``image``'s grid (nearest neighbour in world space).

    The labelmap may have any grid or orientation; only world positions count. A 3D Slicer
    ``.seg.nrrd`` with several layers gives the layer holding ``label`` (a value or a segment
    name, :func:`resolve_label`; the first layer when None).

    Raises:
        ArenaError: unreadable file; values that are not labels (negative or fractional, e.g. a
            CT in HU given as annotations); no overlap with the image in world space.
    """
    layer = resolve_label(path, label, what)[1] if label is not None else 0
    labels = read_label_layers(path, what)[layer][0]
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
