"""Whether an input is sound, before any work: a regular grid, CT numbers (HU), finite voxels, a
complete NIfTI, thick enough for the network, paint that lies on the image.

Every refusal is an :class:`~arenaseg.errors.ArenaError` naming the file, what was seen and the
fix; every warning is one line passed to a ``warn(message)`` callback (the pipeline turns it
into a ``warning:`` status line). DICOM series have their own checks in :mod:`.dicom`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from ..errors import ArenaError
from .geometry import ras_affine


WarnFn = Callable[[str], None]


#: HU given to non-finite voxels before the network sees them: air, i.e. outside the body.
AIR_HU = -1000.0


#: Minimum and comfortable thickness, in voxels of the backbone's canonical grid, along every
#: axis. The small UNet downsamples 4 times (by 16): thinner than 16 voxels its deepest layers see
#: mostly the zero padding of the sliding window; thinner than 8, only padding at the two deepest.
MIN_VOXELS, THIN_VOXELS = 8, 16
#: Most voxels of the backbone's canonical grid a scan may cover: 2^28 (1 GiB as float32) is
#: 768 × 768 × 1,536 mm on Merlin's grid, beyond any body; past it the header's spacing is wrong.
MAX_GRID_VOXELS = 2 ** 28


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


def check_nifti_transforms(image: sitk.Image, path, what: str = "image", warn: WarnFn | None = None) -> None:
    """Warn when a NIfTI's qform and sform both place the image and disagree by more than a
    voxel, naming the one ``image`` was read with (ITK's rule, found by comparing each with
    ``image``'s geometry). Every file we write has both set to that geometry.

    Raises nothing: a file nibabel cannot parse was already refused by the reader."""
    if not str(path).lower().endswith((".nii", ".nii.gz")) or image.GetDimension() != 3:
        return
    import nibabel as nib

    header = nib.load(str(path)).header
    q_code, s_code = int(header["qform_code"]), int(header["sform_code"])
    if not (q_code and s_code):
        return
    corners = np.array([[i, j, k, 1.0] for i in (0, image.GetSize()[0] - 1)
                        for j in (0, image.GetSize()[1] - 1) for k in (0, image.GetSize()[2] - 1)]).T
    placed = {name: (affine @ corners)[:3] for name, affine in
              (("qform", header.get_qform()), ("sform", header.get_sform()), ("read", ras_affine(image)))}
    apart = float(np.abs(placed["qform"] - placed["sform"]).max())
    if apart <= min(image.GetSpacing()):
        return
    used = min(("qform", "sform"), key=lambda name: np.abs(placed[name] - placed["read"]).max())
    other = "sform" if used == "qform" else "qform"
    (warn or _log_warning)(
        f"{what} '{path}': its qform (code {q_code}) and sform (code {s_code}) disagree by up to "
        f"{apart:.1f} mm, more than a voxel; read with the {used}, as ITK does, and every output "
        f"follows it (both set alike): if the {other} is the right one, fix the header (e.g. "
        "nibabel's set_qform/set_sform, or fslorient) and run again")


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


#: Offsets at which scanners store CT values (HU = stored − offset; RescaleIntercept = −offset).
STORED_OFFSETS = (1024, 2048, 3072)


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
            # air (-1000 HU) is among the lowest values of a body CT: its reading gives the offset
            offset = next((o for o in STORED_OFFSETS if abs(low + 1000 - o) < 150),
                          int(round(low + 1000, -1)))
            raise ArenaError(
                f"image '{path}' looks like HU + {offset} stored without its rescale intercept "
                f"({seen}; a CT in HU has air near -1000 and soft tissue near 0-100): for DICOM, "
                "convert the series again keeping its RescaleIntercept (0028,1052), or subtract "
                f"the intercept, e.g. sitk.WriteImage(sitk.Cast(sitk.ReadImage(path), "
                f"sitk.sitkInt16) - {offset}, 'ct_hu.nii.gz'), if {offset} is the scanner's")
        raise ArenaError(
            f"image '{path}' is not a CT in Hounsfield units ({seen}; a CT has air near -1000 "
            "and fat near -100): give the original CT in HU, not a normalised, 8-bit or MR "
            "image; a crop entirely inside soft tissue must be cropped larger, to include fat or air")


def check_extent(image: sitk.Image, path, prep, backbone: str, warn: WarnFn | None = None) -> None:
    """Refuse an image thinner than :data:`MIN_VOXELS` voxels of the backbone's grid along any
    axis (e.g. 3 slices), or larger than :data:`MAX_GRID_VOXELS` voxels of it (a wrong spacing in
    the header: resampling it would exhaust the memory); warn below :data:`THIN_VOXELS`."""
    warn = warn or _log_warning
    direction = np.abs(np.array(image.GetDirection()).reshape(3, 3))
    extents = np.array(image.GetSize()) * np.array(image.GetSpacing())
    targets = [float(prep.spacing_mm[int(np.argmax(direction[:, axis]))]) for axis in range(3)]
    voxels = float(np.prod(extents / targets))
    if voxels > MAX_GRID_VOXELS:
        raise ArenaError(
            f"image '{path}' spans {' × '.join(f'{e:.0f}' for e in extents)} mm "
            f"({' × '.join(map(str, image.GetSize()))} voxels of "
            f"{' × '.join(f'{s:g}' for s in image.GetSpacing())} mm): on the {' × '.join(f'{t:g}' for t in targets)} mm "
            f"grid of backbone '{backbone}' that is {voxels / 1e6:,.0f} million voxels, more than "
            f"{MAX_GRID_VOXELS / 1e6:,.0f} million (a body is under 1,000 mm across): check the "
            "voxel spacing in the image header, or crop the image")
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
    from ..backbones import REGISTRY, get_spec, spec_for_file

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
