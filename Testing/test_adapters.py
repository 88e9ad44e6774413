"""The ARENA layer: soft thresholding, proximal step, equality with PEFT's LoRA, merge/unmerge,
injection into MONAI networks (our UNet and the paper's SwinUNETR)."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from arenaseg.adapters import (ArenaLayer, count_parameters, effective_ranks, inject_adapters,
                               proximal_step, soft_threshold)
from arenaseg.backbones import get_spec, load_backbone


def test_soft_threshold_matches_hand_computed_values():
    x = torch.tensor([3.0, 0.5, -0.5, -2.0, 1.0, -1.0, 0.0])
    expected = torch.tensor([2.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0])
    assert torch.equal(soft_threshold(x, 1.0), expected)
    assert torch.equal(soft_threshold(x, 0.0), x)
    with pytest.raises(ValueError):
        soft_threshold(x, -0.1)


def test_proximal_step_equals_closed_form():
    torch.manual_seed(0)
    layer = ArenaLayer(nn.Linear(6, 5), rank=4)
    layer.v.data = torch.tensor([0.8, -0.3, 0.05, 1.2])
    layer.v.grad = torch.tensor([1.0, -2.0, 0.5, -0.1])
    rho, tau = 0.1, 0.2
    # closed form of eq. 5: z = v - rho*g = [0.7, -0.1, 0.0, 1.21]; xi(z, 0.2)
    expected = torch.tensor([0.5, 0.0, 0.0, 1.01])
    proximal_step([layer], rho, tau)
    assert torch.allclose(layer.v.data, expected, atol=1e-6)
    assert layer.v.grad is None
    assert layer.effective_rank == 2


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
def test_v_ones_lambda_zero_equals_peft_lora(kind):
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(12, 7), torch.randn(3, 12)
    else:
        base, x = nn.Conv3d(4, 6, 3, stride=2, padding=1), torch.randn(2, 4, 9, 8, 7)
    twin, lora = _peft_twin(base, rank=3)
    ours = ArenaLayer(lora.base_layer, rank=3, v0=1.0)
    with torch.no_grad():
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
    assert effective_ranks(layers) == {n: 4 for n in layers}
    assert count_parameters(layers) == count_parameters(layers, effective=False) > 0
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
        nn.init.normal_(layer.lora_B.weight, std=0.1)
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
        layer.v[[1, 4, 6]] = 0
    layer.prune()
    assert (layer.rank, layer.effective_rank, layer.allocated) == (5, 5, 8)
