"""The result is the structure, not "the largest piece": which objects post-processing keeps.

Probability maps are built from the real reference labels of ``abdomen_ct`` (a confident
structure at 0.95, a doubtful look-alike at 0.7), so each rule is checked on real anatomy."""

import numpy as np
import SimpleITK as sitk

from arenaseg.io.geometry import array_ijk, image_like
from arenaseg.io.annotations import Annotation
from arenaseg.postprocessing import select_objects, threshold

from conftest import ABDOMEN, BLADDER

KIDNEY_RIGHT, KIDNEY_LEFT, SPLEEN = 2, 3, 1


def _probability(labels: np.ndarray, confident: list[int], doubtful: list[int], like) -> sitk.Image:
    p = np.full(labels.shape, 0.02, np.float32)
    p[np.isin(labels, confident)] = 0.95
    p[np.isin(labels, doubtful)] = 0.7
    return image_like(p, like)


def _labels():
    image = sitk.ReadImage(str(ABDOMEN / "labels.nii.gz"))
    return array_ijk(image), image


def test_every_confident_object_is_kept_and_doubtful_ones_are_removed():
    labels, image = _labels()
    both = np.isin(labels, [KIDNEY_RIGHT, KIDNEY_LEFT])
    p = _probability(labels, [KIDNEY_RIGHT, KIDNEY_LEFT], [SPLEEN], image)
    objects = select_objects(*threshold(p), label=7)
    result = array_ijk(objects.image)
    assert objects.kept == 2  # both kidneys, not the larger one only
    assert np.array_equal(result == 7, both)
    assert set(np.unique(result)) == {0, 7}
    voxel_ml = np.prod(image.GetSpacing()) / 1000
    assert objects.kept_ml == both.sum() * voxel_ml
    assert objects.removed == 1 and objects.removed_ml == (labels == SPLEEN).sum() * voxel_ml
    assert objects.image.GetSize() == image.GetSize()
    assert objects.image.GetDirection() == image.GetDirection()


def test_an_absent_structure_gives_an_empty_result():
    labels, image = _labels()
    objects = select_objects(*threshold(_probability(labels, [], [SPLEEN, BLADDER], image)))
    assert objects.kept == 0 and objects.kept_ml == 0
    assert not array_ijk(objects.image).any()
    assert objects.removed == 2


def test_with_paint_only_objects_touching_it_are_kept_and_the_rest_is_reported():
    labels, image = _labels()
    p = _probability(labels, [KIDNEY_RIGHT, KIDNEY_LEFT, SPLEEN], [], image)
    right = labels == KIDNEY_RIGHT
    k = int(np.flatnonzero(right.any(axis=(0, 1))).mean())
    known = np.zeros(labels.shape, bool)
    known[:, :, k] = True
    paint = Annotation(axis=2, slices=(k,), target=right & known)
    objects = select_objects(*threshold(p, paint), 1, paint.target)
    result = array_ijk(objects.image).astype(bool)
    # the painted slice is the user's answer: the left kidney there is background
    assert not result[:, :, k][labels[:, :, k] == KIDNEY_LEFT].any()
    assert result[right].all() and not result[labels == SPLEEN].any()
    assert objects.kept >= 1 and objects.removed >= 2
    assert objects.removed_ml > (labels == SPLEEN).sum() * np.prod(image.GetSpacing()) / 1000 * 0.99


def test_voxels_outside_the_scan_are_never_predicted():
    labels, image = _labels()
    liver = labels == 5
    outside = np.zeros(labels.shape, bool)
    k = int(np.flatnonzero(liver.any(axis=(0, 1))).mean())
    outside[:, :, k - 1:k + 2] = True  # a NaN slab through the liver
    objects = select_objects(*threshold(_probability(labels, [5], [], image), outside=outside), 5)
    result = array_ijk(objects.image)
    assert not result[outside].any()
    above, below = liver.copy(), liver.copy()
    above[:, :, :k + 2], below[:, :, k - 1:] = False, False
    assert result[above].mean() > 0.99 and result[below].mean() > 0.99  # both halves kept


# End to end, as a user runs it: both kidneys painted as one structure on 3 axial slices.

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from arenaseg.adapter_file import read_adapter  # noqa: E402
from arenaseg.io.annotations import paint_slices


def _arenaseg(*args):
    return subprocess.run([sys.executable, "-m", "arenaseg", *map(str, args)],
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def kidneys(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kidneys")
    labels, image = _labels()
    both = np.where(np.isin(labels, [KIDNEY_RIGHT, KIDNEY_LEFT]), 7, 0).astype(np.uint8)
    sitk.WriteImage(image_like(paint_slices(both, 7, 3, axis=2), image), str(tmp / "painted.nii.gz"))
    run = _arenaseg("adapt", "--image", ABDOMEN / "ct.nii.gz", "--annotations", tmp / "painted.nii.gz",
                    "--label", 7, "--steps", 60, "--out", tmp / "adapt.nii.gz",
                    "--adapter-out", tmp / "kidneys.safetensors")
    assert run.returncode == 0, run.stderr
    return tmp, both, run


def test_adapt_reports_what_it_removed_and_records_the_structure(kidneys):
    tmp, both, run = kidneys
    assert "connected to the paint; removed" in run.stdout
    _, meta = read_adapter(tmp / "kidneys.safetensors")
    assert meta["objects"] == 2  # two kidneys, painted as one structure
    assert set(meta["profile"]) >= {"kidney_right", "kidney_left"}  # the frozen backbone's reading


def test_segment_keeps_both_kidneys(kidneys):
    tmp, both, _ = kidneys
    run = _arenaseg("segment", "--image", ABDOMEN / "ct.nii.gz", "--adapter",
                    tmp / "kidneys.safetensors", "--out", tmp / "segment.nii.gz")
    assert run.returncode == 0, run.stderr
    assert "result: 2 objects" in run.stdout
    result = array_ijk(sitk.ReadImage(str(tmp / "segment.nii.gz"))) == 7
    for kidney in (KIDNEY_RIGHT, KIDNEY_LEFT):  # each kidney mostly found, not only the larger
        _, labels_image = _labels()
        assert result[array_ijk(labels_image) == kidney].mean() > 0.6


def test_segment_of_a_scan_without_the_structure_is_empty_and_says_so(kidneys):
    tmp, _, _ = kidneys
    pelvis = sitk.ReadImage(str(ABDOMEN / "ct.nii.gz"))[:, :, :45]  # kidneys start at slice 66
    sitk.WriteImage(pelvis, str(tmp / "pelvis.nii.gz"))
    run = _arenaseg("segment", "--image", tmp / "pelvis.nii.gz", "--adapter",
                    tmp / "kidneys.safetensors", "--out", tmp / "pelvis_seg.nii.gz")
    assert run.returncode == 0, run.stderr
    assert "no confident object: the structure seems absent" in run.stdout
    out = sitk.ReadImage(str(tmp / "pelvis_seg.nii.gz"))
    assert out.GetSize() == pelvis.GetSize() and not array_ijk(out).any()


def test_segment_keeps_the_best_read_object_only_when_it_is_read_well_enough():
    """Without paint, objects are kept when half of them is read as the structure; when none is,
    the best-read one is kept from BEST_SHARE on (a thin vessel cut by the field of view), and
    nothing below it (the structure is absent)."""
    from arenaseg.postprocessing import BEST_SHARE, MATCH_SHARE

    mask = np.zeros((24, 24, 24), np.uint8)
    mask[2:12, 2:8, 2:8] = 1     # object a: 10 planes of 36 voxels
    mask[14:24, 14:20, 14:20] = 1  # object b
    image = sitk.GetImageFromArray(mask)
    image.SetSpacing((5.0, 5.0, 5.0))  # 0.125 mL per voxel: both hold a core of 1 mL
    assert (MATCH_SHARE, BEST_SHARE) == (0.5, 0.4)
    for planes_a, planes_b, kept in ((5, 5, 2), (4, 1, 1), (3, 1, 0)):  # planes of 10 read as it
        reads = np.zeros_like(mask)
        reads[2:2 + planes_a, 2:8, 2:8] = 1
        reads[14:14 + planes_b, 14:20, 14:20] = 1
        reads_as = sitk.GetImageFromArray(reads)
        reads_as.CopyInformation(image)
        objects = select_objects(image, image, 1, reads_as=reads_as)
        assert objects.kept == kept, (planes_a, planes_b)
        if kept == 1:  # the best-read one
            assert sitk.GetArrayViewFromImage(objects.image)[4, 4, 4] == 1
