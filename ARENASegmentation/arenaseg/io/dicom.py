"""DICOM folders: which series, and whether its slices form a regular grid.

DICOM geometry is checked the way 3D Slicer's DICOM import does it (``DICOMScalarVolumePlugin``,
``AcquisitionGeometryRegularization``): the corners of every slice, as its header places them
(ImagePositionPatient, ImageOrientationPatient, PixelSpacing), are compared with the corners of
the regular grid SimpleITK's ``ImageSeriesReader`` built from the series. ITK only warns (or says
nothing) when slices are missing, unevenly spaced, tilted or duplicated, and stacks them on a
regular grid anyway, which distorts the anatomy; Slicer warns and offers a regularization
transform. We cannot regularize silently, so we refuse beyond a tenth of a voxel and say why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import ArenaError
from .checks import WarnFn, _log_warning


#: Slice corners closer than this to the regular grid (mm) are rounding noise (Slicer's
#: ``cornerEpsilon``).
CORNER_EPSILON_MM = 1e-3


#: Beyond this fraction of the smallest voxel spacing, reading the slices as a regular grid
#: would misplace anatomy: refused. Between the two: a warning.
CORNER_TOLERANCE_VOXELS = 0.1


@dataclass
class SliceInfo:
    """One file's header geometry (GDCM, via SimpleITK's ``ReadImageInformation``)."""

    file: str
    size: tuple[int, ...]
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray  # 3×3, columns = voxel axes in LPS


@dataclass
class Series:
    uid: str
    files: list[str]
    description: str

    def label(self) -> str:
        desc = f" '{self.description}'" if self.description else ""
        uid = self.uid or '"" (no SeriesInstanceUID)'
        return f"{uid}{desc} ({len(self.files)} slices)"


def _header(file: str) -> tuple[SliceInfo, sitk.ImageFileReader]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.ReadImageInformation()
    return SliceInfo(file, reader.GetSize(), np.array(reader.GetSpacing()),
                     np.array(reader.GetOrigin()),
                     np.array(reader.GetDirection()).reshape(3, 3)), reader


def list_series(folder: Path) -> list[Series]:
    """Every DICOM series in ``folder`` (GDCM groups files by SeriesInstanceUID), files in the
    order GDCM sorts them (by position along the slice normal)."""
    quiet = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # our messages say it in one line
    try:
        found = []
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
            files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
            if not files:
                continue
            _, reader = _header(files[0])
            description = reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else ""
            found.append(Series(uid, files, description))
        return found
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(quiet)


def _series_box_contains(series: Series, points_lps: np.ndarray) -> float:
    """Fraction of ``points_lps`` (N, 3) inside the slab the series covers, from headers only."""
    first, _ = _header(series.files[0])
    last, _ = _header(series.files[-1])
    normal = first.direction[:, 2]
    count = len(series.files) if first.size[2] == 1 else first.size[2]
    depth = float(normal @ (last.origin - first.origin)) / max(count - 1, 1) if count > 1 else 1.0
    spacing = np.array([first.spacing[0], first.spacing[1], depth if depth else 1.0])
    size = np.array([first.size[0], first.size[1], count])
    index = (points_lps - first.origin) @ first.direction @ np.diag(1 / spacing)
    inside = np.all((index >= -0.5 - 1e-3) & (index <= size - 0.5 + 1e-3), axis=1)
    return float(inside.mean()) if len(inside) else 0.0


def choose_series(folder: Path, what: str, wanted: str | None, match, warn: WarnFn) -> Series:
    """The series to read: ``wanted`` (``--series``), the only one, or the only one the painted
    voxels lie on (``match()``: their world positions, see :func:`.labels.painted_points`; or
    None); otherwise refuse, listing the series."""
    found = list_series(folder)
    if not found:
        raise ArenaError(f"{what} folder '{folder}' holds no DICOM series: point to a folder of "
                         "DICOM slices or to an image file")
    listing = "; ".join(s.label() for s in found)
    if wanted is not None:
        for s in found:
            if s.uid == wanted:
                return s
        raise ArenaError(f"--series {wanted} is not in {what} folder '{folder}', which holds: "
                         f"{listing}: give one of these UIDs")
    if len(found) == 1:
        return found[0]
    if match is not None:
        points = match()
        hits = [s for s in found if _series_box_contains(s, points) > 0.99] if len(points) else []
        if len(hits) == 1:
            others = len(found) - 1
            warn(f"{what} folder '{folder}' holds {len(found)} DICOM series; using "
                 f"{hits[0].label()}, the one the annotations lie on ({others} other"
                 f"{'s' if others > 1 else ''} ignored; --series UID chooses)")
            return hits[0]
        why = ("the annotations lie on several of them" if hits else
               "the annotations lie on none of them")
        raise ArenaError(f"{what} folder '{folder}' holds {len(found)} DICOM series and {why}: "
                         f"choose one with --series UID: {listing}")
    raise ArenaError(f"{what} folder '{folder}' holds {len(found)} DICOM series: choose one with "
                     f"--series UID: {listing}")


def read_series(folder: Path, what: str = "image", wanted: str | None = None, match=None,
                warn: WarnFn | None = None) -> sitk.Image:
    """Read one DICOM series of ``folder`` (see :func:`choose_series`), check that its slices form
    a regular grid (:func:`check_slices`), and record its SeriesInstanceUID and description in the
    image's metadata (``0020|000e``, ``0008|103e``) for :func:`describe`."""
    warn = warn or _log_warning
    series = choose_series(folder, what, wanted, match, warn)
    headers = [_header(f)[0] for f in series.files]
    _check_slice_headers(headers, folder, what)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series.files)
    quiet = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's spacing warning: ours is clearer
    try:
        image = reader.Execute()
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(quiet)
    if len(headers) > 1:
        check_slices(image, headers, folder, what, warn)
    image.SetMetaData("0020|000e", series.uid)
    image.SetMetaData("0008|103e", series.description)
    return image


def _check_slice_headers(headers: list[SliceInfo], folder, what: str) -> None:
    """Refuse a series whose slices differ in size or orientation: they are not one volume."""
    sizes = {h.size[:2] for h in headers}
    if len(sizes) > 1:
        a = headers[0]
        b = next(h for h in headers if h.size[:2] != a.size[:2])
        raise ArenaError(f"{what} folder '{folder}': the series mixes slice sizes "
                         f"({a.size[0]}×{a.size[1]} in '{Path(a.file).name}', {b.size[0]}×{b.size[1]} "
                         f"in '{Path(b.file).name}'), e.g. a localizer among the slices: move the "
                         "slices that are not part of the volume out of the folder")
    for h in headers[1:]:
        if np.abs(h.direction[:, :2] - headers[0].direction[:, :2]).max() > 1e-4:
            raise ArenaError(f"{what} folder '{folder}': the series mixes slice orientations "
                             f"('{Path(headers[0].file).name}' is {_orient(headers[0])}, "
                             f"'{Path(h.file).name}' is {_orient(h)}), e.g. a localizer or "
                             "reformatted slices: move the slices that are not part of the "
                             "volume out of the folder")


def _orient(h: SliceInfo) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(h.direction.flatten().tolist())


def check_slices(image: sitk.Image, headers: list[SliceInfo], folder, what: str,
                 warn: WarnFn) -> None:
    """Compare each slice's corners, as its header places them, with the regular grid ``image``
    was read onto (3D Slicer's test); refuse beyond :data:`CORNER_TOLERANCE_VOXELS` of a voxel,
    naming the kind of irregularity (duplicate positions, missing slices or uneven spacing,
    gantry tilt) and the files."""
    grid = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    origin = np.array(image.GetOrigin())
    if headers[0].size[2] > 1:  # a multi-frame file: per-frame positions are GDCM's business
        return
    worst, worst_k = 0.0, 0
    for k, h in enumerate(headers):
        for i in (0, h.size[0] - 1):
            for j in (0, h.size[1] - 1):
                header = h.origin + h.direction[:, :2] @ (h.spacing[:2] * (i, j))
                ours = origin + grid @ (i, j, k)
                error = float(np.abs(header - ours).max())
                if error > worst:
                    worst, worst_k = error, k
    if worst <= CORNER_EPSILON_MM:
        return
    tolerance = CORNER_TOLERANCE_VOXELS * min(image.GetSpacing())
    if worst <= tolerance:
        warn(f"{what} folder '{folder}': slice positions deviate up to {worst:.3g} mm from a "
             f"regular grid (at '{Path(headers[worst_k].file).name}'), under a tenth of a voxel: "
             "read as a regular grid")
        return
    kind, fix = _irregularity(headers)
    raise ArenaError(f"{what} folder '{folder}': {kind}, so the slices do not form a regular grid "
                     f"(a slice lies {worst:.3g} mm off it): {fix}")


_RESAMPLE = ("resample it onto a regular grid first (3D Slicer: DICOM import with acquisition "
             "geometry regularization, harden the transform, save as NRRD) and give that file")


def _irregularity(headers: list[SliceInfo]) -> tuple[str, str]:
    """Name what makes the slice positions irregular, with the files concerned, and its fix."""
    normal = headers[0].direction[:, 2]
    offsets = np.array([h.origin - headers[0].origin for h in headers])
    depth = offsets @ normal
    order = np.argsort(depth, kind="stable")
    depth, names = depth[order], [Path(headers[i].file).name for i in order]
    steps = np.diff(depth)
    same = np.flatnonzero(np.abs(steps) < 1e-3)
    if same.size:
        k = same[0]
        return (f"{same.size} pair{'s' if same.size > 1 else ''} of slices share a position "
                f"(e.g. '{names[k]}' and '{names[k + 1]}'), as when one series holds several "
                "acquisitions, phases or echoes, or a file was copied twice",
                "put one acquisition (one file per position) in a folder of its own and give that")
    shear = offsets - np.outer(offsets @ normal, normal)
    far = np.argmax(np.abs(offsets @ normal))
    tilt = np.degrees(np.arctan2(np.linalg.norm(shear[far]), abs(depth[-1] - depth[0]) or 1.0))
    if tilt > 0.05:
        return (f"the slices are shifted sideways along the stack (gantry tilt or shear of "
                f"{tilt:.1f}°, '{Path(headers[far].file).name}' is "
                f"{np.linalg.norm(shear[far]):.1f} mm off the slice normal)", _RESAMPLE)
    k = int(np.argmax(np.abs(steps - np.median(steps))))
    return (f"the slice spacing varies from {steps.min():.3g} to {steps.max():.3g} mm (step of "
            f"{steps[k]:.3g} mm between '{names[k]}' and '{names[k + 1]}'; missing slices or "
            "uneven spacing)", f"give the complete series, or {_RESAMPLE}")
