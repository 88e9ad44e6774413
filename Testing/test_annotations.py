"""Which slices are painted and what they say: axis detection, background voxels, clear errors."""

import numpy as np
import pytest

import SimpleITK as sitk

from arenaseg.io.annotations import dice, doubt, find_annotation, interpolate, paint_slices
from arenaseg.errors import ArenaError
from arenaseg.io.geometry import array_ijk

from conftest import ABDOMEN


def labels_with_sagittal_strokes():
    labels = np.zeros((20, 30, 40), np.uint8)
    labels[5, 10:20, 10:30] = 3      # painted on slice i = 5 ...
    labels[12, 8:22, 12:28] = 3      # ... and i = 12: the structure (3)
    labels[12, 0:3, 0:3] = 7         # another label on a painted slice: background for 3
    labels[17, 0:5, 0:5] = 9         # "known background" strokes on an unpainted slice
    return labels


def test_axis_detected_and_other_voxels_of_painted_slices_are_background():
    ann = find_annotation(labels_with_sagittal_strokes(), 3)
    assert ann.axis == 0 and ann.slices == (5, 12)
    points, targets = ann.points()
    assert len(points) == 2 * 30 * 40
    assert targets.sum() == 10 * 20 + 14 * 16
    assert set(np.unique(points[:, 0])) == {5, 12}


def test_background_label_adds_known_negatives_on_any_slice():
    ann = find_annotation(labels_with_sagittal_strokes(), 3, background=9)
    points, targets = ann.points()
    assert len(points) == 2 * 30 * 40 + 25
    assert targets[points[:, 0] == 17].sum() == 0 and (points[:, 0] == 17).sum() == 25
    with pytest.raises(ArenaError, match="equals the structure's label"):
        find_annotation(labels_with_sagittal_strokes(), 3, background=3)


def test_explicit_axis_and_clear_errors():
    labels = labels_with_sagittal_strokes()
    assert find_annotation(labels, 3, axis=0).slices == (5, 12)
    # an axis the paint is not on: each of the 20 k-slices it touches would count as painted
    with pytest.raises(ArenaError, match=r"--slice-axis 2: .* 2 slices across voxel axis i .* give --slice-axis 0"):
        find_annotation(labels, 3, axis=2)
    with pytest.raises(ArenaError, match=r"label value 4 is absent .* \(values present: 3, 7, 9\)"):
        find_annotation(labels, 4, source="painted.nrrd")
    with pytest.raises(ArenaError, match="no annotated slice"):
        find_annotation(np.zeros((4, 4, 4), np.uint8), 1)


def test_paint_slices_spreads_k_slices_inside_the_structure():
    reference = np.zeros((10, 10, 50), np.uint8)
    reference[2:8, 2:8, 10:41] = 5
    painted = paint_slices(reference, 5, k=3, axis=2)
    assert np.flatnonzero(painted.any(axis=(0, 1))).tolist() == [17, 25, 32]
    assert np.array_equal(painted[..., 25], reference[..., 25])
    assert dice(painted > 0, reference > 0, painted.any(axis=(0, 1))[None, None, :].repeat(10, 0).repeat(10, 1)) == 1.0


def test_paint_in_two_views_is_refused_and_paint_in_one_view_is_not():
    ref = array_ijk(sitk.ReadImage(str(ABDOMEN / "labels.nii.gz")))
    for value in (5, 21, 63, 88):  # liver, bladder, IVC, iliopsoas: any view, any k
        for k in (1, 3, 8):
            for axis in (0, 1, 2):
                assert find_annotation(paint_slices(ref, value, k, axis), value).axis == axis
    mixed = paint_slices(ref, 5, 1, axis=2)  # one axial slice of the liver ...
    i = int(np.flatnonzero((ref == 5).any(axis=(1, 2))).mean())
    mixed[i] = np.where(ref[i] == 5, 5, mixed[i])  # ... and one sagittal slice through it
    with pytest.raises(ArenaError, match="paint in two views.*slice 70 across axis i.*one view"):
        find_annotation(mixed, 5, source="mixed.nii.gz")


def test_next_slice_is_the_least_sure_unpainted_one():
    target = np.zeros((4, 5, 6), bool)
    target[1:3, 1:4, [1, 4]] = True
    annotation = find_annotation(target.astype(np.uint8), 1, axis=2)
    probability = np.zeros((4, 5, 6))
    probability[1:3, 1:4, 2] = 0.5   # unsure
    probability[1:3, 1:4, 3] = 0.9   # fairly sure
    probability[:, :, 1] = 0.5       # painted: known, never suggested
    assert annotation.next_slice(doubt(probability)) == 2
    assert annotation.next_slice(doubt(np.round(probability))) is None  # sure everywhere


def test_next_slice_ignores_doubt_far_from_the_result():
    """Doubt in a look-alike across the scan is removed with it: it must not send the user to a
    slice without the structure."""
    target = np.zeros((8, 5, 6), bool)
    target[1:3, 1:4, [1, 4]] = True
    annotation = find_annotation(target.astype(np.uint8), 1, axis=2)
    probability = np.zeros((8, 5, 6))
    probability[1:3, 1:4, 2] = 0.7   # a little unsure, next to the result
    probability[5:8, :, 5] = 0.5     # very unsure, far away
    near = np.zeros(target.shape, bool)
    near[0:4] = True
    assert annotation.next_slice(doubt(probability)) == 5
    assert annotation.next_slice(doubt(probability), near) == 2


def test_interpolation_between_two_discs_grows_the_radius_linearly_and_weights_by_distance():
    # Discs of radius 6 and 14 mm (1 mm pixels) painted across axis 1 on slices 2 and 10 (4 mm
    # apart), background painted on slice 6 left: no pseudo-label there, none beyond the ends.
    labels = np.zeros((60, 14, 60), np.uint8)
    u, v = np.mgrid[:60, :60]
    r = np.hypot(u - 30, v - 30)
    labels[:, 2, :][r <= 6] = 1
    labels[:, 10, :][r <= 14] = 1
    labels[:5, 6, :5] = 2
    ann = find_annotation(labels, 1, axis=1, background=2)
    spacing = (1.0, 4.0, 1.0)
    points, targets, weights = interpolate(ann, spacing, half_life_mm=4.0, band_mm=6.0)
    assert set(np.unique(points[:, 1])) == set(range(3, 10))  # between the painted slices only
    for t in range(3, 10):
        area = targets[points[:, 1] == t].sum()  # mm²
        assert abs(np.sqrt(area / np.pi) - (6 + (t - 2))) < 0.5  # radius 6 → 14 mm, linearly
    assert np.allclose(weights[points[:, 1] == 3], 0.5)          # one slice (4 mm) from slice 2
    assert np.allclose(weights[points[:, 1] == 6], 0.5 ** 4)     # halfway: 16 mm from both
    kept = points[points[:, 1] == 6]
    assert not ((kept[:, 0] < 5) & (kept[:, 2] < 5)).any()       # painted background stays out
    assert np.hypot(points[:, 0] - 30, points[:, 2] - 30).max() <= 14 + 6 + 1  # the band
    assert len(interpolate(find_annotation(labels[:, :3], 1, axis=1), spacing, 4.0)[0]) == 0
