"""DICOM: which series, and whether its slices (or the frames of a multi-frame file) form a
regular grid.

DICOM geometry is checked the way 3D Slicer's DICOM import does it (``DICOMScalarVolumePlugin``,
``AcquisitionGeometryRegularization``): the corners of every slice, as its header places them
(ImagePositionPatient, ImageOrientationPatient, PixelSpacing), are compared with the corners of
the regular grid the volume is read onto. ITK only warns (or says nothing) when slices are
missing, unevenly spaced, tilted or duplicated, and stacks them on a regular grid anyway, which
distorts the anatomy; Slicer warns and offers a regularization transform. We cannot regularize
silently, so we refuse beyond a tenth of a voxel and say why.

A multi-frame file (Enhanced CT) keeps each frame's geometry in its functional groups
(PerFrameFunctionalGroupsSequence, SharedFunctionalGroupsSequence), which GDCM does not check:
with a frame missing it reads the whole volume on 1 mm voxels, and it applies the first frame's
rescale to every frame. Its frames are read with pydicom, checked like the slices of a series,
sorted along the slice normal, and the voxels GDCM decoded are placed on the grid they form.
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


@dataclass(frozen=True)
class GeometryTag:
    """A tag every slice needs; without it GDCM silently puts the slice at 0 mm, in the identity
    orientation or on 1 mm pixels."""

    key: str  # GDCM's metadata key
    keyword: str  # pydicom's keyword
    group: str  # the functional group sequence holding it in a multi-frame file
    unknown: str  # what cannot be known without it
    length: int  # how many numbers it holds

    @property
    def name(self) -> str:
        return f"({self.key.replace('|', ',').upper()}) {self.keyword}"


GEOMETRY_TAGS = (
    GeometryTag("0020|0032", "ImagePositionPatient", "PlanePositionSequence",
                "where each slice lies", 3),
    GeometryTag("0020|0037", "ImageOrientationPatient", "PlaneOrientationSequence",
                "how the slices are oriented", 6),
    GeometryTag("0028|0030", "PixelSpacing", "PixelMeasuresSequence", "the pixel size", 2),
)


@dataclass
class SliceInfo:
    """One slice's header geometry: a file's (GDCM, via SimpleITK's ``ReadImageInformation``) or
    a frame's (its functional groups, via pydicom). Lengths in mm, LPS."""

    file: str  # the file, or "<file name> frame <n>" (n from 1, in the file's order)
    size: tuple[int, ...]
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray  # 3×3, columns = voxel axes in LPS
    missing: tuple[str, ...] = ()  # names of the GEOMETRY_TAGS the header lacks
    rescale: tuple[float, float] | None = None  # a frame's (slope, intercept)


@dataclass
class Series:
    uid: str
    files: list[str]
    description: str

    def label(self) -> str:
        desc = f" '{self.description}'" if self.description else ""
        uid = self.uid or '"" (no SeriesInstanceUID)'
        return f"{uid}{desc} ({len(self.files)} slices)"


def _quietly(action):
    """``action()`` without ITK's warnings on the console: our messages say it in one line."""
    quiet = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return action()
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(quiet)


def _header(file: str) -> tuple[SliceInfo, sitk.ImageFileReader]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.ReadImageInformation()
    missing = tuple(t.name for t in GEOMETRY_TAGS if not reader.HasMetaDataKey(t.key)
                    or not reader.GetMetaData(t.key).strip())
    return SliceInfo(file, reader.GetSize(), np.array(reader.GetSpacing()),
                     np.array(reader.GetOrigin()),
                     np.array(reader.GetDirection()).reshape(3, 3), missing), reader


def is_dicom_file(path) -> bool:
    """True when SimpleITK would read ``path`` (a file) with GDCM, i.e. as DICOM."""
    return sitk.ImageFileReader.GetImageIOFromFileName(str(path)) == "GDCMImageIO"


def list_series(folder: Path) -> list[Series]:
    """Every DICOM series in ``folder`` (GDCM groups files by SeriesInstanceUID), files in the
    order GDCM sorts them (by position along the slice normal)."""
    def find():
        found = []
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
            files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
            if not files:
                continue
            _, reader = _header(files[0])
            description = reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else ""
            found.append(Series(uid, files, description))
        return found
    return _quietly(find)


def _series_box_contains(series: Series, points_lps: np.ndarray, where: str) -> float:
    """Fraction of ``points_lps`` (N, 3) inside the slab the series covers, from headers only."""
    first, _ = _header(series.files[0])
    last, _ = _header(series.files[-1])
    count = len(series.files)
    if first.size[2] > 1:  # a multi-frame file: its first and last frames along the normal
        frames = _sorted(_frame_headers(series.files[0], where))[0]
        first, last, count = frames[0], frames[-1], len(frames)
    normal = first.direction[:, 2]
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
        hits = [s for s in found if _series_box_contains(s, points, f"{what} folder '{folder}'") > 0.99] if len(points) else []
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
    """Read one DICOM series of ``folder`` (see :func:`choose_series`), check that its slices
    (or, for one multi-frame file, its frames: :func:`read_multiframe`) form a regular grid
    (:func:`check_slices`), and record its SeriesInstanceUID and description in the image's
    metadata (``0020|000e``, ``0008|103e``) for :func:`describe`.

    Raises:
        ArenaError: no or several series (:func:`choose_series`), a slice lacks a geometry tag
            (:data:`GEOMETRY_TAGS`), the slices differ in size, pixel spacing or orientation, do
            not form a regular grid, or the series is made of several multi-frame files.
    """
    warn = warn or _log_warning
    series = choose_series(folder, what, wanted, match, warn)
    where = f"{what} folder '{folder}'"
    headers = [_header(f)[0] for f in series.files]
    if any(h.size[2] > 1 for h in headers):
        if len(headers) > 1:
            names = ", ".join(f"'{Path(h.file).name}'" for h in headers[:3])
            raise ArenaError(f"{where}: series {series.label()} is made of {len(headers)} files, "
                             f"some multi-frame ({names}{', ...' if len(headers) > 3 else ''}), "
                             "which are not read as one volume: give one multi-frame file (the "
                             "file itself, or a folder holding only it)")
        image = read_multiframe(series.files[0], where, warn)
    else:
        image = _read_slices(series.files, headers, where, warn)
    image.SetMetaData("0020|000e", series.uid)
    image.SetMetaData("0008|103e", series.description)
    return image


def _read_slices(files: list[str], headers: list[SliceInfo], where: str, warn: WarnFn) -> sitk.Image:
    """The single-frame files of one series, checked and read with ``ImageSeriesReader``."""
    _check_tags(headers, where, "file")
    _check_slice_headers(headers, where)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    image = _quietly(reader.Execute)  # ITK's spacing warning: ours is clearer
    if len(headers) > 1:
        check_slices(image, headers, where, warn)
    return image


def read_dicom_file(path, what: str = "image", warn: WarnFn | None = None) -> sitk.Image:
    """One DICOM file: a multi-frame file as a checked volume (:func:`read_multiframe`), a
    single-frame file as it is (one slice: :func:`.images.read_image` refuses it as 2D).

    Raises:
        ArenaError: see :func:`read_multiframe`.
    """
    info, reader = _header(str(path))
    if info.size[2] > 1:
        image = read_multiframe(str(path), f"{what} '{path}'", warn or _log_warning)
    else:
        image = _quietly(lambda: sitk.ReadImage(str(path)))
    for key in ("0020|000e", "0008|103e"):
        image.SetMetaData(key, reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else "")
    return image


# --- multi-frame files ---------------------------------------------------------------------------

def read_multiframe(file: str, where: str, warn: WarnFn) -> sitk.Image:
    """A multi-frame file (e.g. Enhanced CT) as a 3D volume: each frame's position, orientation
    and pixel spacing from its functional groups (:func:`_frame_headers`), checked like the
    slices of a series; the voxels GDCM decoded (rescaled to HU), their frames sorted along the
    slice normal and placed on the regular grid the frames form (spacing in mm, LPS).

    Raises:
        ArenaError: pydicom is missing; a frame lacks a geometry tag; the frames differ in
            orientation, pixel spacing or rescale; they do not form a regular grid (a missing
            frame, uneven spacing, tilt, duplicates); GDCM decoded another number of frames.
    """
    frames = _frame_headers(file, where)
    _check_tags(frames, where, "frame")
    _check_slice_headers(frames, where)
    _check_rescale(frames, where)
    image = _quietly(lambda: sitk.ReadImage(file))
    expected = (frames[0].size[0], frames[0].size[1], len(frames))
    if image.GetSize() != expected:
        raise ArenaError(f"{where}: '{Path(file).name}' declares {len(frames)} frames of "
                         f"{expected[0]}×{expected[1]} but SimpleITK (GDCM) decoded "
                         f"{'×'.join(map(str, image.GetSize()))} voxels: the file is damaged; "
                         "export it again")
    return _on_frame_grid(image, frames, where, warn)


def _sorted(frames: list[SliceInfo]) -> tuple[list[SliceInfo], np.ndarray, float]:
    """Frames sorted along the slice normal (as GDCM sorts a series), their order and the mean
    step between them (mm)."""
    depth = np.array([f.origin @ frames[0].direction[:, 2] for f in frames])
    order = np.argsort(depth, kind="stable")
    step = float(depth[order[-1]] - depth[order[0]]) / max(len(frames) - 1, 1)
    return [frames[i] for i in order], order, step


def _on_frame_grid(image: sitk.Image, frames: list[SliceInfo], where: str, warn: WarnFn) -> sitk.Image:
    """``image`` (GDCM's frames, in the file's order) sorted along the normal and given the grid
    the frames span; refused where the frames are not on it (:func:`check_slices`)."""
    ordered, order, step = _sorted(frames)
    if len(frames) > 1 and step <= CORNER_EPSILON_MM:
        kind, fix = _irregularity(frames, "frame")
        raise ArenaError(f"{where}: {kind}, so the frames do not form a volume: {fix}")
    if np.any(order != np.arange(len(order))):
        volume = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(image)[order])
    else:
        volume = image
    volume.SetOrigin(ordered[0].origin.tolist())
    volume.SetSpacing([*ordered[0].spacing[:2].tolist(), step if len(frames) > 1 else 1.0])
    volume.SetDirection(ordered[0].direction.flatten().tolist())
    if len(frames) > 1:
        check_slices(volume, ordered, where, warn, "frame")
    return volume


def _dataset(file: str, where: str):
    """The header of ``file`` read with pydicom (no pixel data)."""
    try:
        import pydicom
    except ImportError:
        raise ArenaError(f"{where}: '{Path(file).name}' is a multi-frame DICOM file, whose frame "
                         "positions are read with pydicom, which is not installed: pip install "
                         "pydicom, or give the series as single-frame files or as NIfTI") from None
    try:
        return pydicom.dcmread(file, stop_before_pixels=True)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError) as err:
        raise ArenaError(f"{where}: '{Path(file).name}' cannot be read as DICOM ({err}): the "
                         "file is damaged; export it again") from None


def _floats(value) -> list[float] | None:
    """A DICOM number or list of numbers as floats; None when empty or not numbers."""
    try:
        return np.atleast_1d(np.asarray(value, float)).tolist() if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _group_value(keyword: str, group: str, *sources) -> list[float] | None:
    """``keyword`` from the first of ``sources`` (per-frame item, shared item: functional group
    datasets, or None) whose ``group`` sequence holds it, as floats; None when none does."""
    for source in sources:
        items = source.get(group) if source is not None else None
        value = _floats(items[0].get(keyword)) if items else None
        if value is not None:
            return value
    return None


def _frame_headers(file: str, where: str) -> list[SliceInfo]:
    """Each frame of a multi-frame file, in the file's order, as a slice: position from its
    per-frame functional groups (PlanePositionSequence), orientation and pixel spacing from its
    per-frame or shared groups (or the top level), rescale from PixelValueTransformationSequence
    (or the top level). Lengths in mm.

    Raises:
        ArenaError: pydicom is missing, the file is not DICOM, or the per-frame groups do not
            describe every frame.
    """
    ds = _dataset(file, where)
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    count = int(ds.get("NumberOfFrames") or 1)
    if per_frame and len(per_frame) != count:
        raise ArenaError(f"{where}: '{Path(file).name}' declares {count} frames (NumberOfFrames) "
                         f"but describes {len(per_frame)} in its PerFrameFunctionalGroupsSequence: "
                         "the file is damaged; export it again")
    top = [ds] if "PerFrameFunctionalGroupsSequence" not in ds else []
    return [_frame_info(ds, f"{Path(file).name} frame {k + 1}",
                        per_frame[k] if per_frame else None, shared, top) for k in range(count)]


def _frame_info(ds, name: str, item, shared, top: list) -> SliceInfo:
    """One frame's geometry; ``top``: [the dataset] where its top-level tags stand in for
    absent functional groups (orientation, spacing, rescale; never a frame's position)."""
    values = {}
    for tag in GEOMETRY_TAGS:
        values[tag.keyword] = _group_value(tag.keyword, tag.group, item, shared)
        if values[tag.keyword] is None and tag.keyword != "ImagePositionPatient" and top:
            values[tag.keyword] = _floats(ds.get(tag.keyword))
        if values[tag.keyword] is not None and len(values[tag.keyword]) != tag.length:
            values[tag.keyword] = None
    missing = tuple(t.name for t in GEOMETRY_TAGS if values[t.keyword] is None)
    cosines = np.array(values["ImageOrientationPatient"] or [1, 0, 0, 0, 1, 0], float)
    direction = np.column_stack([cosines[:3], cosines[3:], np.cross(cosines[:3], cosines[3:])])
    rows, columns = (values["PixelSpacing"] or [1.0, 1.0])[:2]
    slope = _group_value("RescaleSlope", "PixelValueTransformationSequence", item, shared)
    intercept = _group_value("RescaleIntercept", "PixelValueTransformationSequence", item, shared)
    if top and slope is None:
        slope, intercept = _floats(ds.get("RescaleSlope")), _floats(ds.get("RescaleIntercept"))
    return SliceInfo(name, (int(ds.Columns), int(ds.Rows), 1), np.array([columns, rows, 1.0]),
                     np.array(values["ImagePositionPatient"] or [0.0, 0.0, 0.0], float), direction,
                     missing, ((slope or [1.0])[0], (intercept or [0.0])[0]))


def _check_rescale(frames: list[SliceInfo], where: str) -> None:
    """Refuse frames with different rescale slopes or intercepts: GDCM applies the first
    frame's to every frame, so the others would not be in HU."""
    other = next((f for f in frames if f.rescale != frames[0].rescale), None)
    if other is not None:
        (a_slope, a_icpt), (b_slope, b_icpt) = frames[0].rescale, other.rescale
        raise ArenaError(f"{where}: the frames have different rescale slope/intercept "
                         f"({a_slope:g}/{a_icpt:g} in '{frames[0].file}', {b_slope:g}/{b_icpt:g} "
                         f"in '{other.file}'), which SimpleITK (GDCM) would ignore, applying the "
                         "first frame's to all: export the series as single-frame CT images "
                         "from the scanner or PACS, each slice with its own rescale")


# --- checks shared by series and multi-frame files -----------------------------------------------

_FIX_TAG = ("use the original export from the scanner or PACS (an anonymiser or converter "
            "dropped it), or a NIfTI or NRRD converted from it by a tool that keeps the geometry "
            "(dcm2niix, 3D Slicer)")


def _check_tags(headers: list[SliceInfo], where: str, unit: str) -> None:
    """Refuse slices (``unit``: "file" or "frame") whose header lacks a geometry tag
    (:data:`GEOMETRY_TAGS`), naming the tag, how many lack it and one of them."""
    for tag in GEOMETRY_TAGS:
        lacking = [h for h in headers if tag.name in h.missing]
        if not lacking:
            continue
        count = (f"every {unit}" if len(lacking) == len(headers)
                 else f"{len(lacking)} of {len(headers)} {unit}s")
        within = f" (in the functional groups' {tag.group})" if unit == "frame" else ""
        raise ArenaError(f"{where}: {tag.name}{within} is missing from {count} (e.g. "
                         f"'{Path(lacking[0].file).name}'), so {tag.unknown} is unknown: {_FIX_TAG}")


def _check_slice_headers(headers: list[SliceInfo], where: str) -> None:
    """Refuse a series whose slices differ in size, pixel spacing or orientation: they are not
    one volume."""
    frames = " frame " in Path(headers[0].file).name
    fix = ("export each stack or acquisition as a series of its own from the scanner or PACS, "
           "and give the one to segment" if frames else
           "move the slices that are not part of the volume out of the folder")
    a = headers[0]
    b = next((h for h in headers if h.size[:2] != a.size[:2]), None)
    if b is not None:
        raise ArenaError(f"{where}: the series mixes slice sizes "
                         f"({a.size[0]}×{a.size[1]} in '{Path(a.file).name}', {b.size[0]}×{b.size[1]} "
                         f"in '{Path(b.file).name}'), e.g. a localizer among the slices: {fix}")
    b = next((h for h in headers if np.abs(h.spacing[:2] - a.spacing[:2]).max() > 1e-4), None)
    if b is not None:
        raise ArenaError(f"{where}: the series mixes pixel spacings ({_mm2(a)} mm in "
                         f"'{Path(a.file).name}', {_mm2(b)} mm in '{Path(b.file).name}'), e.g. "
                         f"a localizer or another field of view among the slices: {fix}")
    for h in headers[1:]:
        if np.abs(h.direction[:, :2] - a.direction[:, :2]).max() > 1e-4:
            raise ArenaError(f"{where}: the series mixes slice orientations "
                             f"('{Path(a.file).name}' is {_orient(a)}, "
                             f"'{Path(h.file).name}' is {_orient(h)}), e.g. a localizer or "
                             f"reformatted slices: {fix}")


def _mm2(h: SliceInfo) -> str:
    return "×".join(f"{v:.4g}" for v in h.spacing[:2])


def _orient(h: SliceInfo) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(h.direction.flatten().tolist())


def check_slices(image: sitk.Image, headers: list[SliceInfo], where: str, warn: WarnFn,
                 unit: str = "slice") -> None:
    """Compare each slice's (or frame's: ``unit``) corners, as its header places them, with the
    regular grid ``image`` was read onto (3D Slicer's test), ``headers`` in the image's slice
    order; refuse beyond :data:`CORNER_TOLERANCE_VOXELS` of a voxel, naming the kind of
    irregularity (duplicate positions, missing slices or uneven spacing, gantry tilt) and the
    files; warn between :data:`CORNER_EPSILON_MM` and that.

    Raises:
        ArenaError: a slice lies further than the tolerance (mm) from the grid.
    """
    grid = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    origin = np.array(image.GetOrigin())
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
        warn(f"{where}: {unit} positions deviate up to {worst:.3g} mm from a "
             f"regular grid (at '{Path(headers[worst_k].file).name}'), under a tenth of a voxel: "
             "read as a regular grid")
        return
    kind, fix = _irregularity(headers, unit)
    raise ArenaError(f"{where}: {kind}, so the {unit}s do not form a regular grid "
                     f"(a {unit} lies {worst:.3g} mm off it): {fix}")


_RESAMPLE = ("resample it onto a regular grid first (3D Slicer: DICOM import with acquisition "
             "geometry regularization, harden the transform, save as NRRD) and give that file")


def _irregularity(headers: list[SliceInfo], unit: str = "slice") -> tuple[str, str]:
    """Name what makes the slice (or frame: ``unit``) positions irregular, with the files or
    frames concerned, and its fix."""
    normal = headers[0].direction[:, 2]
    offsets = np.array([h.origin - headers[0].origin for h in headers])
    depth = offsets @ normal
    order = np.argsort(depth, kind="stable")
    depth, names = depth[order], [Path(headers[i].file).name for i in order]
    steps = np.diff(depth)
    same = np.flatnonzero(np.abs(steps) < 1e-3)
    if same.size:
        k = same[0]
        if unit == "frame":
            return (f"{same.size} pair{'s' if same.size > 1 else ''} of frames share a position "
                    f"(e.g. '{names[k]}' and '{names[k + 1]}'), as when one file holds several "
                    "acquisitions, phases or stacks",
                    "export one acquisition (one frame per position) as a series of its own from "
                    "the scanner or PACS and give that")
        return (f"{same.size} pair{'s' if same.size > 1 else ''} of slices share a position "
                f"(e.g. '{names[k]}' and '{names[k + 1]}'), as when one series holds several "
                "acquisitions, phases or echoes, or a file was copied twice",
                "put one acquisition (one file per position) in a folder of its own and give that")
    shear = offsets - np.outer(offsets @ normal, normal)
    far = np.argmax(np.abs(offsets @ normal))
    tilt = np.degrees(np.arctan2(np.linalg.norm(shear[far]), abs(depth[-1] - depth[0]) or 1.0))
    if tilt > 0.05:
        return (f"the {unit}s are shifted sideways along the stack (gantry tilt or shear of "
                f"{tilt:.1f}°, '{Path(headers[far].file).name}' is "
                f"{np.linalg.norm(shear[far]):.1f} mm off the slice normal)", _RESAMPLE)
    k = int(np.argmax(np.abs(steps - np.median(steps))))
    return (f"the {unit} spacing varies from {steps.min():.3g} to {steps.max():.3g} mm (step of "
            f"{steps[k]:.3g} mm between '{names[k]}' and '{names[k + 1]}'; missing {unit}s or "
            "uneven spacing)", f"give the complete series, or {_RESAMPLE}")
