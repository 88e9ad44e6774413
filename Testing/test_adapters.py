"""The ARENA layer: soft thresholding, proximal step, equality with PEFT's LoRA, merge/unmerge,
injection into MONAI networks (our UNet and the paper's SwinUNETR)."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from arenaseg.adapters import (ArenaLayer, GateSteps, count_parameters, effective_ranks,
                               inject_adapters, soft_threshold)
from arenaseg.backbones import get_spec, load_backbone


def test_soft_threshold_matches_hand_computed_values():
    x = torch.tensor([3.0, 0.5, -0.5, -2.0, 1.0, -1.0, 0.0])
    expected = torch.tensor([2.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0])
    assert torch.equal(soft_threshold(x, 1.0), expected)
    assert torch.equal(soft_threshold(x, 0.0), x)
    with pytest.raises(ValueError):
        soft_threshold(x, -0.1)


def test_gate_step_equals_closed_form():
    torch.manual_seed(0)
    layer = ArenaLayer(nn.Linear(6, 5), rank=4)
    layer.v.data = torch.tensor([0.8, -0.25, 0.05, 1.2])
    layer.v.grad = torch.tensor([1.0, -2.0, 0.5, -0.1])
    size, tau = 0.1, 0.2
    # first step, bias-corrected moments: m = g, s = max g² = 4, so v − size·g/2 is
    # z = [0.75, -0.15, 0.025, 1.205]; ξ(z, 0.2)
    expected = torch.tensor([0.55, 0.0, 0.0, 1.005])
    GateSteps([layer]).step(size, tau)
    assert torch.allclose(layer.v.data, expected, atol=1e-6)
    assert layer.v.grad is None
    assert layer.effective_rank == 2


def test_gate_steps_keep_the_ratios_within_a_layer_whatever_its_gradient_scale():
    small, large = ArenaLayer(nn.Linear(6, 5), rank=2), ArenaLayer(nn.Linear(6, 5), rank=2)
    small.v.grad, large.v.grad = torch.tensor([1e-3, 5e-4]), torch.tensor([10.0, 5.0])
    GateSteps([small, large]).step(0.1, 0.0)
    assert torch.allclose(small.v.data, large.v.data)
    assert torch.allclose(small.v.data, torch.tensor([-0.1, -0.05]))


def test_align_points_components_at_the_gradient_and_keeps_the_output():
    torch.manual_seed(0)
    base, x = nn.Conv3d(3, 6, 3, padding=1), torch.randn(1, 3, 5, 5, 5)
    layer = ArenaLayer(base, rank=4)
    weights = torch.randn(1, 6, 5, 5, 5)
    before = layer(x)
    base.weight.requires_grad_(True)
    (grad,) = torch.autograd.grad((layer(x) * weights).sum(), [base.weight])
    base.weight.requires_grad_(False)
    layer.align(grad)
    assert torch.equal(layer(x), before)  # gates at 0: still the backbone
    u, s, vh = torch.linalg.svd(grad.flatten(1), full_matrices=False)
    a, b = layer.lora_A.weight.flatten(1), layer.lora_B.weight.flatten(1)
    assert torch.allclose(a, vh[:4], atol=1e-5) and torch.allclose(b, u[:, :4], atol=1e-5)
    # each gate receives s·σ_i from the same loss: the components rank by the loss's pull
    (layer(x) * weights).sum().backward()
    assert torch.allclose(layer.v.grad, layer.scale * s[:4], rtol=1e-3)


def test_components_beyond_the_layers_rank_never_switch_on():
    layer = ArenaLayer(nn.Conv3d(1, 8, 3), rank=32)  # W0 is 8 × 27: at most 8 directions
    layer.align(torch.randn_like(layer.base.weight))
    assert int((layer.lora_A.weight.flatten(1).norm(dim=1) > 0).sum()) == 8
    (layer(torch.randn(1, 1, 6, 6, 6)) ** 2).sum().backward()
    assert int(torch.count_nonzero(layer.v.grad)) <= 8


def _peft_twin(base: nn.Module, rank: int):
    """PEFT's LoRA on a copy of ``base`` (scaling alpha/r = 1) with random non-zero A and B."""
    import peft
    model = nn.Sequential(OrderedDict(layer=base))
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["layer"], lora_dropout=0.0)
    wrapped = peft.get_peft_model(model, config)
    lora = wrapped.base_model.model.layer
    torch.nn.init.normal_(lora.lora_B["default"].weight)
    return wrapped, lora


@pytest.mark.parametrize("kind", ["linear", "conv3d"])
def test_unit_gates_equal_peft_lora(kind):
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(12, 7), torch.randn(3, 12)
    else:
        base, x = nn.Conv3d(4, 6, 3, stride=2, padding=1), torch.randn(2, 4, 9, 8, 7)
    twin, lora = _peft_twin(base, rank=3)
    ours = ArenaLayer(lora.base_layer, rank=3)
    with torch.no_grad():
        ours.v.fill_(1.0 / ours.scale)  # s·v = 1: LoRA with scaling 1
        ours.lora_A.weight.copy_(lora.lora_A["default"].weight)
        ours.lora_B.weight.copy_(lora.lora_B["default"].weight)
    expected = twin(x)
    assert not torch.allclose(expected, lora.base_layer(x))  # the update is not trivial
    assert torch.allclose(ours(x), expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv3d"])
def test_merge_and_unmerge(kind):
    torch.manual_seed(1)
    base = nn.Linear(10, 8) if kind == "linear" else nn.Conv3d(3, 5, 3, padding=1)
    x = torch.randn(4, 10) if kind == "linear" else torch.randn(1, 3, 6, 6, 6)
    w0 = base.weight.detach().clone()
    layer = ArenaLayer(base, rank=4)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.v.copy_(torch.tensor([0.7, 0.0, -1.3, 0.0]))  # two components switched off
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    assert torch.allclose(layer(x), unmerged, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base.weight, w0)
    assert torch.allclose(layer(x), unmerged, atol=1e-6)


def test_prune_keeps_output_and_shrinks_to_effective_rank():
    torch.manual_seed(2)
    layer = ArenaLayer(nn.Conv3d(3, 4, 3, padding=1), rank=5)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.v.copy_(torch.tensor([0.0, 1.0, 0.0, 0.5, 0.0]))
    x = torch.randn(1, 3, 5, 5, 5)
    before = layer(x)
    layer.prune()
    assert layer.rank == 2 and layer.lora_A.weight.shape[0] == 2
    assert torch.allclose(layer(x), before, atol=1e-6)


def test_injection_into_default_backbone_trains_only_adapters():
    model, spec = load_backbone()
    layers = inject_adapters(model, spec.targets, rank=4)
    assert len(layers) == 9
    assert all(isinstance(model.get_submodule(n), ArenaLayer) for n in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or n.endswith(".v") for n in trainable)
    assert effective_ranks(layers) == {n: 0 for n in layers}  # gates start at 0
    assert all(layer.allocated == 4 for layer in layers.values())
    assert count_parameters(layers) == 0 < count_parameters(layers, effective=False)
    with pytest.raises(ValueError, match="no nn.Linear"):
        inject_adapters(model, [r"does-not-exist"], rank=2)


def test_swinunetr_qkv_adapters_small_crop():
    """The paper's path: SwinUNETR with adapters on the attention qkv layers (small feature size)."""
    model, spec = load_backbone("swinunetr", feature_size=12, out_channels=3)
    layers = inject_adapters(model, spec.targets, rank=4)
    assert len(layers) == 8 and all(n.endswith("attn.qkv") for n in layers)
    assert all(isinstance(layer.base, nn.Linear) for layer in layers.values())
    x = torch.rand(1, 1, 64, 64, 64)
    before = model(x).detach()
    for layer in layers.values():
        nn.init.normal_(layer.v, std=0.1)
    loss = model(x).square().mean()
    loss.backward()
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n and not n.endswith(".v")]
    assert all(p.grad is None for p in frozen)
    assert all(layer.lora_A.weight.grad is not None for layer in layers.values())
    assert not torch.allclose(model(x), before)
    assert model(x).shape == (1, 3, 64, 64, 64)
    assert spec.preprocessing.spacing_mm == (1.5, 1.5, 1.5)
    assert get_spec("swinunetr").head == "out.conv.conv"


def test_pruning_keeps_the_allocated_rank_on_record():
    layer = ArenaLayer(torch.nn.Conv3d(4, 6, 3, padding=1), rank=8)
    with torch.no_grad():
        layer.v.fill_(0.5)
        layer.v[[1, 4, 6]] = 0
    layer.prune()
    assert (layer.rank, layer.effective_rank, layer.allocated) == (5, 5, 8)
