"""Pretrained 3D CT segmentation backbones: a registry of specs and their loading.

A backbone spec says how to build the network (MONAI), how to preprocess a CT for it, what its
output channels mean, which module is its head and which modules ARENA adapts by default.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Callable

import torch
from torch import nn

from .errors import ArenaError

BASE_ORGANS = ("spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach",
               "pancreas", "duodenum", "aorta")


@dataclass(frozen=True)
class Preprocessing:
    """How a CT is brought onto a backbone's canonical grid (MONAI transforms).

    Attributes:
        orientation: axis codes of the canonical grid (MONAI ``Orientation``), e.g. ``"RAS"``.
        spacing_mm: canonical voxel spacing in mm (MONAI ``Spacing``, trilinear).
        hu_window: HU range clipped and scaled linearly to [0, 1] (``ScaleIntensityRange``).
        roi_size: network input size in voxels for training crops and sliding-window inference.
    """

    orientation: str = "RAS"
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    hu_window: tuple[float, float] = (-175.0, 250.0)
    roi_size: tuple[int, int, int] = (96, 96, 96)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: its network, preprocessing, output classes, head and adapter targets.

    Attributes:
        id: registry name, stored in every adapter made on it.
        build: returns the untrained network; keyword overrides (e.g. ``feature_size``) allowed.
        classes: names of the output channels, channel 0 being background.
        head: module name of the output 1×1×1 convolution, replaced by a new head to adapt.
        targets: regular expressions on module names; matching Linear/Conv3d layers get adapters.
        preprocessing: see :class:`Preprocessing`.
        weights: file name of the pretrained weights inside ``arenaseg/weights`` (None: untrained).
    """

    id: str
    build: Callable[..., nn.Module]
    classes: tuple[str, ...]
    head: str
    targets: tuple[str, ...]
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    weights: str | None = None


def small_ct_unet(out_channels: int = len(BASE_ORGANS) + 1, feature_channels: int = 16) -> nn.Module:
    """The embedded default: a MONAI ``UNet`` (strided residual units, 2.5 M parameters) giving
    ``feature_channels`` features at full resolution, then PReLU and a 1×1×1 ``classifier``.

    Input ``(B, 1, X, Y, Z)`` with sizes divisible by 16; output ``(B, out_channels, X, Y, Z)``.
    """
    from monai.networks.nets import UNet

    return nn.Sequential(OrderedDict(
        features=UNet(spatial_dims=3, in_channels=1, out_channels=feature_channels,
                      channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=1),
        act=nn.PReLU(),
        classifier=nn.Conv3d(feature_channels, out_channels, kernel_size=1),
    ))


def swin_unetr(out_channels: int = 29, feature_size: int = 48) -> nn.Module:
    """The paper's backbone: MONAI ``SwinUNETR`` (depths 2,2,2,2; heads 3,6,12,24; window 7;
    instance norm; ``normalize=True``; qkv bias). Input ``(B, 1, X, Y, Z)``, sizes divisible by 32."""
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(in_channels=1, out_channels=out_channels, feature_size=feature_size,
                     depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), norm_name="instance",
                     normalize=True, qkv_bias=True, spatial_dims=3)


REGISTRY: dict[str, BackboneSpec] = {
    spec.id: spec for spec in (
        BackboneSpec(
            id="arena-small-ct-unet",
            build=small_ct_unet,
            classes=("background",) + BASE_ORGANS,
            head="classifier",
            targets=(r"^features\..*conv\.unit0\.conv$",),
            weights="arena-small-ct-unet.safetensors",
        ),
        BackboneSpec(
            id="swinunetr",
            build=swin_unetr,
            classes=("background",) + tuple(f"class_{i}" for i in range(1, 29)),
            head="out.conv.conv",
            targets=(r"attn\.qkv$",),
            preprocessing=Preprocessing(spacing_mm=(1.5, 1.5, 1.5)),
        ),
    )
}
DEFAULT_BACKBONE = "arena-small-ct-unet"


def get_spec(backbone_id: str) -> BackboneSpec:
    """The registry entry ``backbone_id``; raises :class:`ArenaError` naming the known ids."""
    try:
        return REGISTRY[backbone_id]
    except KeyError:
        raise ArenaError(f"unknown backbone '{backbone_id}': choose one of "
                         f"{', '.join(sorted(REGISTRY))}") from None


def weights_path(spec: BackboneSpec):
    """Path of the spec's weights file inside the installed package (may not exist yet)."""
    return resources.files("arenaseg") / "weights" / spec.weights


def state_checksum(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (sorted names, raw float bytes).

    It identifies the exact backbone weights an adapter was trained on, whatever file they came
    from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_backbone(backbone_id: str = DEFAULT_BACKBONE, **build_overrides) -> tuple[nn.Module, BackboneSpec]:
    """Build a backbone and load its pretrained weights (safetensors) when it ships any.

    Backbones without weights (``weights=None``, or build overrides that change the shapes) are
    initialised with a fixed seed so that their checksum is reproducible.

    Raises:
        ArenaError: unknown id, or the weights file is missing or does not fit the network.
    """
    spec = get_spec(backbone_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = spec.build(**build_overrides)
    if spec.weights and not build_overrides:
        from safetensors.torch import load_file

        path = weights_path(spec)
        if not path.is_file():
            raise ArenaError(f"weights of backbone '{spec.id}' are missing at '{path}': "
                             "reinstall arenaseg or run 'arenaseg pretrain'")
        try:
            model.load_state_dict(load_file(str(path)), strict=True)
        except (RuntimeError, OSError) as err:
            raise ArenaError(f"weights '{path}' do not fit backbone '{spec.id}' ({err}); "
                             "reinstall arenaseg") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, spec


def replace_head(model: nn.Module, spec: BackboneSpec, structure: str | None = None) -> nn.Conv3d:
    """Put a new trainable one-channel 1×1×1 head (logit of the target structure) in place of
    ``spec.head``.

    When ``structure`` is one of the backbone's classes, the head starts from that class's
    pretrained row minus the background row (the paper's protocol for base organs: the sigmoid
    of this difference is the two-class softmax of the pretrained head); otherwise it starts
    with PyTorch's default initialisation.

    Returns:
        The new head (``in_channels`` → 1).
    """
    old = model.get_submodule(spec.head)
    head = nn.Conv3d(old.in_channels, 1, kernel_size=1).to(old.weight.device)
    if structure in spec.classes[1:]:
        c = spec.classes.index(structure)
        with torch.no_grad():
            head.weight.copy_(old.weight[c:c + 1] - old.weight[0:1])
            head.bias.copy_(old.bias[c:c + 1] - old.bias[0:1])
    parent_name, _, child = spec.head.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, head)
    return head
