"""Geometry: a CT on its own grid and on a backbone's canonical grid, both ways (:class:`Scan`).

A :class:`Scan` holds the input image, the canonical tensor and its affine, and maps painted
voxels into the canonical grid and predictions back onto the input grid; the data path reads
image → :class:`Scan` → fit → predict → image. The functions below are its parts.

The forward path uses MONAI ``Orientation``, ``Spacing`` and the backbone's intensity scaling
(:func:`intensity_transform`: ``ScaleIntensityRange`` of an HU window for most); the way
back resamples with SimpleITK onto the input image itself, so an output always has the input's
exact size, spacing, origin and direction, whatever its orientation (LPS, RAS, oblique).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, Spacing

from .backbones.registry import Preprocessing
from .io.checks import fill_outside
from .io.geometry import array_ijk, image_from_ras_affine, ras_affine, resample_to

# Axis labels of the RAS world MONAI's affines live in (set explicitly: MONAI 1.5+ warns).
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def intensity_transform(prep: Preprocessing):
    """The MONAI transform that scales a regridded CT (HU) for a backbone: a callable on a
    ``(1, X, Y, Z)`` tensor. ``prep.intensity`` ``"window"``: clip ``prep.hu_window`` and scale
    it to [0, 1] (``ScaleIntensityRange``); ``"nonzero-zscore-minmax"``:
    ``NormalizeIntensity(nonzero=True)`` then ``ScaleIntensity(-1, 1)`` (the
    ``wholeBody_ct_segmentation`` bundle's scaling).

    Raises:
        ValueError: an unknown ``prep.intensity``.
    """
    from monai.transforms import Compose, NormalizeIntensity, ScaleIntensity, ScaleIntensityRange

    if prep.intensity == "window":
        lo, hi = prep.hu_window
        return ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    if prep.intensity == "nonzero-zscore-minmax":
        return Compose([NormalizeIntensity(nonzero=True), ScaleIntensity(minv=-1.0, maxv=1.0)])
    raise ValueError(f"unknown intensity scaling '{prep.intensity}'")


def _regrid(t: MetaTensor, prep: Preprocessing, mode: str) -> MetaTensor:
    t = Orientation(axcodes=prep.orientation, labels=RAS_LABELS)(t)
    # float32 resampling: MONAI's float64 default copies the whole input at 8 bytes per voxel
    # (1 GB for a thin-slice CT); values on an unchanged grid are identical either way.
    return Spacing(pixdim=prep.spacing_mm, mode=mode, dtype=torch.float32)(t)


def to_canonical(image: sitk.Image, prep: Preprocessing, labels: sitk.Image | None = None):
    """CT (HU) → canonical tensor.

    Args:
        image: the CT in HU.
        prep: the backbone's preprocessing.
        labels: optional labelmap already on ``image``'s grid, carried along (nearest neighbour).

    Returns:
        ``(x, affine)`` or ``(x, y, affine)``: ``x`` float32 ``(1, X, Y, Z)`` in [0, 1], ``y``
        int64 ``(1, X, Y, Z)``, ``affine`` the 4×4 RAS affine of the canonical grid (numpy).
    """
    affine = torch.as_tensor(ras_affine(image), dtype=torch.float64)
    # SimpleITK's own (k, j, i) voxel order with the affine's columns swapped to match: no
    # transposed copy of the whole volume; Orientation brings it to the canonical order.
    voxels = sitk.GetArrayViewFromImage(image).astype(np.float32)
    x = MetaTensor(torch.from_numpy(voxels)[None], affine=affine[:, [2, 1, 0, 3]])
    x = _regrid(x, prep, "bilinear")
    x = intensity_transform(prep)(x)
    canon_affine = np.asarray(x.affine, dtype=float)
    if labels is None:
        return x.as_tensor().float(), canon_affine
    y = MetaTensor(torch.from_numpy(array_ijk(labels).astype(np.int64))[None], affine=affine)
    y = _regrid(y, prep, "nearest")
    return x.as_tensor().float(), y.as_tensor().long(), canon_affine


def to_input_grid(values: np.ndarray, canon_affine: np.ndarray, image: sitk.Image,
                  linear: bool = True) -> sitk.Image:
    """Resample a canonical ``(X, Y, Z)`` map onto ``image``'s grid with SimpleITK: trilinear for
    a float map (e.g. a probability), nearest neighbour for a labelmap (``linear=False``).
    The result has exactly ``image``'s size, spacing, origin and direction."""
    canon = image_from_ras_affine(values.astype(np.float32 if linear else np.uint8), canon_affine)
    return resample_to(canon, image, linear=linear, default=0.0)


def input_index_to_canonical(points_ijk: np.ndarray, image: sitk.Image,
                             canon_affine: np.ndarray) -> np.ndarray:
    """Map ``(N, 3)`` voxel indices of ``image`` to continuous canonical voxel indices."""
    homog = np.c_[points_ijk.astype(float), np.ones(len(points_ijk))]
    world_ras = homog @ ras_affine(image).T
    return (world_ras @ np.linalg.inv(canon_affine).T)[:, :3]


def canonical_axis(image: sitk.Image, axis: int, canon_affine: np.ndarray) -> int:
    """The canonical voxel axis closest to voxel axis ``axis`` of ``image`` (e.g. where the
    painted slices' normal points after reorientation)."""
    direction = ras_affine(image)[:3, axis]
    return int(np.argmax(np.abs(np.linalg.solve(canon_affine[:3, :3], direction))))


@dataclass
class Scan:
    """A CT on its own grid and on a backbone's canonical grid: the one object that maps
    between them (TorchIO's ``Subject`` with its inverse transform, MONAI's ``Invertd``).

    Attributes:
        image: the input CT (HU) with its world geometry; NaN/inf voxels replaced by air.
        x: canonical CT ``(1, X, Y, Z)``, float32, scaled for the backbone (:func:`to_canonical`).
        affine: 4×4 RAS affine of the canonical grid (mm), numpy.
        outside: boolean ``(I, J, K)`` array of the input's NaN/inf voxels, or None: outside
            the scan, filled with air for the network and never predicted
            (:func:`~arenaseg.io.checks.fill_outside`).

    Examples:
        >>> import SimpleITK as sitk
        >>> from arenaseg.backbones import get_spec
        >>> ct = sitk.ReadImage("ct.nii.gz")                                   # doctest: +SKIP
        >>> scan = Scan.from_image(ct, get_spec("arena-small-ct-unet"))      # doctest: +SKIP
        >>> scan.x.shape, scan.to_input_grid(scan.x[0].numpy()).GetSize() == ct.GetSize()  # doctest: +SKIP
        (torch.Size([1, 122, 101, 112]), True)
    """

    image: sitk.Image
    x: torch.Tensor
    affine: np.ndarray
    outside: np.ndarray | None = None

    @classmethod
    def from_image(cls, image: sitk.Image, spec) -> "Scan":
        """Bring ``image`` (HU) onto the canonical grid of ``spec`` (a
        :class:`~arenaseg.backbones.BackboneSpec`, or its :class:`Preprocessing`)."""
        image, outside = fill_outside(image)
        return cls(image, *to_canonical(image, getattr(spec, "preprocessing", spec)), outside)

    def points_to_canonical(self, points_ijk: np.ndarray) -> np.ndarray:
        """``(N, 3)`` voxel indices of the input image → continuous canonical voxel coordinates
        ``(N, 3)``, clipped into the canonical volume (the painted voxels the loss sees)."""
        coords = input_index_to_canonical(points_ijk, self.image, self.affine)
        return np.clip(coords, 0, np.asarray(self.x.shape[1:]) - 1)

    def canonical_axis(self, axis: int) -> int:
        """The canonical voxel axis closest to voxel axis ``axis`` (0, 1, 2) of the input."""
        return canonical_axis(self.image, axis, self.affine)

    def to_input_grid(self, values: np.ndarray, linear: bool = True) -> sitk.Image:
        """A canonical ``(X, Y, Z)`` map on exactly the input grid (:func:`to_input_grid`):
        trilinear for a float map, nearest neighbour for a labelmap (``linear=False``)."""
        return to_input_grid(values, self.affine, self.image, linear=linear)
