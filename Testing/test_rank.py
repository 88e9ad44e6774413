"""ARENA's rank on real short runs: the gates get gradient from the first step, a component the
loss cannot use stays off, and the discovered rank does not grow with the allocated rank r0."""

import pytest
import torch
from torch import nn

from arenaseg.adapters import ArenaLayer, GateSteps
from arenaseg.io.annotations import find_annotation, paint_slices
from arenaseg.io.geometry import array_ijk
from arenaseg.io.images import read_image
from arenaseg.io.labels import read_labels_on
from arenaseg.pipeline import Scan, fit
from arenaseg.backbones import get_spec
from arenaseg.config import AdaptSettings

from conftest import ABDOMEN

BLADDER = 21
RATIO = 1.5  # issue target: rank at r0 = 32 at most 1.5× the one at r0 = 8


@pytest.fixture(scope="module")
def bladder():
    ct = read_image(ABDOMEN / "ct.nii.gz")
    labels = array_ijk(read_labels_on(ct, ABDOMEN / "labels.nii.gz", "labels"))
    scan = Scan.from_image(ct, get_spec("arena-small-ct-unet"))
    return scan, find_annotation(paint_slices(labels, BLADDER, 3, axis=2), BLADDER, axis=2)


def test_every_layer_switches_a_component_on_at_the_first_step(bladder):
    """The gates start at 0 with A and B on the gradient's singular vectors, so the loss pulls
    every layer's strongest component up at once (with B at zero, as in LoRA, no gate could
    move before B had learnt)."""
    scan, annotation = bladder
    result = fit(scan, annotation, AdaptSettings(steps=1), structure="urinary_bladder")
    assert result.log.total_rank[0] > 0
    assert all(rank >= 1 for rank in result.log.ranks.values()), result.log.ranks


def test_components_the_loss_cannot_use_stay_off(bladder):
    """At r0 = 32 the first convolution (16 output channels) has only 16 directions: the other
    16 components carry nothing, never receive gradient and stay off; so do most others."""
    scan, annotation = bladder
    result = fit(scan, annotation, AdaptSettings(rank=32, steps=10), structure="urinary_bladder")
    first = next(iter(result.tuning.layers.values()))
    assert first.base.out_channels == 16
    assert torch.count_nonzero(first.v[16:]) == 0
    assert sum(result.log.ranks.values()) < 9 * 32 / 4


def test_a_gate_without_gradient_is_switched_off():
    """The l1 term alone: a gate whose gradient is 0 shrinks by the threshold each step."""
    layer = ArenaLayer(nn.Linear(4, 3), rank=2)
    steps = GateSteps([layer])
    with torch.no_grad():
        layer.v.copy_(torch.tensor([0.05, 0.0]))
    for _ in range(5):
        layer.v.grad = torch.zeros(2)
        steps.step(0.1, 0.01)
    assert layer.effective_rank == 0


def test_discovered_rank_does_not_grow_with_r0(bladder):
    scan, annotation = bladder
    ranks = {r0: sum(fit(scan, annotation, AdaptSettings(rank=r0, steps=30),
                         structure="urinary_bladder").log.ranks.values()) for r0 in (8, 32)}
    assert 0 < ranks[32] <= RATIO * ranks[8], ranks
