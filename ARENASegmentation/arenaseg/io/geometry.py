"""World-space geometry of SimpleITK images: LPS/RAS affines, same-grid tests, resampling in world
space, and arrays in (I, J, K) order.

Every image keeps SimpleITK's LPS world geometry (size, spacing in mm, origin, direction).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def index_to_world_matrix(image: sitk.Image) -> np.ndarray:
    """4×4 matrix mapping voxel index (i, j, k, 1) to LPS world coordinates in mm."""
    m = np.eye(4)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    m[:3, :3] = direction @ np.diag(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return m


def ras_affine(image: sitk.Image) -> np.ndarray:
    """4×4 affine from voxel index (i, j, k) to RAS world mm, as NIfTI and MONAI use it."""
    flip = np.eye(4)
    flip[:3, :3] = LPS_TO_RAS
    return flip @ index_to_world_matrix(image)


def image_from_ras_affine(array_ijk: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """Build a SimpleITK image from an array indexed (i, j, k) and its RAS affine."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=float)[:3, :4]
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_ijk, (2, 1, 0))))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    return image


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """True when both images share size, spacing, origin and direction (within ``tol``)."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def resample_to(image: sitk.Image, reference: sitk.Image, linear: bool = False,
                default: float = 0.0) -> sitk.Image:
    """Resample ``image`` onto ``reference``'s grid in world space (nearest neighbour unless
    ``linear``). The result has exactly the reference's size, spacing, origin and direction."""
    if same_grid(image, reference):
        out = sitk.Image(image)
        out.CopyInformation(reference)
        return out
    interp = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    return sitk.Resample(image, reference, sitk.Transform(), interp, default,
                         image.GetPixelID())


def world_overlap(a: sitk.Image, b: sitk.Image) -> bool:
    """True when the world-space bounding boxes of ``a`` and ``b`` intersect."""
    def box(img):
        size = np.array(img.GetSize()) - 1
        corners = np.array([[x, y, z, 1] for x in (0, size[0]) for y in (0, size[1])
                            for z in (0, size[2])], dtype=float)
        world = corners @ index_to_world_matrix(img).T
        half = np.abs(index_to_world_matrix(img)[:3, :3]).sum(axis=1) / 2
        return world[:, :3].min(0) - half, world[:, :3].max(0) + half
    lo_a, hi_a = box(a)
    lo_b, hi_b = box(b)
    return bool(np.all(lo_a < hi_b) and np.all(lo_b < hi_a))


def array_ijk(image: sitk.Image) -> np.ndarray:
    """Voxel array indexed (i, j, k), i.e. SimpleITK's (z, y, x) array transposed."""
    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))


def image_like(array_ijk_: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Image from an (i, j, k) array with ``reference``'s geometry."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_ijk_, (2, 1, 0))))
    out.CopyInformation(reference)
    return out
