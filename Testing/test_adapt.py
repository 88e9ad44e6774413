"""Real adaptation runs on the real abdomen CT: three painted liver slices give a liver; a saved
adapter reproduces the prediction; a larger λ discovers a smaller rank; warm start works."""

import numpy as np
import pytest

from arenaseg import pipeline
from arenaseg.adapter_file import read_adapter
from arenaseg.io.annotations import dice, find_annotation
from arenaseg.training import AdaptSettings

from conftest import ABDOMEN, BLADDER, LIVER, painted, read_ijk


@pytest.fixture(scope="module")
def liver(tmp_path_factory):
    out = tmp_path_factory.mktemp("liver")
    ann, paint, ref = painted(ABDOMEN / "labels.nii.gz", LIVER, out=out / "painted.nii.gz")
    result = pipeline.adapt(str(ABDOMEN / "ct.nii.gz"), str(ann), LIVER, str(out / "seg.nii.gz"),
                            str(out / "liver.safetensors"), structure="liver")
    unpainted = ~find_annotation(paint, LIVER).known
    return result, paint, ref, unpainted, out


def test_three_painted_liver_slices_give_a_liver(liver):
    result, paint, ref, unpainted, _ = liver
    seg = read_ijk(result.segmentation)
    assert dice(seg == LIVER, ref == LIVER, unpainted) >= 0.85
    assert np.all(seg[paint == LIVER] == LIVER)  # painted voxels are never erased
    assert 0 < result.effective_rank <= result.initial_rank
    assert len(result.loss) == AdaptSettings().steps
    assert result.loss[-1] < result.loss[0]


def test_saved_adapter_reproduces_the_prediction(liver, tmp_path):
    result, paint, ref, unpainted, _ = liver
    tensors, meta = read_adapter(result.adapter)
    assert meta["backbone"] == "arena-small-ct-unet" and len(meta["backbone_checksum"]) == 64
    assert meta["ranks"] == result.ranks and meta["structure"] == "liver"
    assert meta["settings"]["lam"] == AdaptSettings().lam
    assert meta["preprocessing"]["spacing_mm"] == [3.0, 3.0, 3.0]
    assert all(tensors[f"{n}.v"].numel() == r for n, r in result.ranks.items() if r)
    again = pipeline.segment(str(ABDOMEN / "ct.nii.gz"), result.adapter, str(tmp_path / "again.nrrd"))
    first, second = read_ijk(result.segmentation), read_ijk(again["segmentation"])
    assert (first[unpainted] == second[unpainted]).mean() > 0.9999
    assert dice(first == LIVER, second == LIVER, unpainted) > 0.999


def test_warm_start_continues_from_the_previous_adapter(liver):
    result, paint, ref, unpainted, out = liver
    again = pipeline.adapt(str(ABDOMEN / "ct.nii.gz"), str(out / "painted.nii.gz"), LIVER,
                           str(out / "seg2.nii.gz"), warm_start=result.adapter,
                           settings=AdaptSettings(steps=3))
    assert all(again.ranks[n] <= r for n, r in result.ranks.items() if n in again.ranks)
    assert dice(read_ijk(again.segmentation) == LIVER, ref == LIVER, unpainted) >= 0.8


def test_larger_lambda_discovers_smaller_rank(tmp_path):
    ann, _, _ = painted(ABDOMEN / "labels.nii.gz", BLADDER, out=tmp_path / "painted.nii.gz")
    default = AdaptSettings().lam
    totals = []
    for lam in (0.0, 2 * default, 4 * default):
        run = pipeline.adapt(str(ABDOMEN / "ct.nii.gz"), str(ann), BLADDER,
                             str(tmp_path / f"seg_{lam}.nii.gz"), settings=AdaptSettings(lam=lam, steps=30))
        totals.append(run.effective_rank)
    assert totals[0] == 9 * AdaptSettings().rank  # λ = 0 switches nothing off
    assert totals[0] > totals[1] > totals[2]


def test_interpolated_pseudo_labels_enter_the_loss():
    # The first step's crop is drawn before any pseudo-label is, so the two runs see the same
    # crop: with pseudo-labels the loss has one more (positive) term.
    import SimpleITK as sitk

    from arenaseg.io.geometry import array_ijk
    from arenaseg.io.labels import read_labels_on

    ct = sitk.ReadImage(str(ABDOMEN / "ct.nii.gz"))
    paint = np.zeros(ct.GetSize(), np.uint8)
    ref = array_ijk(read_labels_on(ct, ABDOMEN / "labels.nii.gz", "labels"))
    slices = np.flatnonzero((ref == BLADDER).any(axis=(0, 1)))[[2, 8]]
    paint[:, :, slices] = (ref[:, :, slices] == BLADDER) * BLADDER
    annotation = find_annotation(paint, BLADDER, axis=2)
    plain, weak = (pipeline.fit(ct, annotation, AdaptSettings(steps=1, interpolate_mm=h)).log.loss[0]
                   for h in (0.0, 6.0))
    assert weak > plain
