"""The command line: a happy path, and every bad input gives exit status 2, one clear line and
no output file."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
import SimpleITK as sitk
import torch

from arenaseg.adapter_file import read_adapter
from arenaseg.cli import main

from conftest import ABDOMEN_SMALL

CT = str(ABDOMEN_SMALL / "ct.nii.gz")


@pytest.fixture(scope="module")
def adapter(small_liver, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    rc = main(["adapt", "--image", CT, "--annotations", str(small_liver[0]), "--label", "5",
               "--out", str(out / "seg.nii.gz"), "--adapter-out", str(out / "a.safetensors"),
               "--steps", "3", "--structure", "liver"])
    assert rc == 0
    return out / "a.safetensors"


def test_adapt_and_segment_print_ranks_and_write_files(adapter, small_liver, tmp_path, capsys):
    assert adapter.is_file() and (adapter.parent / "seg.nii.gz").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(adapter).st_mode) == 0o666 & ~umask  # readable like any file
    assert main(["segment", "--image", CT, "--adapter", str(adapter),
                 "--out", str(tmp_path / "seg.mha")]) == 0
    printed = capsys.readouterr().out
    assert "effective rank" in printed and (tmp_path / "seg.mha").is_file()


def test_suggest_names_an_unpainted_slice_to_paint_next(small_liver, tmp_path, capsys):
    assert main(["adapt", "--image", CT, "--annotations", str(small_liver[0]), "--label", "5",
                 "--out", str(tmp_path / "seg.nii.gz"), "--steps", "2", "--suggest"]) == 0
    printed = capsys.readouterr().out
    painted = re.search(r"axis k: ([\d, ]+)", printed).group(1)
    suggested = re.search(r"paint slice (\d+) \(voxel axis k\) next", printed)
    assert suggested and suggested.group(1) not in painted.split(", ")


def test_adapt_says_which_painted_slices_it_learned_from(small_liver, tmp_path, capsys):
    ann, paint, _ = small_liver
    assert main(_adapt(CT, ann, 5, tmp_path / "seg.nii.gz", "--steps", "1")) == 0
    slices = [k for k in range(paint.shape[2]) if (paint[:, :, k] == 5).any()]
    assert len(slices) == 3
    assert (f"learned from 3 painted slices across voxel axis k: {', '.join(map(str, slices))}"
            in capsys.readouterr().out)


def assert_refused(capsys, argv, *words, out=None):
    rc = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    # Phase lines ("arenaseg: reading ...") may come first; the error is one line, the last.
    assert all(line.startswith("arenaseg: ") for line in lines)
    assert [line for line in lines if line.startswith("arenaseg: error:")] == lines[-1:]
    err = lines[-1]
    for word in words:
        assert word in err
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith("." + out.name)]
    return err


def _adapt(image, ann, label, out, *extra):
    return ["adapt", "--image", str(image), "--annotations", str(ann), "--label", str(label),
            "--out", str(out), *extra]


def test_missing_image(capsys, small_liver, tmp_path):
    out = tmp_path / "seg.nii.gz"
    assert_refused(capsys, _adapt(tmp_path / "nope.nii.gz", small_liver[0], 5, out), "nope.nii.gz",
           "does not exist", out=out)


def test_unreadable_image(capsys, small_liver, tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not an image at all" * 100)
    out = tmp_path / "seg.nii.gz"
    assert_refused(capsys, _adapt(bad, small_liver[0], 5, out), "broken.nii.gz", "cannot be read", out=out)


def test_2d_image(capsys, small_liver, tmp_path):
    flat = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.Image(64, 64, sitk.sitkInt16), str(flat))
    out = tmp_path / "seg.nii.gz"
    assert_refused(capsys, _adapt(flat, small_liver[0], 5, out), "slice.nii.gz", "2D", out=out)


def test_annotations_elsewhere_in_the_world(capsys, small_liver, tmp_path):
    moved = sitk.ReadImage(str(small_liver[0]))
    moved.SetOrigin([o + 5000.0 for o in moved.GetOrigin()])
    sitk.WriteImage(moved, str(tmp_path / "moved.nii.gz"))
    out = tmp_path / "seg.nii.gz"
    assert_refused(capsys, _adapt(CT, tmp_path / "moved.nii.gz", 5, out), "moved.nii.gz",
           "do not overlap", out=out)


def test_the_ct_given_as_annotations(capsys, tmp_path):
    out = tmp_path / "seg.nii.gz"
    assert_refused(capsys, _adapt(CT, CT, 5, out), "ct.nii.gz", "holds the value -", "labelmap",
                   out=out)


def test_fractional_annotations(capsys, small_liver, tmp_path):
    blurred = sitk.Cast(sitk.ReadImage(str(small_liver[0])), sitk.sitkFloat32) * 0.5
    sitk.WriteImage(blurred, str(tmp_path / "blurred.nii.gz"))
    out = tmp_path / "seg.nii.gz"
    assert_refused(capsys, _adapt(CT, tmp_path / "blurred.nii.gz", 5, out), "blurred.nii.gz",
                   "holds the value 2.5", "whole numbers", out=out)


def test_label_value_absent(capsys, small_liver, tmp_path):
    out = tmp_path / "seg.nii.gz"
    err = assert_refused(capsys, _adapt(CT, small_liver[0], 99, out), "99", "absent", out=out)
    assert "values present: 5" in err


def test_no_annotated_slice(capsys, small_liver, tmp_path):
    empty = sitk.ReadImage(str(small_liver[0])) * 0
    sitk.WriteImage(empty, str(tmp_path / "empty.nii.gz"))
    out = tmp_path / "seg.nii.gz"
    assert_refused(capsys, _adapt(CT, tmp_path / "empty.nii.gz", 5, out), "empty.nii.gz",
           "no annotated slice", out=out)


def test_output_never_replaces_the_painted_annotations(capsys, small_liver, tmp_path):
    ann = tmp_path / "painted.nii.gz"
    shutil.copy(small_liver[0], ann)
    before = ann.read_bytes()
    assert_refused(capsys, _adapt(CT, ann, 5, ann), "painted.nii.gz", "replace your input")
    assert ann.read_bytes() == before


@pytest.mark.parametrize("argv_tail, words", [
    (["--label", "0"], ["--label 0", "background"]),
    (["--label", "5", "--background-label", "9"], ["background label 9 is absent"]),
])
def test_label_values_that_cannot_be_the_structure(capsys, small_liver, tmp_path, argv_tail, words):
    out = tmp_path / "seg.nii.gz"
    argv = ["adapt", "--image", CT, "--annotations", str(small_liver[0]), "--out", str(out)]
    assert_refused(capsys, argv + argv_tail, *words, out=out)


def test_corrupt_adapter(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    out = tmp_path / "seg.nii.gz"
    assert_refused(capsys, ["segment", "--image", CT, "--adapter", str(bad), "--out", str(out)],
           "bad.safetensors", "corrupt", out=out)


@pytest.mark.parametrize("change", [{"backbone": "swinunetr"}, {"backbone_checksum": "0" * 64}])
def test_adapter_for_another_backbone(capsys, adapter, tmp_path, change):
    from safetensors.torch import save_file

    tensors, meta = read_adapter(adapter)
    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other), metadata={"arenaseg": json.dumps(dict(meta, **change))})
    out = tmp_path / "seg.nii.gz"
    assert_refused(capsys, ["segment", "--image", CT, "--adapter", str(other), "--out", str(out)],
           "other.safetensors", "was made for", out=out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(capsys, small_liver, tmp_path):
    out = tmp_path / "seg.nii.gz"
    assert_refused(capsys, _adapt(CT, small_liver[0], 5, out, "--device", "cuda"), "cuda",
           "--device cpu", out=out)


def test_console_script_exit_status(small_liver, tmp_path):
    exe = shutil.which("arenaseg") or sys.executable
    cmd = [exe] if exe.endswith("arenaseg") else [exe, "-m", "arenaseg"]
    run = subprocess.run(cmd + _adapt(CT, small_liver[0], 42, tmp_path / "s.nii.gz"),
                         capture_output=True, text=True)
    assert run.returncode == 2 and "label value 42 is absent" in run.stderr


@pytest.mark.parametrize("argv_tail, words", [
    (["--seed", "-5"], ["--seed -5", ">= 0"]),
    (["--lr", "inf"], ["--lr inf", "finite"]),
    (["--method", "bitfit", "--targets", "qkv"], ["--targets applies to the adapter methods"]),
    (["--method", "zero-shot", "--structure", "urinary_bladder"], ["zero-shot needs a structure",
                                                                    "liver"]),
])
def test_settings_that_cannot_work(capsys, small_liver, tmp_path, argv_tail, words):
    out = tmp_path / "seg.nii.gz"
    assert_refused(capsys, _adapt(CT, small_liver[0], 5, out, *argv_tail), *words, out=out)


def test_malformed_options_give_one_line_naming_the_option(capsys, small_liver, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(_adapt(CT, small_liver[0], 5, tmp_path / "seg.nii.gz", "--lr", "fast"))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert "argument --lr: invalid float value: 'fast'" in err and "arenaseg adapt --help" in err
    assert not (tmp_path / "seg.nii.gz").exists()


def test_non_finite_adapter_is_refused(capsys, adapter, tmp_path):
    """A file whose bytes were damaged into NaNs would segment nothing, silently."""
    from safetensors.torch import save_file

    tensors, meta = read_adapter(adapter)
    name = next(n for n in tensors if n.endswith("lora_A.weight"))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata={"arenaseg": json.dumps(meta)})
    out = tmp_path / "seg.nii.gz"
    assert_refused(capsys, ["segment", "--image", CT, "--adapter", str(broken), "--out", str(out)],
                   "broken.safetensors", "non-finite", out=out)


def test_warm_start_with_another_method_is_refused(capsys, adapter, small_liver, tmp_path):
    out = tmp_path / "seg.nii.gz"
    assert_refused(capsys, _adapt(CT, small_liver[0], 5, out, "--warm-start", str(adapter),
                                  "--method", "lora"),
                   "--method arena, not lora", "without --warm-start", out=out)


def test_garbage_checkpoint_is_refused(capsys, small_liver, tmp_path):
    garbage = tmp_path / "fseft.pth"
    garbage.write_text("this is not a checkpoint")
    out = tmp_path / "seg.nii.gz"
    assert_refused(capsys, _adapt(CT, small_liver[0], 5, out, "--backbone", "fseft-swinunetr",
                                  "--weights", str(garbage)),
                   "fseft.pth", "not a PyTorch file", out=out)


def test_output_paths_get_the_right_fix(capsys, small_liver, tmp_path):
    image = tmp_path / "CT.NII.GZ"  # upper case reads fine
    shutil.copy(ABDOMEN_SMALL / "ct.nii.gz", image)
    (tmp_path / "results").mkdir()
    common = ["adapt", "--image", str(image), "--annotations", str(small_liver[0]), "--label", "5"]
    assert_refused(capsys, common + ["--out", str(image)], "is the image file", "choose another --out")
    assert_refused(capsys, common + ["--out", str(tmp_path / "S5.NII.GZ")],
                   "write the extension in lower case, 'S5.nii.gz'")
    assert_refused(capsys, common + ["--out", str(tmp_path / "results")], "is a folder",
                   str(tmp_path / "results" / "result.nii"))


def test_each_wrong_value_gets_one_reason(capsys, small_liver, tmp_path):
    common = ["adapt", "--image", str(ABDOMEN_SMALL / "ct.nii.gz"), "--annotations",
              str(small_liver[0]), "--out", str(tmp_path / "s.nii.gz")]
    err = assert_refused(capsys, common + ["--label", "5", "--lr", "nan"], "--lr nan must be a finite number")
    assert "> 0" not in err
    assert_refused(capsys, common + ["--label", "1.5"], "--label 1.5 is not a whole number")


def test_adapt_help_shows_the_defaults_a_run_uses(capsys):
    """Options left out take the engine's defaults: --help names each one, read from the engine."""
    from arenaseg.config import DEFAULT_BACKBONE, DEFAULT_LR, AdaptSettings

    with pytest.raises(SystemExit) as stop:
        main(["adapt", "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
    d = AdaptSettings()
    for shown in (f"(default {d.rank};", f"(default {d.lam:g})", f"(default {d.steps})",
                  f"(default {DEFAULT_LR:g};", f"(default {d.rho:g})", f"(default {d.seed})",
                  f"(default {d.self_training})", f"(default {DEFAULT_BACKBONE})"):
        assert shown in text, shown
