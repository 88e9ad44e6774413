"""The two jobs, file in, file out: ``adapt`` (few painted slices → 3D segment + adapter) and
``segment`` (saved adapter → 3D segment of another scan). The command line, the worker and the
Slicer module all call these."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .adapter_file import apply_adapter, check_backbone, read_adapter, save_adapter
from .io.annotations import Annotation, dice, find_annotation, interpolate
from .backbones import DEFAULT_BACKBONE, get_spec, load_backbone, state_checksum
from .errors import ArenaError
from .io.checks import backbone_preprocessing, check_extent, check_intensities, check_paint, describe
from .io.geometry import array_ijk
from .io.images import read_image, write_image
from .io.labels import painted_points, read_labels_on, resolve_label
from .inference import StatusFn, input_probability, pick_device, predict
from .io.outputs import Outputs, check_name_length, check_writable
from .methods import METHOD_CLASSES, Method, prepare
from .reading import painted_reading, read_as_structure
from .self_training import pseudo_labels, round_steps
from .preprocessing import Scan  # noqa: F401 (the geometry object; public here too)
from .config import AdaptSettings
from .training import train

#: ``progress(step, steps, loss, ranks)`` after each optimizer step: the step (1-based) of
#: ``steps`` in all (self-training rounds included), its loss, and the per-layer effective ranks.
ProgressFn = Callable[[int, int, float, dict], None]

PHASES = ("reading", "downloading", "preprocessing", "training", "inference", "writing")


def _quiet(phase: str, message: str, done: int | None = None, total: int | None = None) -> None:
    pass


def _downloading(status: StatusFn):
    """Download progress of a public backbone's weights as ``downloading`` status (the worker's
    ``phase`` events with bytes ``done`` of ``total``; the command line shows the download's
    own bar)."""
    return lambda done, total: status("downloading", "downloading the backbone's weights", done, total)


def _warner(status: StatusFn):
    """Input warnings as ``warning:`` lines of the reading phase (CLI: stderr; worker: a
    ``warning`` event)."""
    return lambda message: status("reading", f"warning: {message}")

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class AdaptResult:
    """What one adaptation produced and measured.

    ``objects`` and ``volume_ml`` describe the result: the connected objects that touch the
    paint. ``removed_objects`` and ``removed_ml`` are what the adapted backbone also predicted,
    away from the paint, and post-processing removed: its false positives on this scan.
    ``profile`` is how the frozen backbone reads the painted structure (class → share, see
    :func:`~arenaseg.postprocessing.profile`), saved in the adapter for ``segment``.
    ``next_slice`` is the unpainted slice (index along ``slice_axis``) where the adapted
    backbone is least sure: the one to paint next (None when it is sure on every unpainted
    slice near the result).
    ``training_parts`` is the training's wall time by part (seconds; see
    :attr:`~arenaseg.training.TrainingLog.parts`).
    """

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
    objects: int = 0
    volume_ml: float = 0.0
    removed_objects: int = 0
    removed_ml: float = 0.0
    profile: dict[str, float] = field(default_factory=dict)
    training_parts: dict[str, float] = field(default_factory=dict)
    next_slice: int | None = None

    @property
    def effective_rank(self) -> int:
        return sum(self.ranks.values())

    def to_dict(self) -> dict:
        return dict(asdict(self), effective_rank=self.effective_rank)


def check_output(path, suffixes, what: str, inputs: dict | None = None,
                 option: str = "--out") -> Path:
    """Refuse an output path before any work: wrong suffix, missing folder, one of the
    ``inputs`` (name → path), which writing would replace, or a place that cannot be written
    (read-only, no permission, full disk: :func:`~arenaseg.io.outputs.check_writable`), which
    would otherwise only show after the whole run."""
    path = Path(path)
    check_name_length(path, what, option)
    for name, given in (inputs or {}).items():
        if given and Path(given).resolve() == path.resolve():
            raise ArenaError(f"{what} '{path}' is the {name} file: writing it would replace "
                             f"your input; choose another {option} path")
    if path.is_dir():
        raise ArenaError(f"{what} '{path}' is a folder: give a file name in it, e.g. "
                         f"'{path / ('result' + suffixes[0])}'")
    if not path.name.endswith(tuple(suffixes)):  # SimpleITK knows lower-case extensions only
        lower = next((s for s in suffixes if path.name.lower().endswith(s)), None)
        fix = (f"write the extension in lower case, '{path.name[:-len(lower)]}{lower}'" if lower
               else f"use one of {', '.join(suffixes)}")
        raise ArenaError(f"{what} '{path}' has an unsupported extension: {fix}")
    suffix = max((x for x in suffixes if path.name.endswith(x)), key=len)
    stem = path.name[:-len(suffix)]
    inner = next((x for x in (".nii.gz", ".nii") if stem.lower().endswith(x)), None)
    if suffix in (".nii", ".nii.gz") and inner:  # ITK's NIfTI writer drops the inner one
        fixed = path.with_name(stem[:-len(inner)] + suffix)
        raise ArenaError(f"{what} '{path}' ends in a doubled extension '{inner}{suffix}': the "
                         f"NIfTI writer would write '{fixed.name}' instead; give {option} '{fixed}'")
    if not path.parent.resolve().is_dir():
        raise ArenaError(f"folder of {what} '{path}' does not exist: create it first")
    return check_writable(path, what, option)


@dataclass
class Fit:
    """An adapted backbone and how it was trained."""

    tuning: Method
    spec: object
    scan: Scan
    log: object
    checksum: str
    zero_shot_dice: float | None = None
    profile: dict[str, float] = field(default_factory=dict)
    #: the frozen features' reading of the paint, for the adapter (:mod:`arenaseg.reading`)
    reading: dict = field(default_factory=dict)


def fit(scan: Scan | sitk.Image, annotation: Annotation, settings: AdaptSettings,
        backbone: str = DEFAULT_BACKBONE, structure: str | None = None, device: str = "cpu",
        warm: tuple[dict, dict] | None = None, zero_shot: bool = False, weights: str | None = None,
        profile: bool = False,
        progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
        status: StatusFn | None = None) -> Fit:
    """Adapt a backbone to ``annotation`` (painted slices on ``scan``'s input grid), in memory.

    The painted voxels are mapped into the canonical grid (:meth:`Scan.points_to_canonical`),
    ordered by canonical position, and the method's parameters are trained on crops that are
    ``settings.slab`` voxels thin across the painted slices (:func:`arenaseg.training.train`).
    Then come ``settings.self_training`` rounds of self-training (none by default), each of half
    as many steps, on the paint and on what the network then finds on the unpainted slices
    (:mod:`arenaseg.self_training`); each round gives ARENA's layers then at rank 0 a new SVD
    start from its own first batch.

    Args:
        scan: a :class:`Scan` (or an image in HU, brought to the canonical grid here).
        annotation: the painted slices on the input grid (:func:`~arenaseg.io.annotations.find_annotation`):
            boolean ``(I, J, K)`` arrays of known and structure voxels, and the slice axis.
        settings: :class:`~arenaseg.config.AdaptSettings` (method, rank, λ, steps, seed, …).
        backbone: registry id (:data:`arenaseg.backbones.REGISTRY`) or a checkpoint path.
        structure: a class name the backbone knows starts the head from its pretrained row.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (:func:`~arenaseg.inference.pick_device`).
        warm: ``(tensors, metadata)`` of an adapter to continue from (its method and ranks).
        weights: local checkpoint file of ``backbone`` (instead of the embedded, cached or
            downloaded one).
        zero_shot: also measure the Dice, on the painted slices, of the backbone's own output
            row for ``structure`` before training (None when the backbone does not know it).
        profile: also record how the frozen backbone reads the painted structure
            (:func:`~arenaseg.reading.painted_reading`; one more pass of the frozen network), which
            ``segment`` uses to tell the structure from look-alikes.
        progress: called after each step with (step, steps in all, loss, per-layer ranks).
        should_stop: polled every step; True raises :class:`~arenaseg.training.Cancelled`.
        status: ``status(phase, message)`` as each phase starts.

    Returns:
        :class:`Fit`: the prepared method (``tuning``, trained, adapters not merged), the spec,
        the scan, the training log (loss and total rank per step, final ranks, seconds), the
        backbone's weights checksum, the zero-shot Dice and the profile.

    Raises:
        ArenaError: see :func:`arenaseg.methods.prepare` and
            :func:`arenaseg.backbones.load_backbone`; a non-finite loss.

    Examples:
        >>> import SimpleITK as sitk
        >>> from arenaseg.io.annotations import find_annotation, paint_slices
        >>> from arenaseg.io.geometry import array_ijk
        >>> from arenaseg.io.labels import read_labels_on
        >>> ct = sitk.ReadImage("ct.nii.gz")                                         # doctest: +SKIP
        >>> labels = array_ijk(read_labels_on(ct, "labels.nii.gz", "labels"))  # doctest: +SKIP
        >>> annotation = find_annotation(paint_slices(labels, 5, 3, axis=2), 5, axis=2)  # doctest: +SKIP
        >>> result = fit(ct, annotation, AdaptSettings(steps=20), structure="liver")  # doctest: +SKIP
        >>> sum(result.log.ranks.values()) <= 9 * 8                                  # doctest: +SKIP
        True
    """
    status = status or _quiet
    dev = pick_device(device)
    model, spec = load_backbone(warm[1]["backbone"] if warm else backbone, weights,
                                use_checkpoint=settings.checkpointing,
                                progress=_downloading(status), warn=_warner(status))
    if not isinstance(scan, Scan):
        status("preprocessing", f"resampling onto the backbone's grid ({spec.id})")
        scan = Scan.from_image(scan, spec)
    checksum = state_checksum(model)
    painted_profile, reading = {}, {}
    if profile:
        status("preprocessing", f"reading the scan with the frozen backbone ({spec.id})")
        painted_profile, reading = painted_reading(model, spec, scan, dev, annotation)
    if warm:
        tuning = apply_adapter(model, spec, *warm, source="--warm-start adapter")
    else:
        tuning = prepare(model, spec, settings, structure)
    zero_shot_dice = None
    if zero_shot and spec.pretrained_channel(structure) is not None and not warm:
        seg = array_ijk(input_probability(tuning, spec, scan, dev) > 0.5) > 0
        zero_shot_dice = dice(seg, annotation.target, annotation.known)
    points, targets = annotation.points()
    coords = scan.points_to_canonical(points)
    # The seeded crop sampling picks points by index: order them by canonical position (rounded
    # past float noise), not by the input's storage order, so an LPS NRRD, a RAS NIfTI and a
    # flipped copy of the same scan train identically.
    order = np.lexsort(np.round(coords, 3).T[::-1])
    coords, targets = coords[order], targets[order]
    crop = list(spec.preprocessing.roi_size)
    across = scan.canonical_axis(annotation.axis)
    crop[across] = min(crop[across], settings.slab)
    pseudo = None
    if settings.interpolate_mm > 0:
        weak, weak_targets, weights = interpolate(annotation, scan.image.GetSpacing(),
                                                  settings.interpolate_mm, seed=settings.seed)
        pseudo = (scan.points_to_canonical(weak), weak_targets, weights)
    rounds = round_steps(settings.steps, settings.self_training) if tuning.parameters() else [settings.steps]
    total = sum(rounds)
    status("training", f"training {total} steps ({tuning.method}"
           + (f"; {settings.steps} on the paint, {len(rounds) - 1} rounds of self-training)"
              if len(rounds) > 1 else ")"))
    log = train(tuning, scan.x, coords, targets, crop, settings, dev,
                progress=progress and (lambda step, loss, ranks: progress(step, total, loss, ranks)),
                should_stop=should_stop, pseudo=pseudo)
    for n, steps in enumerate(rounds[1:], 1):
        status("training", f"self-training round {n}: the structure found so far trains too")
        weak, weak_targets = pseudo_labels(input_probability(tuning, spec, scan, dev), annotation,
                                           len(targets), settings.seed, scan.outside)
        every = np.concatenate([coords, scan.points_to_canonical(weak)])
        order = np.lexsort(np.round(every, 3).T[::-1])
        done = len(log.loss)
        log.extend(train(tuning, scan.x, every[order], np.concatenate([targets, weak_targets])[order],
                         crop, replace(settings, steps=steps, seed=(settings.seed + 100 * n) % 2**32), dev,
                         progress=progress and (lambda step, loss, ranks: progress(step + done, total, loss, ranks)),
                         should_stop=should_stop, pseudo=pseudo))
    return Fit(tuning, spec, scan, log, checksum, zero_shot_dice, painted_profile, reading)


def adapt(image: str, annotations: str, label: int, out: str, adapter_out: str | None = None,
          settings: AdaptSettings | None = None, backbone: str = DEFAULT_BACKBONE,
          slice_axis: int | None = None, structure: str | None = None, device: str = "auto",
          warm_start: str | None = None, background_label: int | None = None,
          weights: str | None = None, progress: ProgressFn | None = None,
          should_stop: Callable[[], bool] | None = None,
          status: StatusFn | None = None, series: str | None = None) -> AdaptResult:
    """Adapt the backbone to the structure painted on a few slices and segment it in 3D.

    Args:
        image: CT file or DICOM folder (HU).
        annotations: labelmap with the painted slices, on any grid overlapping the image.
        label: label value of the structure in ``annotations``, or the segment's name in a 3D
            Slicer ``.seg.nrrd`` (:func:`~arenaseg.io.labels.resolve_label`).
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
        progress: called after each training step with (step, steps in all, loss, per-layer
            ranks) (:data:`ProgressFn`).
        should_stop: polled every training step; True raises
            :class:`~arenaseg.training.Cancelled`.
        status: ``status(phase, message)`` as each phase (:data:`PHASES`) starts; input
            warnings come as ``warning: ...`` messages of the reading phase.
        series: SeriesInstanceUID to read when ``image`` is a DICOM folder with several series
            (default: the one the annotations lie on).

    Returns:
        :class:`AdaptResult`: output paths, method, per-layer ranks, parameter counts, loss and
        total rank per step, seconds, device, the painted slices, the objects kept and removed
        (count, mL) and the backbone's reading of the structure.

    Raises:
        ArenaError: for every input problem (see :mod:`arenaseg.errors`), before writing anything.
        Cancelled: ``should_stop`` returned True; nothing is written.

    Examples:
        >>> result = adapt("ct.nii.gz", "painted.nrrd", 5, "liver.nii.gz", "liver.safetensors",
        ...                settings=AdaptSettings(steps=60), structure="liver")   # doctest: +SKIP
        >>> result.effective_rank, result.objects                                 # doctest: +SKIP
        (31, 1)
    """
    settings = settings or AdaptSettings()
    segment, label = label, resolve_label(annotations, label)[0]  # a name keeps its own layer
    if label < 1:
        raise ArenaError(f"--label {label} is not a structure: 0 is background; give the "
                         "positive value the structure is painted with")
    out = check_output(out, IMAGE_SUFFIXES, "output segmentation",
                       {"image": image, "annotations": annotations})
    if adapter_out:
        adapter_out = check_output(adapter_out, (".safetensors",), "adapter output",
                                   {"image": image, "annotations": annotations, "--weights": weights,
                                    "--backbone checkpoint": backbone if Path(str(backbone)).is_file() else None},
                                   option="--adapter-out")
    status = status or _quiet
    dev = pick_device(device)
    start = time.perf_counter()
    status("reading", f"reading {image}")
    warn = _warner(status)
    ct = read_image(image, "image", series=series, match=partial(painted_points, annotations), warn=warn)
    status("reading", describe(ct, image))
    check_intensities(ct, image, warn)
    annotation = find_annotation(array_ijk(read_labels_on(ct, annotations, "annotations", label=segment,
                                                          warn=warn)),
                                 label, slice_axis, str(annotations), background_label)
    check_paint(ct, annotation, annotations)
    warm = read_adapter(warm_start) if warm_start else None
    if warm:
        for option, given, saved in (("--method", settings.method, warm[1]["method"]),
                                     ("--backbone", str(backbone), warm[1]["backbone"])):
            if given != saved:
                raise ArenaError(f"--warm-start adapter '{warm_start}' was trained with {option} "
                                 f"{saved}, not {given}: give {option} {saved}, or start "
                                 "without --warm-start")
    used = warm[1]["backbone"] if warm else backbone
    METHOD_CLASSES[settings.method].check(get_spec(used), structure)  # before the backbone runs
    check_extent(ct, image, backbone_preprocessing(used), str(used), warn)
    result = fit(ct, annotation, settings, backbone, structure, dev, warm, zero_shot=True, profile=True,
                 weights=weights, progress=progress, should_stop=should_stop, status=status)
    tuning, spec = result.tuning, result.spec
    status("inference", "segmenting the whole volume")
    objects = predict(tuning, spec, result.scan, dev, label, annotation, status)
    initial = tuning.initial_ranks()
    adapt_result = AdaptResult(
        segmentation=str(out), adapter=str(adapter_out) if adapter_out else None,
        method=tuning.method, ranks=result.log.ranks, initial_rank=sum(initial.values()),
        trainable_parameters=tuning.trainable_parameters(),
        active_parameters=tuning.active_parameters(), zero_shot_dice=result.zero_shot_dice,
        loss=result.log.loss, total_rank=result.log.total_rank,
        seconds=time.perf_counter() - start, device=str(dev), slice_axis=annotation.axis,
        painted_slices=tuple(int(i) for i in annotation.slices), objects=objects.kept,
        volume_ml=objects.kept_ml, removed_objects=objects.removed, removed_ml=objects.removed_ml,
        profile=result.profile, training_parts=result.log.parts, next_slice=objects.next_slice)
    status("writing", f"writing {out}" + (f" and {adapter_out}" if adapter_out else ""))
    # Both files or neither: each is verified before either is published, so a failed or
    # interrupted write (full disk, Ctrl-C, cancel) leaves no segmentation without its adapter,
    # and never replaces an earlier adapter (e.g. the --warm-start one) with nothing to show.
    with Outputs() as outputs:
        if adapter_out:
            save_adapter(adapter_out, tuning, {
                "backbone": spec.id, "backbone_checksum": result.checksum,
                "targets": list(tuning.layers), "settings": settings.to_dict(),
                "preprocessing": spec.preprocessing.to_dict(), "structure": structure,
                "label": int(label), "annotated_axis": annotation.axis,
                "annotated_slices": list(annotation.slices), "source_image": str(image),
                "objects": objects.kept, "volume_ml": round(objects.kept_ml, 3),
                "profile": result.profile},
                outputs=outputs, reading=result.reading)
        write_image(objects.image, out, what="output segmentation", option="--out",
                    outputs=outputs)
        outputs.publish()
    return adapt_result


def segment(image: str, adapter: str, out: str, device: str = "auto",
            weights: str | None = None, status: StatusFn | None = None,
            series: str | None = None) -> dict:
    """Segment ``image`` with a saved adapter (e.g. on a new patient).

    Args:
        image: CT file or DICOM folder (HU), any grid and orientation.
        adapter: adapter file written by :func:`adapt` (``.safetensors``).
        out: segmentation to write: the adapter's label value inside the structure, exactly on
            ``image``'s grid.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        weights: local checkpoint file of the adapter's backbone (no download).
        status: ``status(phase, message)`` as each phase starts.
        series: SeriesInstanceUID to read when ``image`` is a DICOM folder with several series.

    Returns:
        ``{"segmentation", "structure", "label", "ranks", "seconds"}``, and what
        post-processing kept: ``objects`` (confident objects kept; 0 when the structure is
        absent), ``volume_ml``, ``removed_objects``, ``removed_ml`` (objects predicted without
        confidence), ``painted_objects`` (objects the structure had where it was adapted, None
        for older adapters).

    Raises:
        ArenaError: unreadable image, several DICOM series and no ``series``, geometry or
            intensities that are not a CT on a regular grid (:mod:`arenaseg.io.checks`), corrupt
            adapter, adapter made for another backbone.

    Examples:
        >>> summary = segment("next_patient/", "liver.safetensors", "next.nii.gz")  # doctest: +SKIP
        >>> summary["structure"], summary["objects"]                              # doctest: +SKIP
        ('liver', 1)
    """
    status = status or _quiet
    out = check_output(out, IMAGE_SUFFIXES, "output segmentation", {"image": image})
    dev = pick_device(device)
    start = time.perf_counter()
    status("reading", f"reading {adapter} and {image}")
    tensors, meta = read_adapter(adapter)
    warn = _warner(status)
    ct = read_image(image, "image", series=series, warn=warn)
    status("reading", describe(ct, image))
    check_intensities(ct, image, warn)
    model, spec = load_backbone(meta["backbone"], weights, progress=_downloading(status), warn=warn)
    check_extent(ct, image, spec.preprocessing, spec.id, warn)
    status("preprocessing", f"resampling onto the backbone's grid ({spec.id})")
    scan = Scan.from_image(ct, spec)
    check_backbone(model, spec, meta, source=str(adapter))  # before the reading's pass
    status("preprocessing", f"reading the scan with the frozen backbone ({spec.id})")
    reads_as = read_as_structure(model, spec, scan, dev, meta.get("profile"), tensors)
    tuning = apply_adapter(model, spec, tensors, meta, source=str(adapter))
    status("inference", "segmenting the whole volume")
    objects = predict(tuning, spec, scan, dev, meta.get("label", 1), status=status, reads_as=reads_as)
    status("writing", f"writing {out}")
    write_image(objects.image, out, what="output segmentation", option="--out")
    return {"segmentation": str(out), "structure": meta.get("structure"),
            "label": meta.get("label", 1), "ranks": meta["ranks"],
            "objects": objects.kept, "volume_ml": objects.kept_ml,
            "removed_objects": objects.removed, "removed_ml": objects.removed_ml,
            "painted_objects": meta.get("objects"), "seconds": time.perf_counter() - start}
