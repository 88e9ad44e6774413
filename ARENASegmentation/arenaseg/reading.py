"""How the frozen backbone reads the painted structure, and where it reads it again on a new scan.

A few-shot adapter is confident far outside what it was shown: a liver adapter on the Merlin
encoder finds 0.27 L of "liver" in the bladder at probability 0.96, whose HU lie inside the
painted liver's. The frozen backbone still tells them apart, and ``segment`` keeps only the
objects it reads as the painted structure (:func:`~arenaseg.postprocessing.select_objects`):

- **A backbone with pretrained classes** reads each voxel as a class; the painted structure's
  profile is the share of its voxels in each class (:func:`~arenaseg.postprocessing.profile`,
  saved in the adapter's metadata).
- **An encoder without classes** (the Merlin default) reads the scan as its deepest frozen
  features (``layer3``, a 24 mm grid whose receptive field spans the abdomen:
  :meth:`~arenaseg.backbones.merlin.MerlinSegmenter.reading`). The adapter keeps a sample of
  them (:data:`STRUCTURE_SAMPLES` from the painted structure, :data:`BACKGROUND_SAMPLES` from
  the rest of the painted slices, standardised and unit length, float16); on a new scan a voxel
  is read as the structure when most of its :data:`NEIGHBOURS` nearest samples (cosine) are
  structure samples: k-nearest-neighbour voting, as in DINO's k-NN evaluation of frozen
  features (Caron et al., ICCV 2021).

``bench/OBJECT_CHECK.md`` measures both rules on scans the encoder never saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .inference import recognise
from .io.annotations import Annotation
from .postprocessing import _any_of, profile as class_profile

#: Votes per voxel: the nearest painted samples, by cosine similarity of the frozen features.
NEIGHBOURS = 10
#: Feature samples the adapter keeps from the painted structure and from the rest of the painted
#: slices (fewer when fewer voxels were painted).
STRUCTURE_SAMPLES = 512
BACKGROUND_SAMPLES = 2048
#: Painted-slice voxels below this HU (air outside the body) are not sampled as background:
#: no segmentation reaches them, and they would take most of the samples.
AIR_HU = -500.0
#: Names of the tensors the adapter file holds them under.
TENSORS = ("reading.structure", "reading.background", "reading.mean", "reading.scale")


@dataclass
class Features:
    """The frozen encoder's features over a canonical CT.

    Attributes:
        values: float32 ``(1, C, X', Y', Z')``; node ``n`` lies on canonical voxel ``stride·n``.
        stride: ``(X, Y, Z)`` in canonical voxels.
    """

    values: torch.Tensor
    stride: tuple[int, int, int]

    def at(self, coords: np.ndarray) -> torch.Tensor:
        """Trilinear samples ``(N, C)`` at canonical voxel coordinates ``coords`` ``(N, 3)``."""
        from .training import sample_logits

        points = torch.as_tensor(coords, dtype=torch.float32) / torch.tensor(self.stride, dtype=torch.float32)
        return sample_logits(self.values, points)[0].T


def read_features(model: torch.nn.Module, scan, device: torch.device) -> Features | None:
    """The frozen encoder's reading of ``scan`` (a :class:`~arenaseg.preprocessing.Scan`), or
    None for a backbone that has none (call before adapters are injected)."""
    if not hasattr(model, "reading"):
        return None
    return Features(*model.reading(scan.x, device))


def painted_reading(model: torch.nn.Module, spec, scan, device: torch.device,
                    annotation: Annotation, seed: int = 0) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """How the frozen backbone reads the painted structure, to save in the adapter.

    Returns:
        ``(profile, tensors)``: for a backbone with classes the class profile
        (``{"liver": 0.98}``) and no tensors; for an encoder without classes no profile and the
        :data:`TENSORS` (samples ``(n, C)`` float16, mean and scale ``(C,)`` float32); for
        neither, both empty.
    """
    classes, names = recognise(model, spec, scan, device)
    if classes is not None:
        return class_profile(classes, names, annotation.target), {}
    features = read_features(model, scan, device)
    if features is None:
        return {}, {}
    rng = np.random.default_rng(seed)
    hu = np.transpose(sitk.GetArrayViewFromImage(scan.image), (2, 1, 0))
    index = [slice(None)] * 3
    index[annotation.axis] = list(annotation.slices)
    rest = np.zeros(annotation.target.shape, bool)
    rest[tuple(index)] = True
    if annotation.background is not None:
        rest |= annotation.background
    rest &= ~annotation.target & (hu >= AIR_HU)

    def sample(where: np.ndarray, most: int) -> torch.Tensor:
        points = np.argwhere(where)
        if len(points) > most:
            points = points[np.sort(rng.choice(len(points), most, replace=False))]
        return features.at(scan.points_to_canonical(points.astype(float))).contiguous()

    structure, background = sample(annotation.target, STRUCTURE_SAMPLES), sample(rest, BACKGROUND_SAMPLES)
    both = torch.cat([structure, background])
    mean, scale = both.mean(0), both.std(0) + 1e-6
    return {}, {"reading.structure": _unit(structure, mean, scale).half(),
                "reading.background": _unit(background, mean, scale).half(),
                "reading.mean": mean, "reading.scale": scale}


def read_as_structure(model: torch.nn.Module, spec, scan, device: torch.device,
                      profile: dict[str, float] | None,
                      tensors: dict[str, torch.Tensor]) -> sitk.Image | None:
    """Where the frozen backbone reads ``scan`` as the painted structure.

    Args:
        model: the backbone before adapters are injected.
        profile: the painted structure's class profile (adapter metadata), or None.
        tensors: the adapter's tensors (those named in :data:`TENSORS` are used).

    Returns:
        uint8 image on the input grid, 1 where the voxel is read as the structure (one of the
        profile's classes; or a majority of its :data:`NEIGHBOURS` nearest feature samples are
        structure samples, the vote share interpolated trilinearly from the 24 mm nodes); None
        when the adapter holds no reading (older adapters, backbones with neither).
    """
    if profile:
        classes, names = recognise(model, spec, scan, device)
        expected = [names.index(n) for n in profile if n in names]
        return _any_of(classes, expected) if classes is not None and expected else None
    if not all(name in tensors for name in TENSORS):
        return None
    features = read_features(model, scan, device)
    if features is None:
        return None
    from .backbones.merlin import upsample_exact

    samples = torch.cat([tensors["reading.structure"], tensors["reading.background"]]).float()
    labels = torch.cat([torch.ones(len(tensors["reading.structure"])),
                        torch.zeros(len(tensors["reading.background"]))])
    values = features.values[0]
    nodes = _unit(values.flatten(1).T, tensors["reading.mean"].float(), tensors["reading.scale"].float())
    k = min(NEIGHBOURS, len(samples))
    share = labels[(nodes @ samples.T).topk(k, dim=1).indices].mean(1).view(1, 1, *values.shape[1:])
    x, y, z = scan.x.shape[1:]
    share = upsample_exact(share, features.stride)[0, 0, :x, :y, :z]
    return scan.to_input_grid(share.numpy()) > 0.5


def _unit(values: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.normalize((values - mean) / scale, dim=1).contiguous()
