"""Adapter files whose metadata was edited by hand, or saved by another version of arenaseg
(issue 21, cases 3 and 11; PEFT users are told to edit adapter configs, peft#1979, #2275): the
command line refuses them before it reads the scan or writes anything, with exit status 2 and
one line naming the file, the field, its value and the fix."""

import json
import subprocess
import sys
from dataclasses import fields

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
import torch

import arenaseg
from arenaseg import adapter_file
from arenaseg.cli import main
from arenaseg.config import AdaptSettings

from conftest import ABDOMEN_SMALL

CT = str(ABDOMEN_SMALL / "ct.nii.gz")
FIX = "arenaseg adapt --adapter-out"


@pytest.fixture(scope="module")
def adapter(small_liver, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    assert main(["adapt", "--image", CT, "--annotations", str(small_liver[0]), "--label", "5",
                 "--out", str(out / "seg.nii.gz"), "--adapter-out", str(out / "a.safetensors"),
                 "--steps", "3", "--structure", "liver"]) == 0
    return out / "a.safetensors"


def edited(adapter, tmp_path, edit, name="edited.safetensors"):
    """A copy of ``adapter`` whose metadata ``edit(meta)`` changed in place (or replaced, when it
    returns something), written as a hand editor would: same tensors, new JSON."""
    with safe_open(str(adapter), framework="pt") as f:
        meta = json.loads(f.metadata()["arenaseg"])
    meta = edit(meta) or meta if callable(edit) else edit
    path = tmp_path / name
    save_file(load_file(str(adapter)), str(path), metadata={"arenaseg": json.dumps(meta)})
    return path


def refused(capsys, argv, out, *words):
    """Exit status 2, one error line (the last line; phase lines may come first) holding
    ``words``, and no output file, not even a partial one."""
    rc = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, lines
    assert all(line.startswith("arenaseg: ") for line in lines)
    assert [line for line in lines if line.startswith("arenaseg: error:")] == lines[-1:]
    for word in words:
        assert word in lines[-1], lines[-1]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith("." + out.name)]
    return lines[-1]


def _drop(*keys):
    def edit(meta):
        for key in keys:
            del meta[key]
    return edit


def _settings(**change):
    return lambda meta: meta["settings"].update(change)


def _first_layer(field, value):
    def edit(meta):
        meta[field][next(iter(meta["stored_ranks"]))] = value
    return edit


# (edit, field named in the message, value named in the message)
EDITS = {
    "label 0": (lambda m: m.update(label=0), "'label'", "0"),
    "label a string": (lambda m: m.update(label="5"), "'label'", '"5"'),
    "label negative": (lambda m: m.update(label=-5), "'label'", "-5"),
    "label true": (lambda m: m.update(label=True), "'label'", "true"),
    "label beyond uint32": (lambda m: m.update(label=2**32), "'label'", str(2**32)),
    "ranks removed": (_drop("ranks"), "'ranks'", "missing"),
    "settings removed": (_drop("settings"), "'settings'", "missing"),
    "metadata a list": (lambda m: [m], "metadata", "list"),
    "ranks a list": (lambda m: m.update(ranks=list(m["ranks"])), "'ranks'", "["),
    "rank a string": (_first_layer("ranks", "2"), "'ranks' of layer", '"2"'),
    "rank negative": (_first_layer("initial_ranks", -1), "'initial_ranks' of layer", "-1"),
    "rank not the tensors'": (_first_layer("ranks", 7), "'ranks' of layer", "7"),
    "stored rank not the tensors'": (_first_layer("stored_ranks", 7), "'stored_ranks' of layer", "7"),
    "settings a string": (lambda m: m.update(settings="arena"), "'settings'", '"arena"'),
    "setting a string": (_settings(rank="8"), "'settings.rank'", '"8"'),
    "setting out of range": (_settings(slab=17), "'settings.slab'", "17"),
    "setting not finite": (_settings(lam=float("nan")), "'settings.lam'", "NaN"),
    "setting of another method": (_settings(method="lora"), "'settings.method'", '"lora"'),
    "method unknown": (lambda m: m.update(method="dora"), "'method'", '"dora"'),
    "checksum a number": (lambda m: m.update(backbone_checksum=123), "'backbone_checksum'", "123"),
    "structure a number": (lambda m: m.update(structure=5), "'structure'", "5"),
    "profile a string": (lambda m: m.update(profile="liver"), "'profile'", '"liver"'),
    "objects a string": (lambda m: m.update(objects="1"), "'objects'", '"1"'),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_edited_metadata_is_refused_naming_the_field(capsys, adapter, tmp_path, case):
    edit, field, value = EDITS[case]
    path = edited(adapter, tmp_path, edit)
    out = tmp_path / "seg.nii.gz"
    err = refused(capsys, ["segment", "--image", CT, "--adapter", str(path), "--out", str(out)],
                  out, str(path), field, value, FIX)
    assert "Traceback" not in err


def test_edited_warm_start_adapter_is_refused_before_training(capsys, adapter, small_liver, tmp_path):
    path = edited(adapter, tmp_path, _drop("settings"))
    out, saved = tmp_path / "seg.nii.gz", tmp_path / "b.safetensors"
    refused(capsys, ["adapt", "--image", CT, "--annotations", str(small_liver[0]), "--label", "5",
                     "--out", str(out), "--adapter-out", str(saved), "--warm-start", str(path)],
            out, str(path), "'settings'", "missing", FIX)
    assert not saved.exists()


def _newer(meta):
    meta["arenaseg_version"] = "9.4.0"
    meta["settings"]["lora_dropout"] = 0.1


@pytest.mark.parametrize("edit, words", [
    (_newer, ["'lora_dropout'"]),
    (lambda m: m.update(arenaseg_version="9.4.0", postprocessing={"min_ml": 1}), ["'postprocessing'"]),
    (lambda m: m.update(arenaseg_version="9.4.0", format="arenaseg-adapter/9"), ["arenaseg-adapter/9"]),
])
def test_adapter_of_another_version_names_both_versions(capsys, adapter, tmp_path, edit, words):
    path = edited(adapter, tmp_path, edit, "newer.safetensors")
    out = tmp_path / "seg.nii.gz"
    message = refused(capsys, ["segment", "--image", CT, "--adapter", str(path), "--out", str(out)], out,
                      str(path), *words, "arenaseg 9.4.0", f"arenaseg {arenaseg.__version__}",
                      "segment with arenaseg 9.4.0", "adapt again with this version")
    assert "restore the original file" not in message  # another version, not an edited file


def test_unknown_setting_saved_by_this_version_says_the_file_was_edited(capsys, adapter, tmp_path):
    path = edited(adapter, tmp_path, _settings(lora_dropout=0.1))
    out = tmp_path / "seg.nii.gz"
    message = refused(capsys, ["segment", "--image", CT, "--adapter", str(path), "--out", str(out)], out,
                      str(path), "'lora_dropout'", f"arenaseg {arenaseg.__version__}", FIX)
    assert "segment with arenaseg" not in message  # this version wrote it: no other version to use


def test_console_script_gives_one_line_and_no_traceback(adapter, tmp_path):
    path = edited(adapter, tmp_path, _newer, "newer.safetensors")
    out = tmp_path / "seg.nii.gz"
    run = subprocess.run([sys.executable, "-m", "arenaseg", "segment", "--image", CT,
                          "--adapter", str(path), "--out", str(out)], capture_output=True, text=True)
    errors = [line for line in run.stderr.splitlines() if not line.startswith("arenaseg: reading")]
    assert run.returncode == 2 and len(errors) == 1, run.stderr
    assert "Traceback" not in run.stderr and str(path) in errors[0] and "'lora_dropout'" in errors[0]
    assert not out.exists()


def test_the_unedited_adapter_still_segments_with_its_label(capsys, adapter, tmp_path):
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", "--image", CT, "--adapter", str(adapter), "--out", str(out)]) == 0
    assert out.is_file()


def test_every_setting_and_field_has_a_rule(adapter):
    """A setting or metadata field added to the engine needs its rule here, else adapters with
    it would be refused as coming from another version."""
    assert set(adapter_file._SETTINGS) == {f.name for f in fields(AdaptSettings)}
    with safe_open(str(adapter), framework="pt") as f:
        assert set(json.loads(f.metadata()["arenaseg"])) <= set(adapter_file._FIELDS)


def _reading(**shapes):
    return {f"reading.{name}": torch.zeros(shape) for name, shape in shapes.items()}


# The frozen backbone's reading (arenaseg.reading.TENSORS), edited: (tensors, name and words in the message)
READINGS = {
    "reading without its mean": (_reading(structure=(4, 8), background=(6, 8), scale=(8,)),
                                 ("'reading.mean'", "missing")),
    "samples of another width": (_reading(structure=(4, 8), background=(6, 5), mean=(8,), scale=(8,)),
                                 ("'reading.background'", "(6, 5)")),
    "an unknown reading tensor": (_reading(structure=(4, 8), background=(6, 8), mean=(8,), scale=(8,),
                                           extra=(8,)), ("'reading.extra'", "unexpected")),
}


@pytest.mark.parametrize("case", list(READINGS))
def test_an_edited_reading_is_refused_naming_the_tensor(capsys, adapter, tmp_path, case):
    added, words = READINGS[case]
    with safe_open(str(adapter), framework="pt") as f:
        header = f.metadata()
    path = tmp_path / "edited.safetensors"
    save_file({**load_file(str(adapter)), **added}, str(path), metadata=header)
    out = tmp_path / "seg.nii.gz"
    line = refused(capsys, ["segment", "--image", CT, "--adapter", str(path), "--out", str(out)],
                   out, str(path), *words, FIX)
    assert line.startswith("arenaseg: error: adapter ") and all(word in line for word in words)
