"""Real-world inputs, round 4: faults a fresh tester found (a result thrown away after the whole
run, tracebacks, exit 0 with a false claim or on the wrong structure), each built here from the
real data in ../shared/data. Every check comes before any backbone runs."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from arenaseg.cli import main
from arenaseg.io.checks import MAX_GRID_VOXELS
from arenaseg.io.geometry import array_ijk, index_to_world_matrix

from conftest import ABDOMEN, ABDOMEN_SMALL, LIVER, SPLEEN, refused

CT = ABDOMEN_SMALL / "ct.nii.gz"


def test_a_doubled_nifti_extension_is_refused_before_the_run(tmp_path, capsys, small_liver):
    """ITK's NIfTI writer saves 'liver.nii.gz.nii.gz' as 'liver.nii.gz': the check after writing
    found no file and threw the whole run away, blaming the disk."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name, fixed in (("liver.nii.gz.nii.gz", "liver.nii.gz"), ("liver.nii.nii.gz", "liver.nii.gz"),
                        ("liver.NII.nii", "liver.nii")):
        refused(capsys, ["adapt", "--image", str(CT), "--annotations", str(small_liver[0]),
                         "--label", str(LIVER), "--out", str(out_dir / name), "--steps", "2"],
                out_dir, "doubled extension", f"give --out '{out_dir / fixed}'")
        assert list(out_dir.iterdir()) == []


def test_a_spacing_far_too_large_is_refused_naming_it(tmp_path, capsys, small_liver):
    """50 mm voxels (a header written in cm, or worse): resampling onto the backbone's grid asked
    for 26 GB and ended in a MemoryError traceback."""
    for source, name in ((CT, "ct50.nii.gz"), (small_liver[0], "paint50.nii.gz")):
        image = sitk.ReadImage(str(source))
        image.SetSpacing((50.0, 50.0, 50.0))
        sitk.WriteImage(image, str(tmp_path / name))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    line = refused(capsys, ["adapt", "--image", str(tmp_path / "ct50.nii.gz"), "--annotations",
                            str(tmp_path / "paint50.nii.gz"), "--label", str(LIVER), "--out",
                            str(out_dir / "seg.nii.gz")],
                   out_dir, "ct50.nii.gz", "50 × 50 × 50 mm", "voxel spacing in the image header")
    assert f"more than {MAX_GRID_VOXELS / 1e6:,.0f} million" in line
    assert list(out_dir.iterdir()) == []


def test_demo_refuses_more_slices_than_the_structure_has_and_a_file_as_folder(tmp_path, capsys):
    """--slices 1000 printed "painted 1000 axial slices" (the bladder lies on 28) and a Dice of
    0.000 on slices without the bladder, exit 0; an --out-dir that is a file gave a traceback."""
    demo = ["demo", "--data", str(ABDOMEN), "--steps", "2"]
    out_dir = tmp_path / "demo"
    line = refused(capsys, demo + ["--slices", "1000", "--out-dir", str(out_dir)], tmp_path,
                   "--slices 1000", "lies on 28 axial slices", "at most 27")
    assert not out_dir.exists(), line
    (tmp_path / "file").write_text("mine")
    assert main(demo + ["--out-dir", str(tmp_path / "file")]) == 2
    assert "is a file: give a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"
    assert main(demo + ["--label", "999", "--out-dir", str(out_dir)]) == 2
    assert "--label 999 is absent" in capsys.readouterr().err and not out_dir.exists()


def test_a_number_that_is_also_a_segment_name_is_refused(tmp_path, capsys, small_liver):
    """A .seg.nrrd with the liver in a segment named "2" (value 1) and the spleen as value 2:
    --label 2 trained on the spleen without a word."""
    import slicerio

    ann = sitk.ReadImage(str(small_liver[0]))
    paint, ref = array_ijk(ann) == LIVER, small_liver[2]
    spleen = (ref == SPLEEN) & np.any(paint, axis=(0, 1))[None, None, :]
    voxels = np.zeros(paint.shape, np.uint8)
    voxels[paint], voxels[spleen] = 1, 2
    path = tmp_path / "numbered.seg.nrrd"
    slicerio.write_segmentation(str(path), {"voxels": voxels, "ijkToLPS": index_to_world_matrix(ann),
                                            "segments": [{"id": "a", "name": "2", "labelValue": 1, "layer": 0},
                                                         {"id": "b", "name": "spleen", "labelValue": 2, "layer": 0}]})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    refused(capsys, ["adapt", "--image", str(CT), "--annotations", str(path), "--label", "2",
                     "--out", str(out_dir / "seg.nii.gz"), "--steps", "2"],
            out_dir, "--label 2 is ambiguous", "name of '2' (1)", "give --label 1", "'spleen' (2) give its name")
    assert main(["adapt", "--image", str(CT), "--annotations", str(path), "--label", "1",
                 "--out", str(out_dir / "seg.nii.gz"), "--steps", "2"]) == 0
