"""Training under bf16 autocast on the CPU gives the same gradients as float32, for a crop thin
across each of the three axes and for the methods that train convolution weights.

Found the hard way: oneDNN's bf16 3D convolution (PyTorch 2.13, AVX512-BF16/AMX) returns a wrong
weight gradient when the input is 2 voxels deep along the first spatial axis, which the deepest
level of a 32-voxel slab painted on sagittal slices is; runs then trained on noise and, at times,
stopped on a non-finite loss. The kernel reads memory it did not write, so it shows only once
freed blocks are reused (:func:`~arenaseg.precision.reuse_freed_memory`), not on fresh zeroed
pages. :func:`arenaseg.precision.guard_bf16_defects` routes those
convolutions (and AdaLoRA's functional one) through float32. Autocast is forced here, so the check runs on every CPU (it can only catch the defect on one
with native bf16, where oneDNN runs bf16 kernels).
"""

import copy

import pytest
import torch

from arenaseg.backbones import load_backbone
from arenaseg.config import AdaptSettings
from arenaseg.precision import guard_bf16_defects, reuse_freed_memory
from arenaseg.methods import prepare

SLAB = AdaptSettings().slab


@pytest.fixture(scope="module")
def backbone():
    reuse_freed_memory()  # as training does: freed blocks come back uninitialised, not zeroed
    return load_backbone("arena-small-ct-unet")


def gradients(model, x, bf16: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = model(x)
    (y.float() ** 2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["arena", "lora", "adalora", "full"])
@pytest.mark.parametrize("across", [0, 1, 2])
def test_bf16_gradients_match_float32(backbone, method, across):
    model, spec = copy.deepcopy(backbone[0]), backbone[1]
    tuning = prepare(model, spec, AdaptSettings(method=method), "liver")
    torch.manual_seed(0)
    with torch.no_grad():  # adapters start as the identity: give every factor a gradient
        for name, p in model.named_parameters():
            if name.endswith(".v"):
                p.fill_(0.1)
            elif "lora_B" in name or "lora_E" in name:  # LoRA's B, AdaLoRA's singular values
                p.normal_(0, 0.05)
    guard_bf16_defects(tuning.model)
    crop = list(spec.preprocessing.roi_size)
    crop[across] = SLAB
    x = torch.rand(1, 1, *crop)
    exact, fast = gradients(model, x, bf16=False), gradients(model, x, bf16=True)
    assert exact.keys() == fast.keys() and exact
    largest = max(g.norm() for g in exact.values())
    for name, g in exact.items():
        if g.norm() < 1e-5 * largest:  # e.g. a bias before instance normalisation: no signal
            continue
        error = float((fast[name] - g).norm() / g.norm())  # bf16 rounding: up to about 0.1
        assert error < 0.3, f"{method}, crop {crop}: {name}: bf16 gradient off by {error:.2f}"
