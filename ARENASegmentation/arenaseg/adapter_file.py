"""Adapter files: safetensors tensors plus JSON metadata in the safetensors header.

One ``.safetensors`` file holds every tensor the method trained, by its name in the adapted
model (ARENA: the active components of ``A``, ``B``, ``v`` only; always the new head); its
header's ``arenaseg`` entry is a JSON object with the backbone id and checksum, the method and
its settings (λ, ρ, η, r0, …), the rank of every layer, the preprocessing and the structure. An
adapter is only ever loaded onto the exact backbone it was trained on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from . import __version__
from .backbones import BackboneSpec, state_checksum
from .config import AdaptSettings
from .errors import ArenaError
from .methods import Method, load_state, prepare
from .io.outputs import Outputs, write_safetensors

FORMAT = "arenaseg-adapter/3"  # 3: ARENA gates scaled by the spectral norm of W0


def save_adapter(path: str | os.PathLike, tuning: Method, metadata: dict,
                 outputs: Outputs | None = None) -> Path:
    """Prune ``tuning`` (:meth:`~arenaseg.methods.Method.prune`: ARENA drops its switched-off
    components) and write its trained tensors (:meth:`~arenaseg.methods.Method.state`) and
    ``metadata``; the file
    is re-opened and compared before it is published (:func:`~arenaseg.io.outputs.write_safetensors`),
    with ``outputs``' other files when given. ``metadata`` must hold ``backbone``,
    ``backbone_checksum`` and ``settings``; the ranks are added here.

    Raises:
        ArenaError: the write failed (file, cause, fix); nothing was published.
    """
    tuning.prune()
    tensors = tuning.state()
    meta = dict(metadata, format=FORMAT, arenaseg_version=__version__, method=tuning.method,
                ranks=tuning.ranks(), initial_ranks=tuning.initial_ranks(),
                stored_ranks=tuning.stored_ranks())
    return write_safetensors(path, tensors, {"arenaseg": json.dumps(meta)}, what="adapter output",
                             option="--adapter-out", outputs=outputs)


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of an adapter file.

    Raises:
        ArenaError: missing, corrupt, or not an adapter of this arenaseg version.
    """
    path = Path(path)
    if not path.is_file():
        raise ArenaError(f"adapter '{path}' does not exist: give the .safetensors file "
                         "written by 'arenaseg adapt --adapter-out'")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
        meta = json.loads(header["arenaseg"])
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as err:
        raise ArenaError(f"adapter '{path}' is corrupt or not an arenaseg adapter ({type(err).__name__}): "
                         "save it again with 'arenaseg adapt --adapter-out'") from None
    if meta.get("format") == "arenaseg-adapter/2" and meta.get("method") != "arena":
        meta["settings"].pop("v0", None)  # only ARENA's layers changed in format 3
    elif meta.get("format") != FORMAT:
        raise ArenaError(f"adapter '{path}' has format '{meta.get('format')}', this arenaseg reads "
                         f"'{FORMAT}' (and format 2 for the methods other than arena): adapt again "
                         "with this version (in Slicer: untick Warm start)")
    broken = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        raise ArenaError(f"adapter '{path}' is corrupt: non-finite values in {broken[:3]}: save it "
                         "again with 'arenaseg adapt --adapter-out'")
    return tensors, meta


def apply_adapter(model: nn.Module, spec: BackboneSpec, tensors: dict[str, torch.Tensor],
                  meta: dict, source: str = "adapter") -> Method:
    """Prepare a freshly loaded backbone for the saved method and load the saved tensors.

    Raises:
        ArenaError: the adapter was made for another backbone (id or weights checksum), or its
            tensors do not fit.
    """
    if meta.get("backbone") != spec.id:
        raise ArenaError(f"adapter '{source}' was made for backbone '{meta.get('backbone')}', "
                         f"not '{spec.id}': use the backbone it was trained on")
    checksum = state_checksum(model)
    if meta.get("backbone_checksum") != checksum:
        raise ArenaError(f"adapter '{source}' was made for other weights of backbone '{spec.id}' "
                         f"(checksum {str(meta.get('backbone_checksum'))[:12]}…, installed "
                         f"{checksum[:12]}…): adapt again on the installed backbone")
    tuning = prepare(model, spec, AdaptSettings.from_dict(meta["settings"]), meta.get("structure"),
                     ranks=meta["stored_ranks"])
    load_state(tuning, tensors, source)
    tuning.fresh_decoder = False
    return tuning
