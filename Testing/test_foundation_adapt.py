"""The paper's foundation SwinUNETR from a local checkpoint file, adapted end to end by the
command line as a firewalled user would run it (file downloaded by hand, ``--weights``)."""

import json
import subprocess
import sys

import SimpleITK as sitk
import torch
from safetensors import safe_open

from conftest import ABDOMEN_SMALL, LIVER
from test_backbones import random_state, source_layout


def test_fseft_checkpoint_adapts_on_attention_qkv(tmp_path, small_liver):
    ann_path, _, _ = small_liver
    state, name = source_layout("fseft-swinunetr", random_state("fseft-swinunetr"))
    checkpoint = tmp_path / name
    torch.save(state, checkpoint)
    seg, adapter = tmp_path / "seg.nii.gz", tmp_path / "liver.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "arenaseg", "adapt", "--image", str(ABDOMEN_SMALL / "ct.nii.gz"),
         "--annotations", str(ann_path), "--label", str(LIVER), "--backbone", "fseft-swinunetr",
         "--weights", str(checkpoint), "--steps", "1", "--checkpointing", "--device", "cpu",
         "--out", str(seg), "--adapter-out", str(adapter)],
        capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ct, out = sitk.ReadImage(str(ABDOMEN_SMALL / "ct.nii.gz")), sitk.ReadImage(str(seg))
    assert (out.GetSize(), out.GetSpacing(), out.GetOrigin(), out.GetDirection()) == \
        (ct.GetSize(), ct.GetSpacing(), ct.GetOrigin(), ct.GetDirection())
    with safe_open(str(adapter), framework="pt") as f:
        meta = json.loads(f.metadata()["arenaseg"])
    assert meta["backbone"] == "fseft-swinunetr" and meta["preprocessing"]["spacing_mm"] == [1.5] * 3
    assert len(meta["ranks"]) == 8 and all(n.endswith("attn.qkv") for n in meta["ranks"])
    assert meta["settings"]["checkpointing"] is True
