"""The fine-tuning methods: each trains exactly its parameters, starts equal to the backbone,
survives an adapter file; our AdaLoRA pieces (Conv3d triplets, budget driver, orthogonality
penalty) agree with PEFT's where PEFT supports the layer."""

from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from arenaseg.adapter_file import apply_adapter, read_adapter, save_adapter
from arenaseg.io.annotations import find_annotation
from arenaseg.backbones import load_backbone, state_checksum
from arenaseg.errors import ArenaError
from arenaseg.methods import METHOD_CLASSES, METHODS, _svd_conv3d_class, orthogonality_penalty, prepare
from arenaseg.pipeline import Scan, fit
from arenaseg.training import AdaptSettings

from conftest import ABDOMEN_SMALL, LIVER, read_ijk


@pytest.fixture(scope="module")
def ct_crop():
    """A real 64×64×16 crop of the small abdomen CT on the backbone's canonical grid."""
    _, spec = load_backbone()
    scan = Scan.from_image(sitk.ReadImage(str(ABDOMEN_SMALL / "ct.nii.gz")), spec)
    return scan.x[None, :, 20:84, 20:84, :16].clone()


def _trained_names(method):
    model, spec = load_backbone()
    tuning = prepare(model, spec, AdaptSettings(method=method), structure="liver")
    return tuning, {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_its_own_parameters(method):
    tuning, names = _trained_names(method)
    head = {"classifier.weight", "classifier.bias"}
    everything = {n for n, _ in tuning.model.named_parameters()}
    expected = {
        "zero-shot": set(),
        "linear-probe": head,
        "bitfit": head | {n for n in everything if n.endswith("bias")},
        "affine-ln": head | {n for n in everything if ".adn.N." in n},
        "full": everything,
        "lora": head | {n for n in everything if ".lora_" in n},
        "adalora": head | {n for n in everything if ".lora_" in n and "ranknum" not in n},
        "arena": head | {n for n in everything if ".lora_" in n or n.endswith(".v")},
    }[method]
    assert names == expected
    if method in ("lora", "adalora", "arena"):
        assert len(tuning.layers) == 9 and all(r == 8 for r in tuning.initial_ranks().values())
    if method == "affine-ln":  # MONAI's InstanceNorm3d has no affine: one was added
        norms = [m for m in tuning.model.modules() if isinstance(m, nn.InstanceNorm3d)]
        assert norms and all(m.affine for m in norms)
        assert len([n for n in names if ".adn.N." in n]) == 2 * len(norms)
    assert tuning.trainable_parameters() == sum(tuning.model.get_parameter(n).numel() for n in names)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_starts_equal_to_the_backbone(method, ct_crop):
    """Adapters start at ΔW = 0 and added norm affines at the identity, so before training every
    method predicts what the backbone's own liver row predicts."""
    reference_model, spec = load_backbone()
    reference = prepare(reference_model, spec, AdaptSettings(method="linear-probe"), "liver")
    model, spec = load_backbone()
    tuning = prepare(model, spec, AdaptSettings(method=method), "liver")
    with torch.no_grad():
        assert torch.allclose(tuning.model(ct_crop), reference.model(ct_crop), atol=1e-5)


def test_zero_shot_of_an_unknown_structure_is_refused():
    model, spec = load_backbone()
    with pytest.raises(ArenaError, match="zero-shot needs a structure"):
        prepare(model, spec, AdaptSettings(method="zero-shot"), "urinary_bladder")


def test_zero_shot_on_a_backbone_without_organ_classes_names_one_with_them():
    from arenaseg.backbones import EMBEDDED_BACKBONE, get_spec

    with pytest.raises(ArenaError, match=r"'merlin-resnet152' has none .* --method arena\), or a "
                                         rf"--backbone pretrained on organ labels \({EMBEDDED_BACKBONE}, "):
        METHOD_CLASSES["zero-shot"].check(get_spec("merlin-resnet152"), None)


def test_one_class_per_method_name():
    """Each name of the config has its class, and preparing by name gives that class."""
    assert tuple(METHOD_CLASSES) == METHODS
    model, spec = load_backbone()
    assert type(prepare(model, spec, AdaptSettings(method="bitfit"))) is METHOD_CLASSES["bitfit"]


def test_arena_prunes_only_when_asked():
    """Switched-off components stay in the tensors until the explicit prune (saving calls it)."""
    model, spec = load_backbone()
    arena = prepare(model, spec, AdaptSettings(rank=4))
    first = next(iter(arena.layers))
    with torch.no_grad():
        arena.layers[first].v.fill_(0.5)
        arena.layers[first].v[:2] = 0.0
    assert arena.ranks()[first] == 2 and arena.state()[f"{first}.lora_A.weight"].shape[0] == 4
    arena.prune()
    assert arena.state()[f"{first}.lora_A.weight"].shape[0] == 2 and arena.stored_ranks()[first] == 2


def test_unknown_method_is_refused_with_the_choices():
    with pytest.raises(ArenaError, match="dora must be one of zero-shot, linear-probe"):
        AdaptSettings(method="dora")


@pytest.mark.parametrize("method", [m for m in METHODS if m != "zero-shot"])
def test_adapter_file_restores_every_method(method, small_liver, ct_crop, tmp_path):
    """Two steps on three painted liver slices; the saved file on a fresh backbone gives the
    same logits (ARENA: pruned to its active components)."""
    ann_path, paint, _ = small_liver
    ct = sitk.ReadImage(str(ABDOMEN_SMALL / "ct.nii.gz"))
    annotation = find_annotation(paint, LIVER, axis=2)
    settings = AdaptSettings(method=method, steps=2)
    result = fit(ct, annotation, settings, structure="liver")
    layers = list(result.tuning.layers.values())
    with torch.no_grad():
        if method == "arena":  # as the proximal steps do: half a layer and a whole layer off
            for layer in layers:
                layer.v.add_(0.05 * (layer.v == 0))
            layers[0].v[:4] = 0.0
            layers[-1].v.zero_()
        trained = result.tuning.model(ct_crop)
    path = save_adapter(tmp_path / "a.safetensors", result.tuning, {
        "backbone": result.spec.id, "backbone_checksum": result.checksum,
        "settings": settings.to_dict(), "structure": "liver"})
    tensors, meta = read_adapter(path)
    assert meta["method"] == method
    model, spec = load_backbone()
    restored = apply_adapter(model, spec, tensors, meta)
    with torch.no_grad():
        assert torch.allclose(restored.model(ct_crop), trained, atol=1e-5)
    if method == "arena":
        first, *_, last = meta["ranks"]
        assert meta["ranks"][first] == meta["stored_ranks"][first] == 4
        assert meta["ranks"][last] == 0 and last not in meta["stored_ranks"]
        assert tensors[f"{first}.lora_A.weight"].shape[0] == 4
    assert state_checksum(load_backbone()[0]) == result.checksum  # the backbone is untouched


def test_svd_conv3d_equals_peft_svd_conv2d_on_a_flat_kernel():
    """A 1×3×3 Conv3d on a one-slice volume is a 3×3 Conv2d: our Conv3d triplet must give what
    PEFT's SVDConv2d gives with the same A, E, B."""
    from peft import AdaLoraConfig
    from peft.tuners.adalora.layer import SVDConv2d

    torch.manual_seed(0)
    cfg = AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["x"])
    conv2d, conv3d = nn.Conv2d(5, 6, 3, padding=1), nn.Conv3d(5, 6, (1, 3, 3), padding=(0, 1, 1))
    with torch.no_grad():
        conv3d.weight.copy_(conv2d.weight[:, :, None])
        conv3d.bias.copy_(conv2d.bias)
    peft_layer = SVDConv2d(conv2d, "default", config=cfg, r=4, lora_alpha=4)
    ours = _svd_conv3d_class()(conv3d, "default", config=cfg, r=4, lora_alpha=4)
    assert ours.lora_A["default"].shape == (4, 5 * 9)
    with torch.no_grad():
        for name in ("lora_A", "lora_E", "lora_B"):
            torch.nn.init.normal_(getattr(peft_layer, name)["default"])
            getattr(ours, name)["default"].copy_(getattr(peft_layer, name)["default"])
    x = torch.randn(2, 5, 11, 9)
    expected = peft_layer(x)
    assert torch.allclose(ours(x[:, :, None])[:, :, 0], expected, atol=1e-5)
    ours.merge()  # PEFT's merge on our layer: same output, adapter folded into W0
    assert torch.allclose(ours(x[:, :, None])[:, :, 0], expected, atol=1e-5)


class _Toy(nn.Module):
    """Two Linear layers; returns an object with ``.loss`` (the case PEFT's AdaLoRA handles)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 1)

    def forward(self, x, y=None):
        out = self.fc2(torch.relu(self.fc1(x)))
        return SimpleNamespace(logits=out, loss=None if y is None else ((out - y) ** 2).mean())


def test_adalora_penalty_and_budget_match_peft():
    """Same toy network, same initial triplets, same data: our penalty equals what PEFT adds to
    ``.loss``, and our budget driver (:meth:`AdaLoRA.after_step`) masks exactly the singular
    values PEFT's ``update_and_allocate`` masks, step after step."""
    from peft import AdaLoraConfig, get_peft_model

    from arenaseg.methods import AdaLoRA, _inject_adalora

    steps = 12
    torch.manual_seed(0)
    toy = _Toy()
    ours_model = _Toy()
    ours_model.load_state_dict(toy.state_dict())
    cfg = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=4, total_step=steps, tinit=1, tfinal=2,
                        deltaT=1, target_modules=["fc1", "fc2"])
    peft_model = get_peft_model(toy, cfg)
    layers, allocator, orth = _inject_adalora(ours_model, ["fc1", "fc2"], {"fc1": 4, "fc2": 4}, steps)
    for name, p in ours_model.named_parameters():  # as PEFT: only the triplets train
        p.requires_grad_(".lora_" in name and "ranknum" not in name)
    tuning = AdaLoRA(ours_model, head=nn.Identity(), layers=layers, allocator=allocator,
                     orth_weight=orth)
    with torch.no_grad():  # PEFT's triplets into ours
        for name, layer in layers.items():
            twin = peft_model.base_model.model.get_submodule(name)
            for key in ("lora_A", "lora_E", "lora_B"):
                getattr(layer, key)["default"].copy_(getattr(twin, key)["default"])
    ours_cfg = allocator.peft_config
    assert (ours_cfg.tinit, ours_cfg.tfinal, ours_cfg.total_step, ours_cfg.target_r) == (1, 2, steps, 2)
    opt_peft = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    opt_ours = torch.optim.SGD(tuning.parameters(), lr=0.1)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    for step in range(1, steps + 1):
        out = peft_model.base_model(x, y)  # AdaLoraModel.forward adds the penalty to .loss
        ours = ours_model(x, y).loss + tuning.penalty()
        assert torch.allclose(out.loss, ours, atol=1e-5)
        for opt, loss in ((opt_peft, out.loss), (opt_ours, ours)):
            opt.zero_grad()
            loss.backward()
            opt.step()
        peft_model.base_model.update_and_allocate(step)
        tuning.after_step(step, 0.1, None)
        for name, layer in layers.items():
            twin = peft_model.base_model.model.get_submodule(name)
            assert torch.equal(layer.lora_E["default"] == 0, twin.lora_E["default"] == 0)
    assert sum(tuning.ranks().values()) == 2 * 2  # the final budget: target_r per layer


def test_orthogonality_penalty_is_zero_for_orthonormal_triplets():
    model = nn.Sequential(OrderedDict(fc=nn.Linear(6, 6)))
    from arenaseg.methods import _inject_adalora

    layers, _, _ = _inject_adalora(model, ["fc"], {"fc": 3}, steps=10)
    q = torch.linalg.qr(torch.randn(6, 6))[0]
    with torch.no_grad():
        layers["fc"].lora_A["default"].copy_(q[:3])
        layers["fc"].lora_B["default"].copy_(q[:, :3])
    assert orthogonality_penalty(model, 0.5).detach().item() == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        layers["fc"].lora_A["default"].mul_(2)  # AAᵀ = 4I: ‖3I‖_F = 3√3 → mean over A, B
    assert orthogonality_penalty(model, 0.5).detach().item() == pytest.approx(0.5 * 3 * np.sqrt(3) / 2, rel=1e-4)


def test_cli_adalora_adapter_segments_another_scan(tmp_path, small_liver):
    """AdaLoRA through the command line, saved, then applied by ``arenaseg segment``."""
    import subprocess
    import sys

    ann_path, _, _ = small_liver
    seg, adapter, other = tmp_path / "seg.nii.gz", tmp_path / "a.safetensors", tmp_path / "other.nii.gz"
    base = [sys.executable, "-m", "arenaseg"]
    done = subprocess.run(base + ["adapt", "--image", str(ABDOMEN_SMALL / "ct.nii.gz"),
                                  "--annotations", str(ann_path), "--label", str(LIVER),
                                  "--structure", "liver", "--method", "adalora", "--steps", "3",
                                  "--out", str(seg), "--adapter-out", str(adapter), "--device", "cpu"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "adalora: effective rank" in done.stdout and "zero-shot Dice" in done.stdout
    done = subprocess.run(base + ["segment", "--image", str(ABDOMEN_SMALL / "ct.nii.gz"),
                                  "--adapter", str(adapter), "--out", str(other), "--device", "cpu"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (read_ijk(other) == LIVER).sum() > 1000
