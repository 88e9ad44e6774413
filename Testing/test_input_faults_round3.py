"""Real-world inputs, round 3: faults a tester found by trying to break the command line (exit 0
with a wrong result, an input file destroyed, tracebacks), each built here from the real data in
../shared/data and run on the embedded backbone (the checks come before any backbone runs)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import SimpleITK as sitk

from arenaseg.backbones import EMBEDDED_BACKBONE, get_spec
from arenaseg.backbones.loading import weights_path
from arenaseg.cli import main

from conftest import ABDOMEN_SMALL, LIVER, refused

CT = ABDOMEN_SMALL / "ct.nii.gz"


def adapt_argv(annotations, out_dir, *extra) -> list[str]:
    return ["adapt", "--image", str(CT), "--annotations", str(annotations), "--label", str(LIVER),
            "--out", str(out_dir / "seg.nii.gz"), "--steps", "2", "--device", "cpu", *extra]


def test_paint_on_slices_across_the_image_grid_is_refused(tmp_path, capsys, small_liver):
    """Axial paint resampled onto a grid tilted 25 degrees about the i axis: each painted slice cut
    through dozens of the image's slices, read as painted (exit 0, "40 painted slices", Dice
    0.20). A grid turned within the slice plane keeps its slices and still works."""
    labels = sitk.ReadImage(str(small_liver[0]))
    centre = labels.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in labels.GetSize()])
    for name, axis, degrees, works in (("tilted", (1, 0, 0), 25, False), ("turned", (0, 0, 1), 25, True)):
        rotation = sitk.VersorRigid3DTransform()
        rotation.SetCenter(centre)
        rotation.SetRotation(axis, np.radians(degrees))
        direction = np.asarray(rotation.GetMatrix()).reshape(3, 3) @ np.asarray(labels.GetDirection()).reshape(3, 3)
        grid = sitk.Image(labels.GetSize(), labels.GetPixelID())
        grid.SetSpacing(labels.GetSpacing())
        grid.SetDirection(tuple(direction.ravel()))
        origin = np.asarray(rotation.TransformPoint(labels.GetOrigin()))
        grid.SetOrigin(tuple(origin))
        # the paint drawn on the rotated grid: its slices are that grid's slices
        array = sitk.GetArrayFromImage(labels)
        painted = sitk.GetImageFromArray(array)
        painted.CopyInformation(grid)
        path = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(painted, str(path))
        out_dir = tmp_path / name
        out_dir.mkdir()
        if works:
            assert main(adapt_argv(path, out_dir, "--backbone", EMBEDDED_BACKBONE)) == 0
        else:
            refused(capsys, adapt_argv(path, out_dir), out_dir, str(path), "25.0 degrees",
                    "image's own grid")


def test_a_slice_axis_that_is_not_the_paint_s_is_refused(tmp_path, capsys, small_liver):
    """``--slice-axis 0`` with axial paint: every i-slice the paint touches counted as painted,
    the rest of it as background (exit 0, the paint copied out, Dice 0.19)."""
    for axis in ("0", "1"):
        line = refused(capsys, adapt_argv(small_liver[0], tmp_path, "--slice-axis", axis), tmp_path,
                       f"--slice-axis {axis}", "3 slices across voxel axis k", "--slice-axis 2")
        assert line.endswith("give --slice-axis 2, or auto") and str(small_liver[0]) in line
    assert main(adapt_argv(small_liver[0], tmp_path, "--slice-axis", "2")) == 0  # the paint's own axis
    assert (tmp_path / "seg.nii.gz").is_file()


def test_the_adapter_output_never_replaces_the_weights(tmp_path, capsys, small_liver):
    """``--adapter-out`` the same file as ``--weights``: the 9.9 MB checkpoint was replaced by the
    adapter (exit 0), and the next run failed."""
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(weights_path(get_spec(EMBEDDED_BACKBONE)).read_bytes())
    size = weights.stat().st_size
    refused(capsys, adapt_argv(small_liver[0], tmp_path, "--backbone", EMBEDDED_BACKBONE, "--weights",
                               str(weights), "--adapter-out", str(weights)),
            tmp_path, str(weights), "--weights file", "--adapter-out")
    assert weights.stat().st_size == size


def test_a_target_that_is_not_a_regular_expression_is_one_line(tmp_path, capsys, small_liver):
    """``--targets '('``: a traceback (re.error) after the image and the backbone were read."""
    line = refused(capsys, adapt_argv(small_liver[0], tmp_path, "--targets", "("), tmp_path,
                   "--targets", "'('", "not a regular expression")
    assert "Traceback" not in line and "missing )" in line  # the cause, as re names it


def test_stdout_closed_early_is_one_line_without_traceback(tmp_path, small_liver):
    """``arenaseg adapt ... | true``: the outputs were written, then a BrokenPipeError traceback."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = [sys.executable, "-m", "arenaseg", *adapt_argv(small_liver[0], out_dir, "--backbone", EMBEDDED_BACKBONE)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader leaves before the report
    err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert "Traceback" not in err, err[-3000:]
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1].startswith("arenaseg: standard output was closed (broken pipe)")
    assert (out_dir / "seg.nii.gz").is_file()  # the result was complete before the report


def test_a_nearly_whole_label_is_shown_as_it_is(tmp_path, capsys, small_liver):
    """Labels of 4.99999999 (a float labelmap rounded on the way): the message said "holds the
    value 5: a labelmap holds whole numbers", which reads as a contradiction."""
    labels = sitk.Cast(sitk.ReadImage(str(small_liver[0])), sitk.sitkFloat64)
    labels = labels * (4.99999999 / LIVER)
    path = tmp_path / "float.nrrd"
    sitk.WriteImage(labels, str(path))
    line = refused(capsys, adapt_argv(path, tmp_path), tmp_path, str(path), "holds the value 4.99999999")
    assert "holds the value 5:" not in line


def test_a_long_file_name_is_written_and_one_too_long_is_named(tmp_path, capsys, small_liver):
    """A 250-character --out name was refused as "cannot be written … choose another folder"
    (the staging name added to it passed the file system's 255 bytes), and a 260-character one
    ended in an OSError traceback. The first is written; the second is refused naming its length,
    the limit and the fix."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    fits = "s" * 243 + ".nii.gz"
    argv = adapt_argv(small_liver[0], out_dir)
    argv[argv.index("--out") + 1] = str(out_dir / fits)
    assert main(argv) == 0
    assert [p.name for p in out_dir.iterdir()] == [fits]
    (out_dir / fits).unlink()
    for too_long in (out_dir / ("s" * 253 + ".nii.gz"), out_dir / ("d" * 300) / "seg.nii.gz"):
        argv[argv.index("--out") + 1] = str(too_long)
        refused(capsys, argv, out_dir, "--out", "bytes long", "allows 255", "shorter name")


def test_a_stray_click_and_a_slice_painted_whole_are_refused(tmp_path, capsys, small_liver):
    """One painted voxel trained into a one-voxel result (exit 0); a slice painted in every voxel
    left no background on it. Both are refused before any training, naming the slice."""
    labels = sitk.ReadImage(str(small_liver[0]))
    array = sitk.GetArrayFromImage(labels)  # (K, J, I)
    k = int(np.flatnonzero((array == LIVER).any(axis=(1, 2)))[0])
    stray = np.zeros_like(array)
    stray[k, array.shape[1] // 2, array.shape[2] // 2] = LIVER
    whole = array.copy()
    whole[k] = LIVER
    for name, painted, words in (("stray", stray, ("covers only 1 voxel", f", {k})", "stray click")),
                                 ("whole", whole, (f"every voxel of slice {k}", "background"))):
        image = sitk.GetImageFromArray(painted)
        image.CopyInformation(labels)
        path = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(image, str(path))
        out_dir = tmp_path / name
        out_dir.mkdir()
        line = refused(capsys, adapt_argv(path, out_dir), out_dir, f"{name}.nii.gz", *words)
        assert "ArenaError" not in line and list(out_dir.iterdir()) == []
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), painted)  # untouched
