"""Real-world inputs, round 5: paint beyond the scan's field of view, built here from the real
data in ../shared/data."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from arenaseg.cli import main
from arenaseg.io.geometry import image_like

from conftest import ABDOMEN_SMALL, LIVER, read_ijk

CT = ABDOMEN_SMALL / "ct.nii.gz"


def test_paint_outside_the_field_of_view_is_named_in_a_warning(tmp_path, capsys, small_liver):
    """Paint on a labelmap that reaches past the scan (a segmentation whose geometry was taken
    from a longer series) was dropped without a word: the user believed it had trained."""
    ct = sitk.ReadImage(str(CT))
    paint = np.zeros((*ct.GetSize()[:2], ct.GetSize()[2] + 10), np.uint8)
    paint[:, :, :ct.GetSize()[2]] = small_liver[1]
    paint[40:50, 40:50, ct.GetSize()[2] + 5] = LIVER  # 100 voxels 5 slices past the last one
    grid = sitk.Image(paint.shape, sitk.sitkUInt8)
    for setter, getter in ((grid.SetOrigin, ct.GetOrigin), (grid.SetSpacing, ct.GetSpacing),
                           (grid.SetDirection, ct.GetDirection)):
        setter(getter())
    sitk.WriteImage(image_like(paint, grid), str(tmp_path / "longer.nii.gz"))
    out = tmp_path / "seg.nii.gz"
    assert main(["adapt", "--image", str(CT), "--annotations", str(tmp_path / "longer.nii.gz"),
                 "--label", str(LIVER), "--out", str(out), "--steps", "2"]) == 0
    err = capsys.readouterr().err
    painted = int((paint == LIVER).sum())
    assert f"100 of {painted} voxels painted with {LIVER}" in err
    assert "outside the image's field of view" in err and "longer.nii.gz" in err
    assert np.array_equal(read_ijk(out)[small_liver[1] == LIVER], np.full(int((small_liver[1] == LIVER).sum()), LIVER))


def test_paint_inside_the_field_of_view_gives_no_such_warning(tmp_path, capsys, small_liver):
    out = tmp_path / "seg.nii.gz"
    assert main(["adapt", "--image", str(CT), "--annotations", str(small_liver[0]),
                 "--label", str(LIVER), "--out", str(out), "--steps", "2"]) == 0
    assert "field of view" not in capsys.readouterr().err


def test_a_coarser_voxel_reaching_into_the_scan_is_not_called_outside(tmp_path):
    """A labelmap voxel twice as thick as the scan's, its centre 0.75 scan voxels before the
    first slice, still covers that slice: its paint is carried over, so no warning."""
    from arenaseg.io.labels import read_labels_on

    ct = sitk.ReadImage(str(CT))
    direction = np.asarray(ct.GetDirection()).reshape(3, 3)
    spacing = np.asarray(ct.GetSpacing())
    labels = sitk.Image([ct.GetSize()[0], ct.GetSize()[1], 4], sitk.sitkUInt8)
    labels.SetSpacing((spacing[0], spacing[1], 2 * spacing[2]))
    labels.SetDirection(ct.GetDirection())
    labels.SetOrigin(tuple(np.asarray(ct.GetOrigin()) - 0.75 * spacing[2] * direction[:, 2]))
    paint = np.zeros(labels.GetSize(), np.uint8)
    paint[40:50, 40:50, 0] = LIVER  # reaches the first slice of the scan
    path = tmp_path / "coarse.nii.gz"
    sitk.WriteImage(image_like(paint, labels), str(path))
    said = []
    on_ct = read_labels_on(ct, path, label=LIVER, warn=said.append)
    assert said == []
    assert (sitk.GetArrayViewFromImage(on_ct)[0] == LIVER).sum() == 100  # carried over
    labels.SetOrigin(tuple(np.asarray(ct.GetOrigin()) - 1.25 * spacing[2] * direction[:, 2]))
    sitk.WriteImage(image_like(paint, labels), str(path))
    read_labels_on(ct, path, label=LIVER, warn=said.append)
    assert len(said) == 1 and said[0].startswith(f"100 of 100 voxels painted with {LIVER}")
