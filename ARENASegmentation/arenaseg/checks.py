"""Checks of an input before any work: which DICOM series, whether its geometry is a regular
grid, whether its voxels are CT numbers (HU), and whether it is thick enough for the network.

Every refusal is an :class:`~arenaseg.errors.ArenaError` naming the file, what was seen and the
fix; every warning is one line passed to a ``warn(message)`` callback (the pipeline turns it
into a ``warning:`` status line).

DICOM geometry is checked the way 3D Slicer's DICOM import does it (``DICOMScalarVolumePlugin``,
``AcquisitionGeometryRegularization``): the corners of every slice, as its header places them
(ImagePositionPatient, ImageOrientationPatient, PixelSpacing), are compared with the corners of
the regular grid SimpleITK's ``ImageSeriesReader`` built from the series. ITK only warns (or says
nothing) when slices are missing, unevenly spaced, tilted or duplicated, and stacks them on a
regular grid anyway, which distorts the anatomy; Slicer warns and offers a regularization
transform. We cannot regularize silently, so we refuse beyond a tenth of a voxel and say why.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .errors import ArenaError

WarnFn = Callable[[str], None]

#: HU given to non-finite voxels before the network sees them: air, i.e. outside the body.
AIR_HU = -1000.0
#: Slice corners closer than this to the regular grid (mm) are rounding noise (Slicer's
#: ``cornerEpsilon``).
CORNER_EPSILON_MM = 1e-3
#: Beyond this fraction of the smallest voxel spacing, reading the slices as a regular grid
#: would misplace anatomy: refused. Between the two: a warning.
CORNER_TOLERANCE_VOXELS = 0.1
#: Minimum and comfortable thickness, in voxels of the backbone's canonical grid, along every
#: axis. The small UNet downsamples 4 times (by 16): thinner than 16 voxels its deepest layers see
#: mostly the zero padding of the sliding window; thinner than 8, only padding at the two deepest.
MIN_VOXELS, THIN_VOXELS = 8, 16


def _log_warning(message: str) -> None:
    logging.getLogger("arenaseg").warning(message)


def orientation_code(image: sitk.Image) -> str:
    """Three-letter code of the closest axis-aligned orientation (SimpleITK's DICOM convention:
    the letters name where each voxel axis points *to*, e.g. ``LPS``, ``RAS``)."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def _mm(values) -> str:
    return "×".join(f"{v:.3g}" for v in values)


def describe(image: sitk.Image, path) -> str:
    """One line saying what was read: size, spacing, orientation, value range and, for a DICOM
    series, its UID, description and slice count."""
    series = ""
    if image.HasMetaDataKey("0020|000e"):
        description = image.GetMetaData("0008|103e").strip() if image.HasMetaDataKey("0008|103e") else ""
        series = (f"DICOM series {image.GetMetaData('0020|000e') or '(no SeriesInstanceUID)'}"
                  + (f" '{description}'" if description else "")
                  + f" ({image.GetSize()[2]} slices), ")
    stats = sitk.StatisticsImageFilter()
    stats.Execute(image)
    return (f"read {Path(path).name}: {series}{'×'.join(map(str, image.GetSize()))} voxels, "
            f"spacing {_mm(image.GetSpacing())} mm, orientation {orientation_code(image)}, "
            + (f"values {stats.GetMinimum():g} to {stats.GetMaximum():g}"
               if stats.GetMinimum() <= stats.GetMaximum() else "no finite value"))


# --- any image file ----------------------------------------------------------------------------

def check_grid(image: sitk.Image, path, what: str = "image") -> None:
    """Refuse geometry that is not a regular grid: non-finite or non-positive spacing, a
    non-finite origin, or a direction matrix that is not orthonormal (sheared) or degenerate.

    NRRD and MetaImage headers may hold non-perpendicular axes and ITK reads them as they are;
    the network's resampling (MONAI) assumes perpendicular axes, so anatomy would be skewed."""
    spacing = np.array(image.GetSpacing())
    origin = np.array(image.GetOrigin())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    fix = "the header is damaged: write the image again with its true geometry"
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ArenaError(f"{what} '{path}' has voxel spacing {tuple(spacing.tolist())} mm: "
                         f"spacing must be positive numbers; {fix}")
    if not np.all(np.isfinite(origin)) or not np.all(np.isfinite(direction)):
        raise ArenaError(f"{what} '{path}' has a non-finite origin or direction "
                         f"({tuple(origin.tolist())}): {fix}")
    if abs(np.linalg.det(direction)) < 1e-6:
        raise ArenaError(f"{what} '{path}' has a degenerate direction matrix (two voxel axes "
                         f"point the same way: {np.round(direction, 3).tolist()}): {fix}")
    skew = np.abs(direction.T @ direction - np.eye(3)).max()
    if skew > 1e-4:
        angle = np.degrees(np.arccos(np.clip(np.abs(direction.T @ direction)[~np.eye(3, dtype=bool)].max(), 0, 1)))
        raise ArenaError(f"{what} '{path}' has voxel axes that are not perpendicular (sheared "
                         f"grid, axes {angle:.1f}° apart, e.g. a gantry-tilted CT): resample it "
                         "onto a regular grid first (3D Slicer: load it, harden the acquisition "
                         "transform, save as NRRD) and give that file")


def explain_read_error(err: RuntimeError, path, what: str) -> ArenaError:
    """Turn an ITK reading error into a message with the right fix."""
    text = str(err)
    if "orthonormal" in text:  # ITK's NIfTI reader: sform/qform with sheared axes
        return ArenaError(f"{what} '{path}' has voxel axes that are not perpendicular (a sheared "
                          "affine, e.g. a gantry-tilted CT converted to NIfTI): resample it onto "
                          "a regular grid first (3D Slicer: load the DICOM with acquisition "
                          "geometry regularization, harden it, save as NRRD) and give that file")
    if "Refusing to change spacing" in text:
        return ArenaError(f"{what} '{path}' has a zero or non-finite voxel spacing in its header: "
                          "the header is damaged; write the image again with its true spacing")
    if "determinant is 0" in text:
        return ArenaError(f"{what} '{path}' has a degenerate direction matrix (determinant 0): "
                          "the header is damaged; write the image again with its true orientation")
    if "_nrrdSpaceVectorParse" in text:
        return ArenaError(f"{what} '{path}' has non-numeric (e.g. NaN) values in its 'space "
                          "directions' or 'space origin': the header is damaged; write the "
                          "image again with its true geometry")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    detail = next((line for line in reversed(lines) if "ERROR" in line), lines[-1] if lines else "unknown reason")
    return ArenaError(f"{what} '{path}' cannot be read ({detail}): give a complete NIfTI, NRRD or "
                      "MHA file, or a folder holding one DICOM series")


# --- DICOM folders -----------------------------------------------------------------------------

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
    """The series to read: ``wanted`` (``--series``), the only one, or the only one the
    annotations ``match`` (a path, or None) lie on; otherwise refuse, listing the series."""
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
        points = _painted_points(match)
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


def _painted_points(path, limit: int = 4000) -> np.ndarray:
    """World (LPS) positions of up to ``limit`` painted voxels of a labelmap file."""
    from .imageio import index_to_world_matrix, read_label_layers

    try:
        layers = read_label_layers(path)
    except ArenaError:
        return np.zeros((0, 3))  # the annotations' own error is reported when they are read
    points = []
    for image, _ in layers:
        array = np.transpose(sitk.GetArrayViewFromImage(image), (2, 1, 0))
        ijk = np.argwhere(array > 0)
        if len(ijk):
            pick = ijk[np.linspace(0, len(ijk) - 1, min(limit, len(ijk))).astype(int)]
            points.append((np.c_[pick, np.ones(len(pick))] @ index_to_world_matrix(image).T)[:, :3])
    return np.concatenate(points) if points else np.zeros((0, 3))


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


# --- CT intensities and size -------------------------------------------------------------------

def non_finite(image: sitk.Image) -> np.ndarray | None:
    """Boolean ``(I, J, K)`` array of NaN/inf voxels, or None when there is none (integer images
    never have them)."""
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return None
    bad = ~np.isfinite(sitk.GetArrayViewFromImage(image))
    return np.transpose(bad, (2, 1, 0)) if bad.any() else None


def check_nifti_complete(path, what: str = "image") -> None:
    """Refuse a truncated NIfTI file. ITK's NIfTI reader fills the missing end of a cut-off file
    (an interrupted copy or download) with zeros and raises nothing, so the scan would silently
    lose its last slices; nibabel stops at the end of the file. Reading the last slice reads (for
    ``.nii.gz``: decompresses) the file to the end of its data.

    Raises:
        ArenaError: the file ends before its voxel data does, or its compression is corrupt.
    """
    if not str(path).lower().endswith((".nii", ".nii.gz")):
        return
    import nibabel as nib

    try:
        np.asarray(nib.load(str(path)).dataobj[..., -1])
    except (EOFError, ValueError, OSError) as err:  # gzip/zlib errors are OSError subclasses
        raise ArenaError(f"{what} '{path}' is truncated or corrupt ({err}): the file ends before "
                         "its voxel data does; copy or export it again") from None


def restore_nifti_non_finite(image: sitk.Image, path) -> sitk.Image:
    """Put back the NaN/inf voxels of a float NIfTI file, which ITK's NIfTI reader turns into 0
    (indistinguishable from water, 0 HU): read with nibabel, whose voxel order (i, j, k) is
    ITK's index order."""
    name = str(path).lower()
    if (not name.endswith((".nii", ".nii.gz")) or image.GetDimension() != 3
            or image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64)):
        return image
    import nibabel as nib

    values = np.asanyarray(nib.load(str(path)).dataobj)
    if values.shape != image.GetSize():
        return image
    bad = ~np.isfinite(values)
    if not bad.any():
        return image
    array = sitk.GetArrayFromImage(image)
    array[np.transpose(bad, (2, 1, 0))] = np.nan
    restored = sitk.GetImageFromArray(array)
    restored.CopyInformation(image)
    return restored


def fill_outside(image: sitk.Image) -> tuple[sitk.Image, np.ndarray | None]:
    """Policy for non-finite voxels: they are outside the scan. Return the image with them set to
    air (:data:`AIR_HU`, what the network expects outside the body) and their ``(I, J, K)`` mask,
    where nothing is ever predicted; the image itself when all voxels are finite."""
    outside = non_finite(image)
    if outside is None:
        return image, None
    values = sitk.GetArrayFromImage(image)
    values[~np.isfinite(values)] = AIR_HU
    filled = sitk.GetImageFromArray(values)
    filled.CopyInformation(image)
    return filled, outside


def check_intensities(image: sitk.Image, path, warn: WarnFn | None = None) -> None:
    """Refuse a CT whose values are not Hounsfield units; warn about non-finite voxels.

    A CT in HU has air near -1000, fat near -100 and soft tissue near 0-100. No value below
    -50 among the 1 % lowest means neither air nor fat: either HU + 1024 stored without its
    rescale intercept (soft tissue then reads about 1050) or not a CT in HU at all (normalised,
    8-bit export, MR)."""
    warn = warn or _log_warning
    values = sitk.GetArrayViewFromImage(image)
    outside = non_finite(image)
    if outside is not None:
        count = int(outside.sum())
        if count == values.size:
            raise ArenaError(f"image '{path}' holds no finite value (all NaN or inf): give the "
                             "CT itself")
        warn(f"image '{path}' has {count} NaN/inf voxels ({100 * count / values.size:.2g} % of "
             f"the volume): treated as outside the scan (air, {AIR_HU:g} HU, for the network) "
             "and never segmented")
    sample = np.asarray(values[::2, ::2, ::2] if values.size > 2_000_000 else values, np.float64)
    sample = sample[np.isfinite(sample)]
    sample = sample[sample > -1500]  # padding outside the field of view (-2048, -3024) aside
    if sample.size == 0:
        raise ArenaError(f"image '{path}' holds only values below -1500: this is not a CT in HU "
                         "(or only padding); give the CT in Hounsfield units")
    low, median, high = np.percentile(sample, [1, 50, 99])
    if low >= -50:
        seen = f"1 % of voxels below {low:g}, median {median:g}, 99 % below {high:g}"
        if median >= 800:
            raise ArenaError(
                f"image '{path}' looks like HU + 1024 stored without its rescale intercept ({seen}; "
                "a CT in HU has air near -1000 and soft tissue near 0-100): subtract 1024, e.g. "
                f"sitk.WriteImage(sitk.Cast(sitk.ReadImage(path), sitk.sitkInt16) - 1024, "
                "'ct_hu.nii.gz'), or convert the DICOM again keeping its rescale intercept")
        raise ArenaError(
            f"image '{path}' is not a CT in Hounsfield units ({seen}; a CT has air near -1000 "
            "and fat near -100): give the original CT in HU, not a normalised, 8-bit or MR "
            "image; a crop entirely inside soft tissue must be cropped larger, to include fat or air")


def check_extent(image: sitk.Image, path, prep, backbone: str, warn: WarnFn | None = None) -> None:
    """Refuse an image thinner than :data:`MIN_VOXELS` voxels of the backbone's grid along any
    axis (e.g. 3 slices); warn below :data:`THIN_VOXELS`."""
    warn = warn or _log_warning
    direction = np.abs(np.array(image.GetDirection()).reshape(3, 3))
    for axis in range(3):
        target = float(prep.spacing_mm[int(np.argmax(direction[:, axis]))])
        extent = image.GetSize()[axis] * image.GetSpacing()[axis]
        voxels = extent / target
        where = (f"image '{path}' is {extent:.3g} mm thick along voxel axis {'ijk'[axis]} "
                 f"({image.GetSize()[axis]} voxels of {image.GetSpacing()[axis]:.3g} mm)")
        minimum = (f"the backbone '{backbone}' works on {target:g} mm voxels and needs at least "
                   f"{MIN_VOXELS} of them ({MIN_VOXELS * target:g} mm) along every axis")
        if voxels < MIN_VOXELS:
            raise ArenaError(f"{where}: {minimum}; give a volume that covers more of the body "
                             "(e.g. the whole series)")
        if voxels < THIN_VOXELS:
            warn(f"{where}: under {THIN_VOXELS} voxels of {target:g} mm "
                 f"({THIN_VOXELS * target:g} mm) the network sees mostly padding there; expect "
                 "a poorer result")


def backbone_preprocessing(backbone_id):
    """The preprocessing of a backbone (registry id or checkpoint file), without loading it."""
    from .backbones import REGISTRY, get_spec, spec_for_file

    if backbone_id not in REGISTRY and (os.sep in str(backbone_id) or Path(backbone_id).is_file()):
        return spec_for_file(backbone_id).preprocessing
    return get_spec(str(backbone_id)).preprocessing


def check_paint(image: sitk.Image, annotation, source) -> None:
    """Refuse structure paint on NaN/inf voxels: there is no image there to learn from (the
    network would be taught that air is the structure)."""
    outside = non_finite(image)
    if outside is None:
        return
    count = int((annotation.target & outside).sum())
    if count:
        raise ArenaError(f"annotations '{source}' paint {count} voxels of the structure where the "
                         "image holds NaN/inf (no image): erase the paint there, or paint slices "
                         "where the CT has values")
