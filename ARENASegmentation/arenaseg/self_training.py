"""Self-training: the adapted network's own result on the unpainted slices trains it again.

Three painted slices show a long structure at three levels; where its look changes between and
beyond them (the IVC inside the liver, the iliopsoas towards the groin) a network trained on the
paint alone misses it. After the steps on the paint, each round of self-training
(pseudo-labelling; Lee, ICML Workshop on Challenges in Representation Learning, 2013) takes the
structure as the engine would return it (probability > 0.5, the objects connected to the
paint: :mod:`arenaseg.postprocessing`) as more structure voxels, and the confident background
around it (probability < :data:`BACKGROUND_BELOW` within :data:`NEAR_MM`) as as many background
voxels; the next round trains on them with the paint. Off by default
(``AdaptSettings.self_training = 0``): on the Merlin encoder it gains on the IVC and the
iliopsoas of ``abdomen_ct`` at 3 painted slices and loses on its portal vein, at 5 slices, and
on the other patient; on the small U-Net it teaches the network its own false positives (liver
0.935 → 0.847; ``bench/SELF_TRAINING.md``).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .io.annotations import Annotation
from .postprocessing import select_objects, threshold

#: Background voxels are taken where the probability is below this …
BACKGROUND_BELOW = 0.1
#: … and within this distance (mm, per axis: a box) of the structure: far background is already
#: read as background, and the errors to correct lie at the structure's border.
NEAR_MM = 12.0


def round_steps(steps: int, rounds: int) -> list[int]:
    """The optimizer steps of each round: ``steps`` on the paint alone, then ``rounds`` rounds
    of self-training of half as many each; none when that half is 0 (e.g.
    ``round_steps(120, 2) == [120, 60, 60]``; ``round_steps(1, 2) == [1]``)."""
    return [steps] + [steps // 2] * (rounds if steps // 2 else 0)


def pseudo_labels(probability: sitk.Image, annotation: Annotation, most: int,
                  seed: int = 0, outside: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Voxels of the unpainted slices to train on, from the network's own result.

    Args:
        probability: float image of the structure's probability on the input grid
            (:func:`arenaseg.inference.input_probability`).
        annotation: the painted slices on the same grid.
        most: at most this many structure voxels (random, ``seed``); as many background voxels
            as structure voxels, so that the rounds neither grow nor shrink the structure by
            their balance alone.
        outside: boolean ``(I, J, K)``: voxels with no image, never used.

    Returns:
        ``(points (M, 3), targets (M,))``: voxel indices ``(i, j, k)`` on the input grid and
        float targets (1 = structure, 0 = background); empty when nothing was found.
    """
    mask, core = threshold(probability, annotation, outside)
    kept = select_objects(mask, core, 1, annotation.target).image
    del mask
    radius = [max(1, round(NEAR_MM / s)) for s in kept.GetSpacing()]
    near = sitk.BinaryDilate(kept, radius, sitk.sitkBox)
    unknown = ~np.transpose(annotation.known, (2, 1, 0))  # SimpleITK arrays are (k, j, i)
    if outside is not None:
        unknown &= ~np.transpose(outside, (2, 1, 0))
    structure = np.argwhere(sitk.GetArrayViewFromImage(kept).view(bool) & unknown)
    background = np.argwhere(sitk.GetArrayViewFromImage(near).view(bool) & unknown
                             & (sitk.GetArrayViewFromImage(probability) < BACKGROUND_BELOW))
    rng = np.random.default_rng(seed)
    if len(structure) > most:
        structure = structure[rng.choice(len(structure), most, replace=False)]
    if len(background) > len(structure):
        background = background[rng.choice(len(background), len(structure), replace=False)]
    points = np.concatenate([structure, background])[:, ::-1]  # (k, j, i) → (i, j, k)
    targets = np.concatenate([np.ones(len(structure), np.float32),
                              np.zeros(len(background), np.float32)])
    return np.ascontiguousarray(points), targets
