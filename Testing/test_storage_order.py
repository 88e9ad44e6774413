"""The same scan stored differently (RAS NIfTI, LPS NRRD, a copy flipped along a voxel axis)
gives the same segmentation in world space and the same discovered rank at a fixed seed."""

import numpy as np
import pytest
import SimpleITK as sitk

from arenaseg import pipeline
from arenaseg.io.geometry import array_ijk, resample_to
from arenaseg.training import AdaptSettings

from conftest import ABDOMEN_SMALL, LIVER

SETTINGS = AdaptSettings(steps=6, seed=3)


def _stored(kind: str, tmp_path) -> tuple[str, str]:
    """CT and painted liver slices (3 axial slices from the reference) stored as ``kind``."""
    ct = sitk.ReadImage(str(ABDOMEN_SMALL / "ct.nii.gz"))
    labels = sitk.ReadImage(str(ABDOMEN_SMALL / "labels.nii.gz"))
    ref = array_ijk(labels)
    paint = np.zeros(ref.shape, np.uint8)
    for k in (8, 15, 22):
        paint[:, :, k] = (ref[:, :, k] == LIVER) * LIVER
    painted = sitk.GetImageFromArray(np.ascontiguousarray(paint.transpose(2, 1, 0)))
    painted.CopyInformation(labels)
    if kind == "lps":
        ct, painted, suffix = sitk.DICOMOrient(ct, "LPS"), sitk.DICOMOrient(painted, "LPS"), ".nrrd"
    elif kind == "flipped":
        ct, painted, suffix = sitk.Flip(ct, (False, True, True)), sitk.Flip(painted, (False, True, True)), ".nii.gz"
    else:
        suffix = ".nii.gz"
    paths = (tmp_path / f"ct_{kind}{suffix}", tmp_path / f"painted_{kind}{suffix}")
    sitk.WriteImage(ct, str(paths[0]))
    sitk.WriteImage(painted, str(paths[1]))
    return str(paths[0]), str(paths[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stored")
    results = {}
    for kind in ("ras", "lps", "flipped"):
        image, ann = _stored(kind, tmp)
        results[kind] = (pipeline.adapt(image, ann, LIVER, str(tmp / f"seg_{kind}.nii.gz"),
                                        settings=SETTINGS), image)
    return results


@pytest.mark.parametrize("kind", ["lps", "flipped"])
def test_same_result_in_world_space_whatever_the_storage(runs, kind):
    reference, _ = runs["ras"]
    result, image = runs[kind]
    assert result.ranks == reference.ranks
    assert result.loss == reference.loss
    # Compare on the RAS grid: the other result moved there in world space (exact voxel centres).
    ras = sitk.ReadImage(reference.segmentation)
    moved = resample_to(sitk.ReadImage(result.segmentation), ras)
    assert np.array_equal(array_ijk(moved), array_ijk(ras))
    assert sitk.ReadImage(result.segmentation).GetSize() == sitk.ReadImage(image).GetSize()
