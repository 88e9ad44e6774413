"""Pretrained 3D CT segmentation backbones: a registry of specs and their loading.

A backbone spec says how to build the network (MONAI, or a small module written here), how to
preprocess a CT for it, what its output channels mean, which module is its head, which modules
ARENA adapts by default, which modules form its decoder, and where its public weights come from
(URLs, hashes, licence, citation, and how the checkpoint's keys map onto the network).

``load_backbone("fseft-swinunetr")`` downloads the weights once into the cache
(``$ARENASEG_CACHE/backbones``, default ``~/.cache/arenaseg/backbones``), verifies and loads them
strictly; ``load_backbone("fseft-swinunetr", weights="fseft.pth")`` uses a local file instead
(firewalled machines).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ArenaError

BASE_ORGANS = ("spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach",
               "pancreas", "duodenum", "aorta")

#: The 29 output channels of the FSEFT foundation model, in order (channel i = template index
#: i + 1; no background channel, one sigmoid per channel). Source: ``UNIVERSAL_TEMPLATE`` in
#: github.com/jusiro/fewshot-finetuning ``pretrain/datasets/templates.py``, with its short names
#: (rkidney, gall, postcava, psv, …) written as TotalSegmentator names.
FSEFT_CLASSES = (
    "spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach",
    "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas",
    "adrenal_gland_right", "adrenal_gland_left", "duodenum", "urinary_bladder",
    "prostate_or_uterus", "liver_tumor", "kidney_tumor", "kidney_cyst", "celiac_trunk",
    "lung_right", "lung_left", "bone", "brain", "lung_tumor", "pancreas_tumor", "hepatic_vessel",
    "hepatic_vessel_tumor", "colon_tumor")

#: BTCV's 13 organs after background (MONAI bundle ``swin_unetr_btcv_segmentation`` metadata).
BTCV_CLASSES = ("background", "spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus",
                "liver", "stomach", "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein",
                "pancreas", "adrenal_gland_right", "adrenal_gland_left")

#: TotalSegmentator v1's 104 structures after background (MONAI bundle
#: ``wholeBody_ct_segmentation`` ``configs/metadata.json`` ``channel_def``).
WHOLEBODY_CLASSES = (
    ("background", "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach",
     "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas",
     "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left",
     "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right")
    + tuple(f"vertebrae_{v}" for v in ("L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9",
                                       "T8", "T7", "T6", "T5", "T4", "T3", "T2", "T1", "C7", "C6",
                                       "C5", "C4", "C3", "C2", "C1"))
    + ("esophagus", "trachea", "heart_myocardium", "heart_atrium_left", "heart_ventricle_left",
       "heart_atrium_right", "heart_ventricle_right", "pulmonary_artery", "brain",
       "iliac_artery_left", "iliac_artery_right", "iliac_vena_left", "iliac_vena_right",
       "small_bowel", "duodenum", "colon")
    + tuple(f"rib_{side}_{i}" for side in ("left", "right") for i in range(1, 13))
    + ("humerus_left", "humerus_right", "scapula_left", "scapula_right", "clavicula_left",
       "clavicula_right", "femur_left", "femur_right", "hip_left", "hip_right", "sacrum", "face",
       "gluteus_maximus_left", "gluteus_maximus_right", "gluteus_medius_left",
       "gluteus_medius_right", "gluteus_minimus_left", "gluteus_minimus_right",
       "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right",
       "urinary_bladder"))


@dataclass(frozen=True)
class Preprocessing:
    """How a CT is brought onto a backbone's canonical grid (MONAI transforms).

    Attributes:
        orientation: axis codes of the canonical grid (MONAI ``Orientation``), e.g. ``"RAS"``.
        spacing_mm: canonical voxel spacing in mm (MONAI ``Spacing``, trilinear).
        hu_window: HU range clipped and scaled linearly to [0, 1] (``ScaleIntensityRange``);
            None when ``intensity`` is not ``"window"``.
        roi_size: network input size in voxels for training crops and sliding-window inference.
        intensity: ``"window"`` (clip ``hu_window``, scale to [0, 1]) or ``"nonzero-zscore-minmax"``
            (MONAI ``NormalizeIntensity(nonzero=True)`` then ``ScaleIntensity(-1, 1)``, the
            ``wholeBody_ct_segmentation`` bundle's scaling); see :meth:`intensity_transform`.
    """

    orientation: str = "RAS"
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    hu_window: tuple[float, float] | None = (-175.0, 250.0)
    roi_size: tuple[int, int, int] = (96, 96, 96)
    intensity: str = "window"

    def to_dict(self) -> dict:
        return asdict(self)

    def intensity_transform(self) -> Callable:
        """The MONAI transform that scales a regridded CT (HU) for this backbone: a callable on a
        ``(1, X, Y, Z)`` tensor."""
        from monai.transforms import Compose, NormalizeIntensity, ScaleIntensity, ScaleIntensityRange

        if self.intensity == "window":
            lo, hi = self.hu_window
            return ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
        if self.intensity == "nonzero-zscore-minmax":
            return Compose([NormalizeIntensity(nonzero=True), ScaleIntensity(minv=-1.0, maxv=1.0)])
        raise ValueError(f"unknown intensity scaling '{self.intensity}'")


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's public checkpoint comes from and how its keys map onto the network.

    Attributes:
        filename: name of the file in the cache (``<cache>/backbones/<filename>``).
        urls: download URLs, tried in order (empty: manual download only).
        sha256: published or confirmed SHA-256, or None when it could not be confirmed; then the
            hash a user gets is recorded at the first download and checked afterwards.
        md5: a hash published by the source (MONAI bundles publish MD5), checked when given.
        size: size in bytes when known.
        key_rules: ``(regex, replacement)`` rules turning the file's keys into the network's
            (replacement None drops the key: pretext heads, text encoders).
        reinit: regexes of network keys the file deliberately lacks (new decoder or head).
        licence, citation, homepage: for the registry table and the user.
        notes: what could not be confirmed, caveats.
    """

    filename: str
    urls: tuple[str, ...]
    sha256: str | None
    licence: str
    citation: str
    homepage: str
    key_rules: tuple[tuple[str, str | None], ...] = ()
    reinit: tuple[str, ...] = ()
    md5: str | None = None
    size: int | None = None
    notes: str = ""


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: its network, preprocessing, output classes, head and adapter targets.

    Attributes:
        id: registry name, stored in every adapter made on it.
        build: returns the untrained network; keyword overrides (e.g. ``feature_size``) allowed.
        classes: names of the pretrained output channels. With ``multilabel=False`` channel 0 is
            background (softmax head); with ``multilabel=True`` every channel is an independent
            sigmoid. Empty when the checkpoint's head is not carried over (new head).
        head: module name of the output 1×1×1 convolution, replaced by a new head to adapt.
        targets: regular expressions on module names; matching Linear/Conv3d layers get adapters.
        preprocessing: see :class:`Preprocessing`.
        weights: file name of embedded weights inside ``arenaseg/weights`` (None: none embedded).
        architecture: the network in words, with its constructor settings.
        decoder: regexes (``re.search``) matching the decoder's module and parameter names
            (trainable when the decoder is trained, frozen otherwise); empty for the embedded
            UNet, whose decoder is part of ``features``.
        extra_targets: optional further adapter targets (e.g. attention ``proj`` and MLP).
        multilabel: the pretrained head has one sigmoid per channel and no background channel.
        source: the downloadable public checkpoint (None: embedded or untrained).
        checkpointing: the network supports gradient checkpointing (``use_checkpoint``).
        notes: caveats for the user.
    """

    id: str
    build: Callable[..., nn.Module]
    classes: tuple[str, ...]
    head: str
    targets: tuple[str, ...]
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    weights: str | None = None
    architecture: str = ""
    decoder: tuple[str, ...] = ()
    extra_targets: tuple[str, ...] = ()
    multilabel: bool = False
    source: WeightsSource | None = None
    checkpointing: bool = False
    notes: str = ""

    def pretrained_channel(self, structure: str | None) -> int | None:
        """Output channel of ``structure`` in the pretrained head, or None when it is new.

        Names match regardless of case, spaces and hyphens, as users and Slicer segments write
        them ("Urinary bladder" is ``urinary_bladder``).
        """
        keys = [_name_key(c) for c in self.classes]
        if structure is None or _name_key(structure) not in keys:
            return None
        c = keys.index(_name_key(structure))
        return None if (c == 0 and not self.multilabel) else c


def _name_key(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


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


def swin_unetr(out_channels: int = 29, feature_size: int = 48, use_checkpoint: bool = False) -> nn.Module:
    """The paper's backbone: MONAI ``SwinUNETR`` (depths 2,2,2,2; heads 3,6,12,24; window 7;
    instance norm; ``normalize=True``; qkv bias; 62 M parameters at feature size 48).
    Input ``(B, 1, X, Y, Z)``, sizes divisible by 32; output ``(B, out_channels, X, Y, Z)``; head
    ``out.conv.conv``. ``use_checkpoint``: gradient checkpointing in the Swin blocks."""
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(in_channels=1, out_channels=out_channels, feature_size=feature_size,
                     depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), norm_name="instance",
                     normalize=True, qkv_bias=True, spatial_dims=3, use_checkpoint=use_checkpoint)


def wholebody_segresnet(out_channels: int = 105) -> nn.Module:
    """MONAI ``SegResNet`` as in the ``wholeBody_ct_segmentation`` bundle (init filters 32, blocks
    down 1,2,2,4, up 1,1,1, dropout 0.2, group norm). Input ``(B, 1, X, Y, Z)``, sizes divisible
    by 8; head ``conv_final.2.conv``."""
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=3, in_channels=1, out_channels=out_channels, init_filters=32,
                     blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), dropout_prob=0.2)


class BatchStatNorm3d(nn.BatchNorm3d):
    """Batch norm that always normalises with the statistics of the current batch, as SuPreM's
    ``ContBatchNorm3d`` does, but never updates its running buffers (so a frozen backbone's
    weights, and their checksum, stay exactly as loaded)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class _LUConv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, kernel_size=3, padding=1)
        self.bn1 = BatchStatNorm3d(cout)
        self.activation = nn.ReLU()

    def forward(self, x):
        return self.activation(self.bn1(self.conv1(x)))


class _Down(nn.Module):
    def __init__(self, cin: int, depth: int):
        super().__init__()
        width = 32 * 2 ** depth
        self.ops = nn.Sequential(_LUConv(cin, width), _LUConv(width, 2 * width))
        self.pool = depth < 3

    def forward(self, x):
        skip = self.ops(x)
        return (F.max_pool3d(skip, 2) if self.pool else skip), skip


class _Up(nn.Module):
    def __init__(self, cin: int, depth: int):
        super().__init__()
        width = 32 * 2 ** (depth + 1)
        self.up_conv = nn.ConvTranspose3d(cin, cin, kernel_size=2, stride=2)
        self.ops = nn.Sequential(_LUConv(cin + cin // 2, width), _LUConv(width, width))

    def forward(self, x, skip):
        return self.ops(torch.cat((self.up_conv(x), skip), 1))


class SupremUNet3D(nn.Module):
    """The 3D U-Net of SuPreM / Models Genesis (19 M parameters), written here with the module
    names of SuPreM's ``backbone/unet.py`` (``down_tr64`` … ``up_tr64``, ``ops.N.conv1``,
    ``ops.N.bn1``) so that its checkpoints load key for key; then a 1×1×1 ``classifier`` (new).

    Input ``(B, 1, X, Y, Z)``, sizes divisible by 8; output ``(B, out_channels, X, Y, Z)``.
    """

    def __init__(self, out_channels: int = 1):
        super().__init__()
        self.down_tr64, self.down_tr128 = _Down(1, 0), _Down(64, 1)
        self.down_tr256, self.down_tr512 = _Down(128, 2), _Down(256, 3)
        self.up_tr256, self.up_tr128, self.up_tr64 = _Up(512, 2), _Up(256, 1), _Up(128, 0)
        self.classifier = nn.Conv3d(64, out_channels, kernel_size=1)

    def forward(self, x):
        x, s64 = self.down_tr64(x)
        x, s128 = self.down_tr128(x)
        x, s256 = self.down_tr256(x)
        x, _ = self.down_tr512(x)
        x = self.up_tr64(self.up_tr128(self.up_tr256(x, s256), s128), s64)
        return self.classifier(x)


SWIN_ARCH = ("MONAI SwinUNETR: feature_size 48, depths (2,2,2,2), heads (3,6,12,24), window 7, "
             "instance norm, normalize=True, qkv_bias=True, in_channels 1")
SWIN_TARGETS = (r"attn\.qkv$",)
SWIN_EXTRA_TARGETS = (r"attn\.proj$", r"mlp\.linear[12]$")
#: The decoder of SwinUNETR as the FSEFT code fine-tunes it: the decoder blocks and the
#: convolutional encoder/bottleneck blocks between the Swin stages and the decoder.
SWIN_DECODER = (r"^decoder\d+\b", r"^encoder\d+\b")
PAPER_PREP = Preprocessing(spacing_mm=(1.5, 1.5, 1.5))
UNIVERSAL_HEADS = r"^(precls_conv|GAP|controller|text_to_vision|organ_embedding)\b"

FSEFT_CITATION = ("Silva-Rodríguez, Dolz, Ben Ayed. Towards foundation models and few-shot "
                  "parameter-efficient fine-tuning for volumetric organ segmentation. Medical "
                  "Image Analysis 103:103596, 2025")
TANG_CITATION = ("Tang et al. Self-supervised pre-training of Swin transformers for 3D medical "
                 "image analysis. CVPR 2022")
SUPREM_CITATION = ("Li, Yuille, Zhou. How well do supervised 3D models transfer to medical imaging "
                   "tasks? ICLR 2024 (SuPreM)")
CLIP_CITATION = ("Liu et al. CLIP-driven universal model for organ segmentation and tumor "
                 "detection. ICCV 2023")
HF_SUPREM = "https://huggingface.co/MrGiovanni/SuPreM/resolve/main/"
NVIDIA_ZOO = "https://developer.download.nvidia.com/assets/Clara/monai/tutorials/model_zoo/"
EXTRA_TEST_DATA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
SHA_UNCONFIRMED = "SHA-256 not published; the hash obtained at the first download is recorded. "


#: A SwinUNETR whose pretrained weights stop before the head: a one-channel head is trained anew.
NEW_HEAD_SWIN = dict(build=partial(swin_unetr, out_channels=1), classes=(), head="out.conv.conv",
                     targets=SWIN_TARGETS, preprocessing=PAPER_PREP, decoder=SWIN_DECODER,
                     extra_targets=SWIN_EXTRA_TARGETS, checkpointing=True)

#: The SwinUNETR fine-tuned on BTCV, shared by the research-contributions file and the MONAI bundle.
BTCV_SWIN = dict(build=partial(swin_unetr, out_channels=14), classes=BTCV_CLASSES,
                 head="out.conv.conv", targets=SWIN_TARGETS,
                 preprocessing=Preprocessing(spacing_mm=(1.5, 1.5, 2.0)),
                 architecture=SWIN_ARCH + "; 14 softmax output channels (BTCV)",
                 decoder=SWIN_DECODER, extra_targets=SWIN_EXTRA_TARGETS, checkpointing=True)


def _universal(filename: str, citation: str, homepage: str, reinit: tuple[str, ...],
               backbone_rules=()) -> WeightsSource:
    """A CLIP-driven 'universal model' checkpoint (SuPreM's ``{"net": …}``): its segmentation
    backbone is loaded; its text-driven dynamic head is not carried over (new head)."""
    return WeightsSource(
        filename=filename, urls=(HF_SUPREM + filename + "?download=true",), sha256=None,
        licence="CC BY-NC-ND 4.0 (non-commercial)", citation=citation, homepage=homepage,
        key_rules=((r"^module\.", ""), (UNIVERSAL_HEADS, None), (r"^backbone\.", ""))
        + tuple(backbone_rules), reinit=reinit,
        notes=SHA_UNCONFIRMED + "Layout inferred from the SuPreM code (Universal_model saved as "
              "{'net': state_dict}); the text-driven head (precls_conv, GAP, controller, "
              "text_to_vision, organ_embedding) is dropped and a new head is trained.")


REGISTRY: dict[str, BackboneSpec] = {
    spec.id: spec for spec in (
        BackboneSpec(
            id="arena-small-ct-unet",
            build=small_ct_unet,
            classes=("background",) + BASE_ORGANS,
            head="classifier",
            targets=(r"^features\..*conv\.unit0\.conv$",),
            weights="arena-small-ct-unet.safetensors",
            architecture="MONAI UNet (channels 16-256, strides 2, 1 residual unit) + PReLU + "
                         "1×1×1 classifier; 2.5 M parameters",
        ),
        BackboneSpec(
            id="swinunetr",
            build=swin_unetr,
            classes=("background",) + tuple(f"class_{i}" for i in range(1, 29)),
            head="out.conv.conv",
            targets=SWIN_TARGETS,
            preprocessing=PAPER_PREP,
            architecture=SWIN_ARCH + "; 29 output channels",
            decoder=SWIN_DECODER, extra_targets=SWIN_EXTRA_TARGETS, checkpointing=True,
            notes="untrained (fixed seed): for timing and tests; use fseft-swinunetr for the "
                  "paper's pretrained weights",
        ),
        BackboneSpec(
            id="fseft-swinunetr",
            build=partial(swin_unetr, out_channels=29),
            classes=FSEFT_CLASSES, multilabel=True,
            head="out.conv.conv",
            targets=SWIN_TARGETS,
            preprocessing=PAPER_PREP,
            architecture=SWIN_ARCH + "; 29 sigmoid output channels (universal template)",
            decoder=SWIN_DECODER, extra_targets=SWIN_EXTRA_TARGETS, checkpointing=True,
            source=WeightsSource(
                filename="fseft.pth",
                urls=("https://drive.google.com/uc?export=download&confirm=t"
                      "&id=18yLNxmWGnVifQNeYYwyyu56Cg4tWV9aW",),
                sha256=None,
                licence="not stated (the fewshot-finetuning repository has no licence file)",
                citation=FSEFT_CITATION,
                homepage="https://github.com/jusiro/fewshot-finetuning",
                key_rules=((r"^module\.", ""), (r"^backbone\.", ""), (r"swin_vit", "swinViT"),
                           (r"^classifier\.", "out.conv.conv.")),
                notes=SHA_UNCONFIRMED + "Published as a Google Drive link (README of "
                      "jusiro/fewshot-finetuning); Drive may answer with a confirmation page, "
                      "then download by hand. Layout from main_pretrain.py (DDP state dict, "
                      "'module.' prefix, head 'classifier').",
            ),
        ),
        BackboneSpec(
            id="monai-ssl-swinvit",
            **NEW_HEAD_SWIN,
            architecture=SWIN_ARCH + "; self-supervised Swin encoder, decoder and head new",
            source=WeightsSource(
                filename="model_swinvit.pt",
                urls=(EXTRA_TEST_DATA + "model_swinvit.pt",),
                sha256=None, licence="Apache-2.0 (MONAI research-contributions)",
                citation=TANG_CITATION,
                homepage="https://github.com/Project-MONAI/research-contributions/tree/main/"
                         "SwinUNETR/Pretrain",
                key_rules=((r"^module\.", ""), (r"^(rotation_|contrastive_|conv\.)", None),
                           (r"^(?!swinViT\.)", "swinViT."), (r"\.mlp\.fc(\d)", r".mlp.linear\1")),
                reinit=(r"^(?!swinViT\.)",),
                notes=SHA_UNCONFIRMED + "Layout from MONAI SwinUNETR.load_from ({'state_dict': "
                      "{'module.layers1.0.blocks.0.mlp.fc1.weight', …}}). The encoder was "
                      "pretrained on 1.5×1.5×2 mm, HU [−1000, 1000]; the paper's preprocessing "
                      "is used since the decoder is trained anew.",
            ),
            notes="decoder and head start untrained (fixed seed): train the decoder "
                  "(--train-decoder) with this backbone",
        ),
        BackboneSpec(
            id="swinunetr-btcv",
            **BTCV_SWIN,
            source=WeightsSource(
                filename="swin_unetr.base_5000ep_f48_lr2e-4_pretrained.pt",
                urls=(EXTRA_TEST_DATA + "swin_unetr.base_5000ep_f48_lr2e-4_pretrained.pt",),
                sha256=None, licence="Apache-2.0 (MONAI research-contributions)",
                citation=TANG_CITATION,
                homepage="https://github.com/Project-MONAI/research-contributions/tree/main/"
                         "SwinUNETR/BTCV",
                key_rules=((r"^module\.", ""), (r"swin_vit", "swinViT")),
                notes=SHA_UNCONFIRMED + "Swin UNETR/Base fine-tuned on BTCV (SwinUNETR/BTCV "
                      "README); layout {'epoch', 'best_acc', 'state_dict'} from its trainer.py.",
            ),
        ),
        BackboneSpec(
            id="suprem-swinunetr",
            **NEW_HEAD_SWIN,
            architecture=SWIN_ARCH + "; SuPreM supervised backbone, head new",
            source=_universal("supervised_suprem_swinunetr_2100.pth", SUPREM_CITATION,
                              "https://github.com/MrGiovanni/SuPreM", reinit=(r"^out\.",)),
        ),
        BackboneSpec(
            id="clipdriven-swinunetr",
            **NEW_HEAD_SWIN,
            architecture=SWIN_ARCH + "; CLIP-driven universal model's backbone, head new",
            source=_universal("supervised_clip_driven_universal_swin_unetr_2100.pth",
                              CLIP_CITATION, "https://github.com/ljwztc/CLIP-Driven-Universal-Model",
                              reinit=(r"^out\.",), backbone_rules=((r"^out\.", None),)),
        ),
        BackboneSpec(
            id="suprem-unet",
            build=SupremUNet3D,
            classes=(),
            head="classifier",
            targets=(r"^down_tr\d+\.ops\.\d+\.conv1$",),
            preprocessing=PAPER_PREP,
            architecture="SuPreM 3D U-Net (Models Genesis layout, 64-512 channels, batch-"
                         "statistics norm), 19 M parameters; head new",
            decoder=(r"^up_tr\d+\b",),
            source=_universal("supervised_suprem_unet_2100.pth", SUPREM_CITATION,
                              "https://github.com/MrGiovanni/SuPreM", reinit=(r"^classifier\.",),
                              backbone_rules=((r"^out_tr\.", None),)),
        ),
        BackboneSpec(
            id="monai-bundle-swin-unetr-btcv",
            **BTCV_SWIN,
            source=WeightsSource(
                filename="model_swin_unetr_btcv_segmentation_v1.pt",
                urls=(NVIDIA_ZOO + "model_swin_unetr_btcv_segmentation_v1.pt",),
                sha256=None, md5="50dd67a01b28a1d5487fd9ac27e682fb",
                licence="Apache-2.0 (bundle); BTCV data terms in the bundle's data_license.txt",
                citation="MONAI Model Zoo, swin_unetr_btcv_segmentation 0.5.6; " + TANG_CITATION,
                homepage="https://github.com/Project-MONAI/model-zoo/tree/dev/models/"
                         "swin_unetr_btcv_segmentation",
                key_rules=((r"^module\.", ""),),
                notes="MD5 from the bundle's large_files.yml; " + SHA_UNCONFIRMED
                      + "models/model.pt is a raw state dict.",
            ),
        ),
        BackboneSpec(
            id="monai-bundle-wholebody-ct",
            build=wholebody_segresnet,
            classes=WHOLEBODY_CLASSES,
            head="conv_final.2.conv",
            targets=(r"^down_layers\.\d+\.\d+\.conv[12]\.conv$",),
            preprocessing=Preprocessing(spacing_mm=(1.5, 1.5, 1.5), hu_window=None,
                                        intensity="nonzero-zscore-minmax"),
            architecture="MONAI SegResNet: init_filters 32, blocks_down (1,2,2,4), blocks_up "
                         "(1,1,1), dropout 0.2, group norm; 105 softmax channels; 18.8 M parameters",
            decoder=(r"^up_layers\b", r"^up_samples\b", r"^conv_final\.[01]\b"),
            source=WeightsSource(
                filename="model_wholebody_ct_segmentation.pt",
                urls=(NVIDIA_ZOO + "model_wholebody_ct_segmentation.pt",),
                sha256=None, md5="aded45dea52f9c00b37922bcd0a98502",
                licence="Apache-2.0 (bundle); TotalSegmentator data CC BY 4.0",
                citation="MONAI Model Zoo, wholeBody_ct_segmentation 0.2.5; Wasserthal et al., "
                         "TotalSegmentator, Radiology: AI 2023",
                homepage="https://github.com/Project-MONAI/model-zoo/tree/dev/models/"
                         "wholeBody_ct_segmentation",
                key_rules=((r"^module\.", ""),),
                notes="MD5 from the bundle's large_files.yml; " + SHA_UNCONFIRMED,
            ),
        ),
        BackboneSpec(
            id="monai-bundle-wholebody-ct-lowres",
            build=wholebody_segresnet,
            classes=WHOLEBODY_CLASSES,
            head="conv_final.2.conv",
            targets=(r"^down_layers\.\d+\.\d+\.conv[12]\.conv$",),
            preprocessing=Preprocessing(spacing_mm=(3.0, 3.0, 3.0), hu_window=None,
                                        intensity="nonzero-zscore-minmax"),
            architecture="MONAI SegResNet as monai-bundle-wholebody-ct, 3 mm model",
            decoder=(r"^up_layers\b", r"^up_samples\b", r"^conv_final\.[01]\b"),
            source=WeightsSource(
                filename="model_lowres_wholebody_ct_segmentation.pt",
                urls=(NVIDIA_ZOO + "model_lowres_wholebody_ct_segmentation.pt",),
                sha256=None, md5="dbdebeae650f4fb5ea7f4ad01e0d2431",
                licence="Apache-2.0 (bundle); TotalSegmentator data CC BY 4.0",
                citation="MONAI Model Zoo, wholeBody_ct_segmentation 0.2.5 (model_lowres.pt)",
                homepage="https://github.com/Project-MONAI/model-zoo/tree/dev/models/"
                         "wholeBody_ct_segmentation",
                key_rules=((r"^module\.", ""),),
                notes="MD5 from the bundle's large_files.yml; " + SHA_UNCONFIRMED,
            ),
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
                         f"{', '.join(sorted(REGISTRY))} (--weights FILE gives a local copy of its "
                         "checkpoint), or give the checkpoint file itself as --backbone") from None


def weights_path(spec: BackboneSpec):
    """Path of the spec's embedded weights file inside the installed package (may not exist)."""
    return resources.files("arenaseg") / "weights" / spec.weights


def cached_weights_path(spec: BackboneSpec) -> Path:
    """Where the spec's downloaded checkpoint lives: ``<cache>/backbones/<filename>``, the cache
    being ``$ARENASEG_CACHE`` or ``~/.cache/arenaseg``. Put a hand-downloaded file there."""
    from .download import cache_dir

    return cache_dir() / "backbones" / spec.source.filename


def spec_for_file(path: str | os.PathLike) -> BackboneSpec:
    """The registry entry whose public checkpoint has this file name (e.g. ``fseft.pth``).

    Raises:
        ArenaError: no entry has that file name (the message lists them).
    """
    name = Path(path).name
    for spec in REGISTRY.values():
        if spec.source is not None and spec.source.filename == name:
            return spec
    known = ", ".join(f"{s.source.filename} ({s.id})" for s in REGISTRY.values() if s.source)
    raise ArenaError(f"cannot tell which backbone '{path}' belongs to from its name: pass "
                     f"--backbone ID with --weights '{path}' (known files: {known})")


def state_checksum(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (sorted names, raw float bytes).

    It identifies the exact backbone weights an adapter was trained on, whatever file they came
    from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _locate_weights(spec: BackboneSpec, download: bool, progress: bool) -> Path:
    from .download import fetch, verify

    src = spec.source
    path = cached_weights_path(spec)
    if path.is_file():
        verify(path, src.sha256, src.md5, src.size)
        return path
    if not download or not src.urls:
        raise ArenaError(f"weights of backbone '{spec.id}' are not in the cache: download "
                         f"{src.urls[0] if src.urls else src.homepage} and put the file at "
                         f"'{path}', or pass it with --weights FILE")
    return fetch(src.urls, path, sha256=src.sha256, md5=src.md5, size=src.size, progress=progress)


def load_backbone(backbone_id: str | os.PathLike = DEFAULT_BACKBONE,
                  weights: str | os.PathLike | None = None, *, use_checkpoint: bool = False,
                  download: bool = True, progress: bool = True,
                  **build_overrides) -> tuple[nn.Module, BackboneSpec]:
    """Build a backbone and load its pretrained weights, frozen and in eval mode.

    Weights come from ``weights`` (a local checkpoint file) when given, else from the embedded
    file (``spec.weights``), else from the spec's public checkpoint: taken from the cache or
    downloaded once (:func:`arenaseg.download.fetch`: resumable, progress bar on stderr,
    checksum, atomic move). The file is read safely (:func:`arenaseg.checkpoints.read_state_dict`),
    its keys renamed by ``spec.source.key_rules`` and loaded strictly
    (:func:`arenaseg.checkpoints.load_strict`): parts listed in ``spec.source.reinit`` keep their
    fixed-seed initialisation. The load report is kept in ``model.load_report`` (None when
    untrained).

    Backbones without weights (none embedded or published, or ``build_overrides`` that change
    the shapes, without ``weights``) are initialised with a fixed seed so that their checksum is
    reproducible.

    Args:
        backbone_id: registry id, or the path of a checkpoint whose file name is a registry
            entry's (e.g. ``fseft.pth``).
        weights: local checkpoint file (``.pt``/``.pth``/``.safetensors``) in the layout of the
            backbone's source; nothing is downloaded then.
        use_checkpoint: gradient checkpointing (SwinUNETR backbones: ``spec.checkpointing``).
        download: allow downloading a missing public checkpoint (False: only the cache).
        progress: show the download progress bar.
        build_overrides: constructor overrides (e.g. ``feature_size=12``).

    Raises:
        ArenaError: unknown id, weights missing or not fitting the network (missing and
            unexpected keys named), download failure (URL and cache path named), checksum
            mismatch, gradient checkpointing asked of a backbone without it.
    """
    if backbone_id not in REGISTRY and (os.sep in str(backbone_id) or Path(backbone_id).is_file()):
        weights = weights or backbone_id
        spec = spec_for_file(backbone_id)
    else:
        spec = get_spec(str(backbone_id))
    if use_checkpoint:
        if not spec.checkpointing:
            raise ArenaError(f"backbone '{spec.id}' does not support gradient checkpointing: drop "
                             "the option or choose one of "
                             f"{', '.join(s.id for s in REGISTRY.values() if s.checkpointing)}")
        build_kwargs = dict(build_overrides, use_checkpoint=True)
    else:
        build_kwargs = dict(build_overrides)
    if "use_checkpoint" in build_kwargs and \
            "use_checkpoint" not in inspect.signature(spec.build).parameters:
        build_kwargs.pop("use_checkpoint")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = spec.build(**build_kwargs)
    report = None
    if weights is not None:
        report = _load_file(model, spec, Path(weights))
    elif spec.weights and not build_overrides:
        path = weights_path(spec)
        if not path.is_file():
            raise ArenaError(f"weights of backbone '{spec.id}' are missing at '{path}': "
                             "reinstall arenaseg, or pass weights of this backbone (e.g. made by "
                             "'arenaseg pretrain') with --weights FILE")
        report = _load_file(model, spec, Path(str(path)), hint="reinstall arenaseg")
    elif spec.source is not None and not build_overrides:
        report = _load_file(model, spec, _locate_weights(spec, download, progress))
    model.load_report = report
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, spec


def _load_file(model: nn.Module, spec: BackboneSpec, path: Path, hint: str | None = None):
    from .checkpoints import load_strict, map_keys, read_state_dict

    state = read_state_dict(path)
    if spec.source is not None:
        state = map_keys(state, spec.source.key_rules)
    try:
        return load_strict(model, state, path, spec.source.reinit if spec.source else ())
    except ArenaError as err:
        if hint is None:
            raise
        raise ArenaError(f"{err}; {hint}") from None


def replace_head(model: nn.Module, spec: BackboneSpec, structure: str | None = None) -> nn.Conv3d:
    """Put a new trainable one-channel 1×1×1 head (logit of the target structure) in place of
    ``spec.head``.

    When ``structure`` is one of the backbone's pretrained classes, the head starts from that
    class's pretrained output row (the paper's protocol for base organs, so the first prediction
    is the backbone's zero-shot one): for a softmax head (``multilabel=False``) the row minus the
    background row (the sigmoid of this difference is the two-class softmax of the pretrained
    head); for a sigmoid head the row itself. Otherwise it starts with PyTorch's default
    initialisation.

    Returns:
        The new head (``in_channels`` → 1).
    """
    old = model.get_submodule(spec.head)
    head = nn.Conv3d(old.in_channels, 1, kernel_size=1).to(old.weight.device)
    c = spec.pretrained_channel(structure)
    if c is not None:
        with torch.no_grad():
            head.weight.copy_(old.weight[c:c + 1])
            head.bias.copy_(old.bias[c:c + 1])
            if not spec.multilabel:
                head.weight.sub_(old.weight[0:1])
                head.bias.sub_(old.bias[0:1])
    parent_name, _, child = spec.head.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, head)
    return head
