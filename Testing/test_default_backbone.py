"""The default backbone is the Merlin-derived encoder: a plain ``arenaseg adapt`` (no
``--backbone``, no ``ARENASEG_BACKBONE``) adapts it end to end onto the input grid, and
``ARENASEG_BACKBONE`` switches a site to another backbone, with one clear line when it names none."""

import json
import os
import subprocess
import sys

import SimpleITK as sitk
from safetensors import safe_open

from conftest import ABDOMEN_SMALL, LIVER


def _arenaseg(*args, backbone_env: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ARENASEG_BACKBONE"}
    if backbone_env is not None:
        env["ARENASEG_BACKBONE"] = backbone_env
    return subprocess.run([sys.executable, "-m", "arenaseg", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


def test_plain_adapt_runs_the_merlin_encoder_onto_the_input_grid(tmp_path, small_liver):
    seg, adapter = tmp_path / "seg.nii.gz", tmp_path / "liver.safetensors"
    done = _arenaseg("adapt", "--image", ABDOMEN_SMALL / "ct.nii.gz", "--annotations", small_liver[0],
                     "--label", LIVER, "--steps", 3, "--device", "cpu", "--out", seg,
                     "--adapter-out", adapter)
    assert done.returncode == 0, done.stderr[-3000:]
    ct, out = sitk.ReadImage(str(ABDOMEN_SMALL / "ct.nii.gz")), sitk.ReadImage(str(seg))
    assert (out.GetSize(), out.GetSpacing(), out.GetOrigin(), out.GetDirection()) == \
        (ct.GetSize(), ct.GetSpacing(), ct.GetOrigin(), ct.GetDirection())
    with safe_open(str(adapter), framework="pt") as f:
        meta = json.loads(f.metadata()["arenaseg"])
    assert meta["backbone"] == "merlin-resnet152"
    assert meta["preprocessing"]["spacing_mm"] == [1.5, 1.5, 3.0]
    assert meta["ranks"] and all(n.startswith("encoder.layer2.") for n in meta["ranks"])
    assert "encoder.layer2.7.conv3" in done.stdout  # the rank table names the adapted layers


def test_the_environment_chooses_the_default_and_a_wrong_name_is_one_line(tmp_path, small_liver):
    code = "from arenaseg.config import DEFAULT_BACKBONE; print(DEFAULT_BACKBONE)"
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "ARENASEG_BACKBONE"})
    assert plain.stdout.strip() == "merlin-resnet152"
    seg = tmp_path / "seg.nii.gz"
    done = _arenaseg("adapt", "--image", ABDOMEN_SMALL / "ct.nii.gz", "--annotations", small_liver[0],
                     "--label", LIVER, "--out", seg, backbone_env="merlin-resnet-152")
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "'merlin-resnet-152'" in errors[0] and "ARENASEG_BACKBONE" in errors[0]
    assert "merlin-resnet152" in errors[0] and not seg.exists()
