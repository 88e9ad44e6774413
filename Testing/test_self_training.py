"""Self-training (arenaseg/self_training.py): how the steps are shared between the rounds, which
voxels become labels, and one real adaptation with rounds on the real abdomen CT."""

import numpy as np
import SimpleITK as sitk

from arenaseg import pipeline
from arenaseg.config import AdaptSettings
from arenaseg.io.annotations import find_annotation
from arenaseg.io.geometry import array_ijk, image_like
from arenaseg.io.labels import read_labels_on
from arenaseg.self_training import BACKGROUND_BELOW, pseudo_labels, round_steps

from conftest import ABDOMEN, BLADDER


def test_each_round_of_self_training_adds_half_the_steps_on_the_paint():
    assert round_steps(120, 2) == [120, 60, 60]
    assert round_steps(121, 2) == [121, 60, 60]
    assert round_steps(120, 0) == [120]
    assert round_steps(1, 2) == [1]  # too few steps for a round: none runs


def _tube_scan():
    """A (20, 30, 12) grid of 3 mm, painted on slice k = 5: a structure found along k = 2..9
    (probability 0.8, through the paint), a confident object elsewhere not touching it (0.95),
    and a doubtful band (0.3) beside the tube."""
    shape = (20, 30, 12)
    p = np.full(shape, 0.01, np.float32)
    p[5:10, 10:15, 2:10] = 0.8
    p[10:12, 10:15, 2:10] = 0.3
    p[15:19, 25:29, :] = 0.95
    paint = np.zeros(shape, np.uint8)
    paint[5:10, 10:15, 5] = 7
    reference = sitk.Image(list(shape), sitk.sitkUInt8)
    reference.SetSpacing((3.0, 3.0, 3.0))
    return p, image_like(p, reference), find_annotation(paint, 7, axis=2)


def test_the_structure_found_through_the_paint_and_as_much_near_background_become_labels():
    p, probability, annotation = _tube_scan()
    points, targets = pseudo_labels(probability, annotation, most=10_000)
    assert points.shape == (len(targets), 3)
    i, j, k = points.T
    structure = targets == 1
    # every voxel of the tube off the painted slice, and nothing else, is structure
    tube = {(a, b, c) for a in range(5, 10) for b in range(10, 15) for c in range(2, 10) if c != 5}
    assert {tuple(x) for x in points[structure]} == tube
    assert np.all(k != 5)  # the painted slice is the paint's, never a pseudo-label
    # background: confident, near the tube (12 mm = 4 voxels), as many as structure voxels
    assert (~structure).sum() == structure.sum()
    assert np.all(p[i[~structure], j[~structure], k[~structure]] < BACKGROUND_BELOW)
    assert np.all((i[~structure] >= 1) & (i[~structure] <= 13) & (j[~structure] >= 6)
                  & (j[~structure] <= 18))
    assert not np.any(i >= 15)  # the object away from the paint teaches nothing


def test_at_most_the_given_number_of_structure_voxels_are_drawn():
    _, probability, annotation = _tube_scan()
    points, targets = pseudo_labels(probability, annotation, most=50, seed=3)
    assert (targets == 1).sum() == 50 and (targets == 0).sum() == 50
    again, _ = pseudo_labels(probability, annotation, most=50, seed=3)
    assert np.array_equal(points, again)  # seeded


def test_an_adaptation_with_rounds_reports_every_step_once_in_order():
    ct = sitk.ReadImage(str(ABDOMEN / "ct.nii.gz"))
    ref = array_ijk(read_labels_on(ct, ABDOMEN / "labels.nii.gz", "labels"))
    paint = np.zeros(ref.shape, np.uint8)
    slices = np.flatnonzero((ref == BLADDER).any(axis=(0, 1)))[[3, 8]]
    paint[:, :, slices] = (ref[:, :, slices] == BLADDER) * BLADDER
    steps, phases = [], []
    result = pipeline.fit(ct, find_annotation(paint, BLADDER, axis=2),
                          AdaptSettings(steps=4, self_training=2),
                          progress=lambda step, total, loss, ranks: steps.append((step, total)),
                          status=lambda phase, message, *_: phases.append(message))
    assert steps == [(n, 8) for n in range(1, 9)] and len(result.log.loss) == 8
    assert sum("self-training round" in m for m in phases) == 2
    assert set(result.log.ranks) == set(result.tuning.ranks())



def test_off_by_default_and_the_option_is_checked_before_any_work(tmp_path, capsys, small_liver):
    from conftest import ABDOMEN_SMALL, LIVER, refused

    assert AdaptSettings().self_training == 0  # bench/SELF_TRAINING.md: not a default
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    refused(capsys, ["adapt", "--image", str(ABDOMEN_SMALL / "ct.nii.gz"), "--annotations",
                     str(small_liver[0]), "--label", str(LIVER), "--out", str(out_dir / "seg.nii.gz"),
                     "--self-training", "17"],
            out_dir, "--self-training 17 must be >= 0 and <= 16")


def test_the_largest_seed_runs_its_rounds_and_adalora_refuses_them():
    """Each round draws its crops with seed + 100·n: past numpy's limit it stopped the run
    after the first round had trained; AdaLoRA's rank budget schedule spans --steps only."""
    import pytest

    from arenaseg.errors import ArenaError

    ct = sitk.ReadImage(str(ABDOMEN / "ct.nii.gz"))
    ref = array_ijk(read_labels_on(ct, ABDOMEN / "labels.nii.gz", "labels"))
    paint = np.zeros(ref.shape, np.uint8)
    slices = np.flatnonzero((ref == BLADDER).any(axis=(0, 1)))[[3, 8]]
    paint[:, :, slices] = (ref[:, :, slices] == BLADDER) * BLADDER
    result = pipeline.fit(ct, find_annotation(paint, BLADDER, axis=2),
                          AdaptSettings(steps=2, self_training=1, seed=2**32 - 1))
    assert len(result.log.loss) == 3
    with pytest.raises(ArenaError, match="--self-training does not apply to method adalora"):
        AdaptSettings(method="adalora", self_training=1)
