"""Geometry is sacred: every output lies exactly on its input image's grid (size, spacing,
origin, direction), for a RAS NIfTI, a DICOM series whose labels are stored flipped, an LPS copy,
an anisotropic-spacing copy and an oblique copy made here."""

import numpy as np
import pytest
import SimpleITK as sitk

from arenaseg import pipeline
from arenaseg.io.annotations import dice
from arenaseg.io.geometry import array_ijk, same_grid
from arenaseg.io.images import read_image
from arenaseg.training import AdaptSettings

from conftest import ABDOMEN_SMALL, DICOM, LIVER, painted, read_ijk

QUICK = AdaptSettings(steps=8)


def assert_on_grid(output_path, image: sitk.Image):
    out = sitk.ReadImage(str(output_path))
    assert out.GetSize() == image.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(out.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(out.GetDirection(), image.GetDirection(), atol=1e-6)


@pytest.fixture(scope="module")
def ras_run(small_liver, tmp_path_factory):
    """Adapt once on the RAS NIfTI (small abdomen CT, painted liver slices)."""
    ann, paint, ref = small_liver
    out = tmp_path_factory.mktemp("ras")
    result = pipeline.adapt(str(ABDOMEN_SMALL / "ct.nii.gz"), str(ann), LIVER,
                            str(out / "seg.nii.gz"), str(out / "liver.safetensors"),
                            settings=QUICK)
    return result, paint


def test_ras_nifti_output_on_input_grid_and_painted_voxels_kept(ras_run):
    result, paint = ras_run
    image = read_image(ABDOMEN_SMALL / "ct.nii.gz")
    assert_on_grid(result.segmentation, image)
    seg = read_ijk(result.segmentation)
    assert np.all(seg[paint == LIVER] == LIVER)
    assert set(np.unique(seg)) <= {0, LIVER}


def _copy(image: sitk.Image, kind: str) -> sitk.Image:
    if kind == "lps":
        return sitk.DICOMOrient(image, "LPS")
    if kind == "anisotropic":
        spacing = (2.0, 2.5, 4.0)
    else:  # oblique: 12 degrees about the cranio-caudal axis
        spacing = image.GetSpacing()
    size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    ref = sitk.Image(size, image.GetPixelID())
    ref.SetSpacing(spacing)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if kind == "oblique":
        a = np.deg2rad(12)
        rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        direction = rot @ direction
    ref.SetDirection(direction.flatten().tolist())
    ref.SetOrigin(image.GetOrigin())
    return sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, -1024.0)


@pytest.mark.parametrize("kind", ["lps", "anisotropic", "oblique"])
def test_saved_adapter_on_reoriented_copies_lands_on_their_grids(ras_run, tmp_path, kind):
    result, _ = ras_run
    original = read_image(ABDOMEN_SMALL / "ct.nii.gz")
    copy = _copy(original, kind)
    assert not same_grid(copy, original)
    sitk.WriteImage(copy, str(tmp_path / "ct.nrrd"))
    out = tmp_path / "seg.nrrd"
    pipeline.segment(str(tmp_path / "ct.nrrd"), result.adapter, str(out))
    assert_on_grid(out, copy)
    # Same anatomy, same answer: compare in world space on the original grid.
    back = sitk.Resample(sitk.ReadImage(str(out)), original, sitk.Transform(),
                         sitk.sitkNearestNeighbor, 0)
    ours = read_ijk(result.segmentation) > 0
    theirs = array_ijk(back) > 0
    inside = array_ijk(sitk.Resample(sitk.Image(copy.GetSize(), sitk.sitkUInt8) + 1, original,
                                     sitk.Transform(), sitk.sitkNearestNeighbor, 0)) > 0
    assert dice(theirs, ours, inside) > (0.99 if kind == "lps" else 0.8)


def test_lps_image_with_ras_annotations_on_another_grid(small_liver, tmp_path):
    ann, paint, _ = small_liver
    lps = _copy(read_image(ABDOMEN_SMALL / "ct.nii.gz"), "lps")
    sitk.WriteImage(lps, str(tmp_path / "ct_lps.nii.gz"))
    result = pipeline.adapt(str(tmp_path / "ct_lps.nii.gz"), str(ann), LIVER,
                            str(tmp_path / "seg.nii.gz"), settings=AdaptSettings(steps=2))
    assert_on_grid(result.segmentation, lps)
    painted_on_lps = array_ijk(sitk.DICOMOrient(sitk.ReadImage(str(ann)), "LPS")) == LIVER
    assert np.all(read_ijk(result.segmentation)[painted_on_lps] == LIVER)


def test_dicom_series_with_labels_stored_flipped(tmp_path):
    ann, paint, ref = painted(DICOM / "labels.nii.gz", LIVER, out=tmp_path / "painted.nii.gz")
    image = read_image(DICOM / "dicom")
    result = pipeline.adapt(str(DICOM / "dicom"), str(ann), LIVER, str(tmp_path / "seg.nii.gz"),
                            settings=AdaptSettings(steps=2))
    assert_on_grid(result.segmentation, image)
    seg = read_ijk(result.segmentation) == LIVER
    # The painted slices must come back where they are in the world, i.e. flipped in y
    # relative to the label file's voxel order, not copied voxel for voxel.
    in_world = array_ijk(sitk.Resample(sitk.ReadImage(str(ann)), image, sitk.Transform(),
                                       sitk.sitkNearestNeighbor, 0)) == LIVER
    assert not np.array_equal(in_world, paint == LIVER)
    assert np.all(seg[in_world])
    assert np.array_equal(in_world, paint[:, ::-1, :] == LIVER)
