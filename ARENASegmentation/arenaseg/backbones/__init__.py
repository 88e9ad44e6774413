"""The backbones ARENA adapts: the registry (:mod:`.registry`, data and no torch), one module
per network family (:mod:`.monai_nets`, :mod:`.suprem`, :mod:`.merlin`), and loading
(:mod:`.loading`: build a network, find its weights, load them strictly and freeze;
:mod:`.checkpoints`: reading and renaming checkpoint files).

Importing this package imports no torch, so the 3D Slicer module can list the backbones before
PyTorch is installed; the loading names (:func:`load_backbone`, :func:`state_checksum`, …)
import it when first used.
"""

from __future__ import annotations

from .registry import (BASE_ORGANS, DEFAULT_BACKBONE, EMBEDDED_BACKBONE, REGISTRY, BackboneSpec,  # noqa: F401
                       Preprocessing, WeightsSource, get_spec, spec_for_file)

_LOADING = ("load_backbone", "state_checksum", "weights_path", "cached_weights_path",
            "locate_weights")


def __getattr__(name: str):
    if name in _LOADING:
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
