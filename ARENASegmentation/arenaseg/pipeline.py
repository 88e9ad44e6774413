"""The two jobs, file in, file out: ``adapt`` (few painted slices → 3D segment + adapter) and
``segment`` (saved adapter → 3D segment of another scan). The command line, the worker and the
Slicer module all call these."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from .adapter_file import apply_adapter, read_adapter, save_adapter
from .annotations import Annotation, dice, find_annotation
from .backbones import DEFAULT_BACKBONE, load_backbone, state_checksum
from .errors import ArenaError
from .imageio import array_ijk, image_like, read_image, read_labels_on, write_image
from .inference import pick_device, sliding_window_logits
from .methods import Tuning, prepare
from .preprocessing import canonical_axis, input_index_to_canonical, to_canonical, to_input_grid
from .training import AdaptSettings, ProgressFn, train

StatusFn = Callable[[str, str], None]
"""``status(phase, message)``: called as each phase starts, ``phase`` one of :data:`PHASES`."""
PHASES = ("reading", "preprocessing", "training", "inference", "writing")


def _quiet(phase: str, message: str) -> None:
    pass

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class AdaptResult:
    """What one adaptation produced and measured."""

    segmentation: str
    adapter: str | None
    method: str
    ranks: dict[str, int]
    initial_rank: int
    trainable_parameters: int
    active_parameters: int
    zero_shot_dice: float | None = None
    loss: list[float] = field(default_factory=list)
    total_rank: list[int] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    slice_axis: int = 2
    painted_slices: tuple[int, ...] = ()

    @property
    def effective_rank(self) -> int:
        return sum(self.ranks.values())

    def to_dict(self) -> dict:
        return dict(asdict(self), effective_rank=self.effective_rank)


def check_output(path, suffixes, what: str, inputs: dict | None = None) -> Path:
    """Refuse an output path before any work: wrong suffix, missing folder, or one of the
    ``inputs`` (name → path), which writing would replace."""
    path = Path(path)
    if not path.name.endswith(tuple(suffixes)):  # SimpleITK knows lower-case extensions only
        raise ArenaError(f"{what} '{path}' has an unsupported extension: use one of "
                         f"{', '.join(suffixes)}")
    if not path.parent.resolve().is_dir():
        raise ArenaError(f"folder of {what} '{path}' does not exist: create it first")
    for name, given in (inputs or {}).items():
        if given and Path(given).resolve() == path.resolve():
            raise ArenaError(f"{what} '{path}' is the {name} file: writing it would replace "
                             "your input; choose another output path")
    return path


def keep_connected(mask: np.ndarray, seeds: np.ndarray | None = None) -> np.ndarray:
    """Keep the connected components of ``mask`` (face connectivity, SimpleITK
    ``ConnectedComponent``) that contain a ``seeds`` voxel, or the largest one without seeds.

    The loss only sees the painted slices, so look-alike tissue far from them (fluid for a
    bladder, muscle for a psoas) is never shown as background; the structure the user painted is
    the region connected to the paint."""
    grid = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(mask, (2, 1, 0))).astype(np.uint8))
    components = array_ijk(sitk.ConnectedComponent(grid))
    if components.max() == 0:
        return mask
    if seeds is not None and seeds.any():
        keep = np.unique(components[seeds & mask])
        keep = keep[keep > 0]
    else:
        keep = [np.argmax(np.bincount(components.ravel())[1:]) + 1]
    return np.isin(components, keep)


@dataclass
class Scan:
    """A CT on its own grid and on the backbone's canonical grid.

    Attributes:
        image: the input CT (HU) with its world geometry.
        x: canonical CT ``(1, X, Y, Z)`` in [0, 1] (:func:`~arenaseg.preprocessing.to_canonical`).
        affine: 4×4 RAS affine of the canonical grid (mm).
    """

    image: sitk.Image
    x: torch.Tensor
    affine: np.ndarray

    @classmethod
    def from_image(cls, image: sitk.Image, spec) -> "Scan":
        return cls(image, *to_canonical(image, spec.preprocessing))


def predict(tuning: Tuning, spec, scan: Scan, device: torch.device, label: int = 1,
            annotation: Annotation | None = None) -> sitk.Image:
    """Segment ``scan`` with the adapted backbone: sliding-window logits, sigmoid > 0.5, back
    onto the input grid; the painted slices are copied from ``annotation``; only the region
    connected to the paint (or the largest one) is kept.

    Returns:
        A labelmap on exactly the input grid, value ``label`` inside the structure."""
    tuning.model.to(device)
    tuning.merge()
    try:
        logits = sliding_window_logits(tuning.model, scan.x, spec.preprocessing.roi_size, device)
    finally:
        tuning.unmerge()
    seg = array_ijk(to_input_grid(torch.sigmoid(logits[0]).numpy(), scan.affine, scan.image)) > 0.5
    if annotation is not None:  # the painted slices are the user's ground truth
        known = annotation.known
        seg[known] = annotation.target[known]
    seg = keep_connected(seg, annotation.target if annotation is not None else None)
    dtype = np.min_scalar_type(label)
    return image_like(seg.astype(dtype) * dtype.type(label), scan.image)


@dataclass
class Fit:
    """An adapted backbone and how it was trained."""

    tuning: Tuning
    spec: object
    scan: Scan
    log: object
    checksum: str
    zero_shot_dice: float | None = None


def fit(scan: Scan | sitk.Image, annotation: Annotation, settings: AdaptSettings,
        backbone: str = DEFAULT_BACKBONE, structure: str | None = None, device: str = "cpu",
        warm: tuple[dict, dict] | None = None, zero_shot: bool = False, weights: str | None = None,
        progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
        status: StatusFn | None = None) -> Fit:
    """Adapt a backbone to ``annotation`` (painted slices on ``scan``'s input grid), in memory.

    Args:
        scan: a :class:`Scan` (or an image, brought to the canonical grid here).
        backbone: registry id (:data:`arenaseg.backbones.REGISTRY`) or a checkpoint path.
        warm: ``(tensors, metadata)`` of an adapter to continue from (its method and ranks).
        weights: local checkpoint file of ``backbone`` (instead of the embedded, cached or
            downloaded one).
        zero_shot: also measure the Dice, on the painted slices, of the backbone's own output
            row for ``structure`` before training (None when the backbone does not know it).

    Raises:
        ArenaError: see :func:`arenaseg.methods.prepare`.
    """
    status = status or _quiet
    dev = pick_device(device)
    model, spec = load_backbone(warm[1]["backbone"] if warm else backbone, weights,
                                use_checkpoint=settings.checkpointing)
    if not isinstance(scan, Scan):
        status("preprocessing", f"resampling onto the backbone's grid ({spec.id})")
        scan = Scan.from_image(scan, spec)
    checksum = state_checksum(model)
    if warm:
        tuning = apply_adapter(model, spec, *warm, source="--warm-start adapter")
    else:
        tuning = prepare(model, spec, settings, structure)
    zero_shot_dice = None
    if zero_shot and spec.pretrained_channel(structure) is not None and not warm:
        seg = array_ijk(predict(tuning, spec, scan, dev)) > 0
        zero_shot_dice = dice(seg, annotation.target, annotation.known)
    points, targets = annotation.points()
    coords = input_index_to_canonical(points, scan.image, scan.affine)
    coords = np.clip(coords, 0, np.asarray(scan.x.shape[1:]) - 1)
    # The seeded crop sampling picks points by index: order them by canonical position (rounded
    # past float noise), not by the input's storage order, so an LPS NRRD, a RAS NIfTI and a
    # flipped copy of the same scan train identically.
    order = np.lexsort(np.round(coords, 3).T[::-1])
    coords, targets = coords[order], targets[order]
    crop = list(spec.preprocessing.roi_size)
    across = canonical_axis(scan.image, annotation.axis, scan.affine)
    crop[across] = min(crop[across], settings.slab)
    status("training", f"training {settings.steps} steps ({tuning.method})")
    log = train(tuning, scan.x, coords, targets, crop, settings, dev,
                progress=progress, should_stop=should_stop)
    return Fit(tuning, spec, scan, log, checksum, zero_shot_dice)


def adapt(image: str, annotations: str, label: int, out: str, adapter_out: str | None = None,
          settings: AdaptSettings | None = None, backbone: str = DEFAULT_BACKBONE,
          slice_axis: int | None = None, structure: str | None = None, device: str = "auto",
          warm_start: str | None = None, background_label: int | None = None,
          weights: str | None = None, progress: ProgressFn | None = None,
          should_stop: Callable[[], bool] | None = None,
          status: StatusFn | None = None) -> AdaptResult:
    """Adapt the backbone to the structure painted on a few slices and segment it in 3D.

    Args:
        image: CT file or DICOM folder (HU).
        annotations: labelmap with the painted slices, on any grid overlapping the image.
        label: label value of the structure in ``annotations``.
        out: segmentation to write (labelmap with value ``label``, exactly on the image grid;
            the painted slices are copied from the annotations).
        adapter_out: adapter file to write (``.safetensors``), optional.
        settings: :class:`AdaptSettings` (method, rank, λ, …); defaults when None.
        slice_axis: voxel axis (0, 1, 2) of the painted slices; None detects it.
        structure: structure name, stored in the adapter; a name the backbone knows starts the
            head from its pretrained output row, and its zero-shot Dice on the painted slices
            is reported.
        warm_start: a previous adapter file to continue from (its method, ranks and weights).
        background_label: optional value in ``annotations`` of voxels known not to be the
            structure (on any slice); they enter the loss as background.
        weights: local checkpoint file of ``backbone`` (e.g. downloaded by hand behind a
            firewall).
        progress: called after each training step with (step, loss, per-layer ranks).
        should_stop: polled every training step; True raises
            :class:`~arenaseg.training.Cancelled`.
        status: ``status(phase, message)`` as each phase (:data:`PHASES`) starts.

    Raises:
        ArenaError: for every input problem (see :mod:`arenaseg.errors`), before writing anything.
    """
    settings = settings or AdaptSettings()
    if label < 1:
        raise ArenaError(f"--label {label} is not a structure: 0 is background; give the "
                         "positive value the structure is painted with")
    out = check_output(out, IMAGE_SUFFIXES, "output segmentation",
                       {"image": image, "annotations": annotations})
    if adapter_out:
        adapter_out = check_output(adapter_out, (".safetensors",), "adapter output")
    status = status or _quiet
    dev = pick_device(device)
    start = time.perf_counter()
    status("reading", f"reading {image}")
    ct = read_image(image, "image")
    labels = read_labels_on(ct, annotations, "annotations")
    annotation = find_annotation(array_ijk(labels), label, slice_axis, str(annotations),
                                 background_label)
    warm = read_adapter(warm_start) if warm_start else None
    if warm:
        for option, given, saved in (("--method", settings.method, warm[1]["method"]),
                                     ("--backbone", str(backbone), warm[1]["backbone"])):
            if given != saved:
                raise ArenaError(f"--warm-start adapter '{warm_start}' was trained with {option} "
                                 f"{saved}, not {given}: give {option} {saved}, or start "
                                 "without --warm-start")
    result = fit(ct, annotation, settings, backbone, structure, dev, warm, zero_shot=True,
                 weights=weights, progress=progress, should_stop=should_stop, status=status)
    tuning, spec = result.tuning, result.spec
    status("inference", "segmenting the whole volume")
    result_image = predict(tuning, spec, result.scan, dev, label, annotation)
    initial = tuning.initial_ranks()
    adapt_result = AdaptResult(
        segmentation=str(out), adapter=str(adapter_out) if adapter_out else None,
        method=tuning.method, ranks=result.log.ranks, initial_rank=sum(initial.values()),
        trainable_parameters=tuning.trainable_parameters(),
        active_parameters=tuning.active_parameters(), zero_shot_dice=result.zero_shot_dice,
        loss=result.log.loss, total_rank=result.log.total_rank,
        seconds=time.perf_counter() - start, device=str(dev), slice_axis=annotation.axis,
        painted_slices=tuple(int(i) for i in annotation.slices))
    status("writing", f"writing {out}" + (f" and {adapter_out}" if adapter_out else ""))
    written = []
    try:  # an interruption while writing removes both files: a cancelled run leaves nothing
        if adapter_out:
            written.append(save_adapter(adapter_out, tuning, {
                "backbone": spec.id, "backbone_checksum": result.checksum,
                "targets": list(tuning.layers), "settings": settings.to_dict(),
                "preprocessing": spec.preprocessing.to_dict(), "structure": structure,
                "label": int(label), "annotated_axis": annotation.axis,
                "annotated_slices": list(annotation.slices), "source_image": str(image)}))
        written.append(write_image(result_image, out))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return adapt_result


def segment(image: str, adapter: str, out: str, device: str = "auto",
            weights: str | None = None, status: StatusFn | None = None) -> dict:
    """Segment ``image`` with a saved adapter (e.g. on a new patient).

    Returns:
        ``{"segmentation", "structure", "label", "ranks", "seconds"}``.

    Raises:
        ArenaError: unreadable image, corrupt adapter, adapter made for another backbone.
    """
    status = status or _quiet
    out = check_output(out, IMAGE_SUFFIXES, "output segmentation", {"image": image})
    dev = pick_device(device)
    start = time.perf_counter()
    status("reading", f"reading {adapter} and {image}")
    tensors, meta = read_adapter(adapter)
    ct = read_image(image, "image")
    model, spec = load_backbone(meta["backbone"], weights)
    tuning = apply_adapter(model, spec, tensors, meta, source=str(adapter))
    status("preprocessing", f"resampling onto the backbone's grid ({spec.id})")
    scan = Scan.from_image(ct, spec)
    status("inference", "segmenting the whole volume")
    result = predict(tuning, spec, scan, dev, meta.get("label", 1))
    status("writing", f"writing {out}")
    write_image(result, out)
    return {"segmentation": str(out), "structure": meta.get("structure"),
            "label": meta.get("label", 1), "ranks": meta["ranks"],
            "seconds": time.perf_counter() - start}
