"""Labelmaps: reading them (any image file, or a 3D Slicer ``.seg.nrrd`` with its segments and
layers), resolving a label value or segment name, and bringing them onto the image's grid.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import ArenaError
from .checks import check_grid
from .geometry import index_to_world_matrix, resample_to, world_overlap
from .images import read_image


def _is_segmentation(path: Path) -> bool:
    """True for a 3D Slicer segmentation file (NRRD with ``Segment<N>_`` fields)."""
    if not path.is_file() or not path.name.lower().endswith((".nrrd", ".nhdr")):
        return False
    try:
        return bool(_read_segmentation(path, skip_voxels=True).get("segments"))
    except Exception:  # not a segmentation header: read as a plain labelmap
        return False


def _read_segmentation(path: Path, skip_voxels: bool = False) -> dict:
    """``slicerio.read_segmentation`` with the segment names as Slicer wrote them: pynrrd decodes
    the header as ASCII and drops every other character ('Leber ü' became 'Leber '), while
    Slicer writes names in UTF-8 (a name that is not valid UTF-8 is read as Latin-1). A segment
    without a name is named by its ID."""
    import slicerio

    segmentation = slicerio.read_segmentation(str(path), skip_voxels=skip_voxels)
    fields: dict[int, str | None] = {}
    with open(path, "rb") as f:
        for line in f:  # the header, read as pynrrd reads it: up to the first blank line
            line = line.rstrip()
            if not line:
                break
            found = re.match(rb"Segment(\d+)_([^:\s]+)\s*:=?(.*)", line)
            if found:
                index, key, value = int(found[1]), found[2], found[3].strip()
                fields.setdefault(index, None)
                if key == b"Name":
                    try:
                        fields[index] = value.decode("utf-8")
                    except UnicodeDecodeError:
                        fields[index] = value.decode("latin-1")
    segments = segmentation.get("segments", [])
    if len(fields) == len(segments):  # slicerio lists the segments in index order
        for segment, index in zip(segments, sorted(fields)):
            if fields[index] is not None:
                segment["name"] = fields[index]
    for segment in segments:
        segment.setdefault("name", segment.get("id", ""))
    return segmentation


def _segments(path: Path) -> list[dict]:
    return _read_segmentation(path, skip_voxels=True)["segments"]


def read_label_layers(path: str | os.PathLike, what: str = "annotations") -> list[tuple[sitk.Image, list[dict]]]:
    """Read a labelmap as ``[(layer image, its segments)]``: a 3D Slicer ``.seg.nrrd`` (read with
    slicerio) gives one labelmap per layer with its segments (``name``, ``labelValue``), since
    overlapping segments are stored in separate layers; any other file gives one labelmap and no
    segment names."""
    path = Path(path)
    if not _is_segmentation(path):
        return [(read_image(path, what, min_slices=1), [])]  # one painted slice lies in 3D too
    segmentation = _read_segmentation(path)
    voxels = segmentation["voxels"]
    layers = voxels if voxels.ndim == 4 else voxels[None]
    matrix = np.asarray(segmentation["ijkToLPS"], float)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    out = []
    for index, layer in enumerate(layers):
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(layer, (2, 1, 0))))
        image.SetSpacing(spacing.tolist())
        image.SetDirection((matrix[:3, :3] / spacing).flatten().tolist())
        image.SetOrigin(matrix[:3, 3].tolist())
        check_grid(image, path, what)
        out.append((image, [s for s in segmentation["segments"] if s.get("layer", 0) == index]))
    return out


def _segment_list(segments: list[dict]) -> str:
    return ", ".join(f"'{s['name']}' ({s.get('labelValue', 1)})" for s in segments)


def resolve_label(path: str | os.PathLike, label: int | str, what: str = "annotations") -> tuple[int, int]:
    """``(label value, layer)`` of ``--label``: a whole number (a label value) or, in a 3D Slicer
    ``.seg.nrrd``, a segment name. A value used in several layers picks the one non-empty
    segment with it.

    Raises:
        ArenaError: a name in a file without segment names, an unknown name (the segments are
            listed), a value that stands for several non-empty segments, or a number that is
            also another segment's name.
    """
    path = Path(path)
    text = str(label).strip()
    number = int(text) if text.lstrip("+-").isdigit() else None
    if number is None and text.replace(".", "", 1).lstrip("+-").isdigit():
        raise ArenaError(f"--label {text} is not a whole number: give the label value the "
                         "structure is painted with (e.g. 1), or a segment name")
    if not path.exists():
        if number is not None:  # reading the file reports it, after the image
            return number, 0
        raise ArenaError(f"{what} '{path}' does not exist: check the path")
    if not _is_segmentation(path):
        if number is None:
            raise ArenaError(f"--label '{label}' is a name, but {what} '{path}' is a plain "
                             "labelmap without segment names: give its label value (a whole "
                             "number), or a 3D Slicer .seg.nrrd that names its segments")
        return number, 0
    segments = _segments(path)
    if number is None:  # "ü" typed as u + combining diaeresis (NFD: macOS) is Slicer's "ü" (NFC)
        key = unicodedata.normalize("NFC", text)
        names = [unicodedata.normalize("NFC", s["name"]) for s in segments]
        named = [s for s, name in zip(segments, names) if name == key]
        named = named or [s for s, name in zip(segments, names) if name.casefold() == key.casefold()]
        if len(named) != 1:
            why = "is not a segment of" if not named else "names several segments in"
            raise ArenaError(f"--label '{label}' {why} {what} '{path}' (segments: "
                             f"{_segment_list(segments)}): give one of these names or values")
        return int(named[0].get("labelValue", 1)), int(named[0].get("layer", 0))
    same = [s for s in segments if int(s.get("labelValue", 1)) == number]
    named = [s for s in segments if s["name"] == text and s not in same]
    if named:  # a segment named "2" painted with value 1, and another painted with 2
        value = int(named[0].get("labelValue", 1))
        other = f"for {_segment_list(same)} give its name" if same else \
            f"no segment has the value {number}"
        raise ArenaError(f"--label {text} is ambiguous in {what} '{path}': it is the name of "
                         f"{_segment_list(named)}, whose value is {value}: for that segment give "
                         f"--label {value}; {other}")
    if len(same) > 1:  # the same value in several layers: an empty segment cannot be the paint
        import slicerio

        segmentation = _read_segmentation(path)
        filled = [s for s in same if slicerio.segment_mask(segmentation, s).any()]
        if len(filled) > 1:
            raise ArenaError(f"--label {number} stands for several segments of {what} '{path}' "
                             f"(in different layers: {_segment_list(same)}): give the segment's "
                             "name instead")
        same = filled or same[:1]
    return number, int(same[0].get("layer", 0)) if same else 0


def read_labels_on(image: sitk.Image, path: str | os.PathLike, what: str = "annotations",
                   label: int | str | None = None, warn=None) -> sitk.Image:
    """Read a labelmap and bring it onto ``image``'s grid (nearest neighbour in world space).

    The labelmap may have any grid or orientation; only world positions count. A 3D Slicer
    ``.seg.nrrd`` with several layers gives the layer holding ``label`` (a value or a segment
    name, :func:`resolve_label`; the first layer when None). With ``label`` and ``warn``
    (``warn(message)``, one line), voxels painted with ``label`` outside the image's field of
    view, which the image's grid cannot hold, are counted and named in a warning.

    Raises:
        ArenaError: unreadable file; values that are not labels (negative or fractional, e.g. a
            CT in HU given as annotations); no overlap with the image in world space.
    """
    value, layer = resolve_label(path, label, what) if label is not None else (None, 0)
    labels = read_label_layers(path, what)[layer][0]
    values = sitk.GetArrayViewFromImage(labels)
    low = values.min()
    fractional = (values != np.round(values)) if np.issubdtype(values.dtype, np.floating) else None
    if low < 0 or (fractional is not None and fractional.any()):
        bad = low if low < 0 else values[fractional].flat[0]
        raise ArenaError(f"{what} '{path}' holds the value {bad:.12g}: a labelmap holds whole "
                         "numbers >= 0 (0 = not painted). Is this the CT itself? Give the "
                         "labelmap (segmentation) painted on it instead")
    if not world_overlap(image, labels):
        raise ArenaError(f"{what} '{path}' do not overlap the image in world space (origin "
                         f"{tuple(round(o, 1) for o in labels.GetOrigin())} mm vs image origin "
                         f"{tuple(round(o, 1) for o in image.GetOrigin())} mm): use the labels "
                         "drawn on this scan")
    _refuse_slices_across_the_grid(image, labels, path, what)
    if warn is not None and value is not None:
        _warn_paint_outside(image, labels, value, path, what, warn)
    labels = sitk.Cast(labels, sitk.sitkInt32) if labels.GetPixelID() in (
        sitk.sitkFloat32, sitk.sitkFloat64) else labels
    return resample_to(labels, image, linear=False, default=0)


def _index_to_world(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """``(M, origin)``: world (LPS, mm) = ``M @ (i, j, k) + origin`` (direction · spacing)."""
    matrix = np.asarray(image.GetDirection(), float).reshape(3, 3) * np.asarray(image.GetSpacing())
    return matrix, np.asarray(image.GetOrigin(), float)


def _warn_paint_outside(image: sitk.Image, labels: sitk.Image, value: int, path, what: str,
                        warn) -> None:
    """Warn when voxels painted with ``value`` lie outside ``image``'s field of view (no image
    voxel centre inside them): resampled onto the image they are lost."""
    painted = np.argwhere(sitk.GetArrayViewFromImage(labels) == value)[:, ::-1]  # (i, j, k)
    if not len(painted):
        return
    to_world, origin = _index_to_world(labels)
    from_world, image_origin = _index_to_world(image)
    index = np.linalg.solve(from_world, (painted @ to_world.T + origin - image_origin).T).T
    # half a painted voxel, in image voxels per axis: a coarser voxel whose centre lies past
    # the image's edge still reaches the image voxels next to it
    half = 0.5 * np.abs(np.linalg.solve(from_world, to_world)).sum(axis=1)
    outside = np.any((index + half < -1e-6) | (index - half > np.asarray(image.GetSize()) - 1 + 1e-6), axis=1)
    if outside.any():
        warn(f"{int(outside.sum())} of {len(painted)} voxels painted with {value} in {what} "
             f"'{path}' lie outside the image's field of view and are left out: paint within the "
             "scan, or check that the paint belongs to this scan")


def _refuse_slices_across_the_grid(image: sitk.Image, labels: sitk.Image, path, what: str) -> None:
    """Refuse paint whose slices are not slices of the image: painted on a grid whose slice axis
    (the one its paint touches the fewest slices along) is parallel to none of the image's axes.
    Resampled onto the image, each painted slice would cut through dozens of the image's
    slices, each then read as painted, with everything else on it as background. (Paint on a
    grid turned within the slice plane, or flipped, keeps its slices and is read as such.)"""
    painted = np.transpose(sitk.GetArrayViewFromImage(labels) > 0, (2, 1, 0))
    if not painted.any():
        return
    counts = [int(np.any(painted, axis=tuple(a for a in range(3) if a != ax)).sum()) for ax in range(3)]
    axis = int(np.argmin(counts))
    normal = np.asarray(labels.GetDirection(), float).reshape(3, 3)[:, axis]
    cosine = float(np.abs(np.asarray(image.GetDirection(), float).reshape(3, 3).T @ normal).max())
    if cosine < 1 - 1e-4:
        angle = float(np.degrees(np.arccos(min(cosine, 1.0))))
        raise ArenaError(f"{what} '{path}' is painted on {counts[axis]} slices across its voxel "
                         f"axis {'ijk'[axis]}, which lies at {angle:.1f} degrees to every axis of the "
                         "image: its slices are not slices of the image, and each would be read as "
                         "paint on many of them; paint on the image's own grid (in 3D Slicer: the "
                         "segmentation's geometry taken from this volume), or give the image resampled "
                         "onto the labelmap's grid")


def painted_points(path, limit: int = 4000) -> np.ndarray:
    """World (LPS) positions, (N, 3) in mm, of up to ``limit`` painted voxels of a labelmap file
    (none when it cannot be read: its own error is reported when it is read as annotations)."""
    try:
        layers = read_label_layers(path)
    except ArenaError:
        return np.zeros((0, 3))  # the annotations' own error is reported when they are read
    points = []
    for image, _ in layers:
        array = np.transpose(sitk.GetArrayViewFromImage(image), (2, 1, 0))
        ijk = np.argwhere(array > 0)
        if len(ijk):
            pick = ijk[np.linspace(0, len(ijk) - 1, min(limit, len(ijk))).astype(int)]
            points.append((np.c_[pick, np.ones(len(pick))] @ index_to_world_matrix(image).T)[:, :3])
    return np.concatenate(points) if points else np.zeros((0, 3))
