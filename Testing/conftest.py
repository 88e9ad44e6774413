"""Shared fixtures: the real CT scans in ../shared/data (never copied into the repository)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# The embedded U-Net is the default of every test (and of the processes they start) unless a test
# names its backbone: the default Merlin encoder is tested by name (test_merlin.py,
# test_default_backbone.py), and each of its adapts costs about a minute on two cores.
os.environ.setdefault("ARENASEG_BACKBONE", "arena-small-ct-unet")

DATA = Path(os.environ.get("ARENASEG_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
ABDOMEN = DATA / "abdomen_ct"
ABDOMEN_SMALL = DATA / "abdomen_ct_small"
DICOM = DATA / "abdomen_ct_dicom"

LIVER, SPLEEN, BLADDER = 5, 1, 21


def pytest_configure(config):
    if not (ABDOMEN / "ct.nii.gz").is_file():
        raise pytest.UsageError(f"test data not found at {DATA}: put the shared data folder "
                                "beside the repository or set ARENASEG_DATA")


def painted(labels_path: Path, value: int, k: int = 3, axis: int = 2, out: Path | None = None):
    """Write a labelmap with ``k`` painted slices of ``value`` taken from reference labels;
    return (path, painted array (i, j, k), reference array)."""
    from arenaseg.io.annotations import paint_slices
    from arenaseg.io.geometry import array_ijk, image_like

    reference = sitk.ReadImage(str(labels_path))
    ref = array_ijk(reference)
    paint = paint_slices(ref, value, k, axis)
    sitk.WriteImage(image_like(paint, reference), str(out))
    return out, paint, ref


@pytest.fixture(scope="session")
def small_liver(tmp_path_factory):
    """Three painted axial liver slices on the small abdomen CT (122×101×30 voxels)."""
    out = tmp_path_factory.mktemp("small") / "painted.nii.gz"
    return painted(ABDOMEN_SMALL / "labels.nii.gz", LIVER, out=out)


def signal_in_a_finalizer(signum: int) -> None:
    """Send ``signum`` to this process so that its handler runs inside a finalizer (as in
    tqdm's ``__del__``), where Python reports what the handler raises and drops it."""
    class Finalised:
        def __del__(self):
            signal.raise_signal(signum)
            for _ in range(1000):  # the handler runs here, inside the finalizer
                pass

    Finalised()


def read_ijk(path) -> np.ndarray:
    from arenaseg.io.geometry import array_ijk

    return array_ijk(sitk.ReadImage(str(path)))


def refused(capsys, argv, out_dir, *words) -> str:
    """Run the command line on ``argv``: exit 2, the last stderr line the one error line holding
    each of ``words``, and nothing named ``seg*`` or hidden left in ``out_dir``. Returns the line."""
    from arenaseg.cli import main

    rc = main(argv)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and line.startswith("arenaseg: error: "), line
    for word in words:
        assert word in line, line
    assert sorted(p.name for p in out_dir.iterdir() if p.name.startswith(("seg", "."))) == []
    return line
