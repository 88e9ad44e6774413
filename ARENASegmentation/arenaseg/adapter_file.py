"""Adapter files: safetensors tensors plus JSON metadata in the safetensors header.

One ``.safetensors`` file holds, for each adapted layer, its active components (``A``, ``B``,
``v`` where ``v ≠ 0``) and the trained head; its header's ``arenaseg`` entry is a JSON object with
the backbone id and checksum, target layers and ranks, the settings (λ, ρ, η, r0, …), the
preprocessing and the structure. An adapter is only ever loaded onto the exact backbone it was
trained on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .adapters import ArenaLayer, inject_adapters
from .backbones import BackboneSpec, replace_head, state_checksum
from .errors import ArenaError
from .imageio import atomic_write

FORMAT = "arenaseg-adapter/1"


def save_adapter(path: str | os.PathLike, layers: dict[str, ArenaLayer], head: nn.Conv3d,
                 metadata: dict) -> Path:
    """Write the active components of ``layers``, the ``head`` and ``metadata`` atomically.

    ``metadata`` must hold ``backbone`` and ``backbone_checksum``; ranks are added here."""
    tensors = {}
    for name, layer in layers.items():
        keep = torch.nonzero(layer.v.detach(), as_tuple=True)[0].cpu()
        if keep.numel() == 0:
            continue
        tensors[f"{name}.lora_A"] = layer.lora_A.weight.detach().cpu()[keep]
        tensors[f"{name}.lora_B"] = layer.lora_B.weight.detach().cpu()[:, keep]
        tensors[f"{name}.v"] = layer.v.detach().cpu()[keep]
    tensors["head.weight"] = head.weight.detach().cpu()
    tensors["head.bias"] = head.bias.detach().cpu()
    meta = dict(metadata, format=FORMAT, arenaseg_version=__version__,
                ranks={n: layer.effective_rank for n, layer in layers.items()},
                initial_ranks={n: layer.rank for n, layer in layers.items()})
    return atomic_write(path, lambda tmp: save_file(
        {k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"arenaseg": json.dumps(meta)}))


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of an adapter file.

    Raises:
        ArenaError: missing, corrupt or not an arenaseg adapter.
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
        if meta.get("format") != FORMAT:
            raise KeyError("format")
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as err:
        raise ArenaError(f"adapter '{path}' is corrupt or not an arenaseg adapter ({type(err).__name__}): "
                         "save it again with 'arenaseg adapt --adapter-out'") from None
    return tensors, meta


def apply_adapter(model: nn.Module, spec: BackboneSpec, tensors: dict[str, torch.Tensor],
                  meta: dict, source: str = "adapter") -> tuple[dict[str, ArenaLayer], nn.Conv3d]:
    """Inject the saved adapters and head into a freshly loaded backbone.

    Raises:
        ArenaError: the adapter was made for another backbone (id or weights checksum).
    """
    if meta.get("backbone") != spec.id:
        raise ArenaError(f"adapter '{source}' was made for backbone '{meta.get('backbone')}', "
                         f"not '{spec.id}': use the backbone it was trained on")
    checksum = state_checksum(model)
    if meta.get("backbone_checksum") != checksum:
        raise ArenaError(f"adapter '{source}' was made for other weights of backbone '{spec.id}' "
                         f"(checksum {str(meta.get('backbone_checksum'))[:12]}…, installed "
                         f"{checksum[:12]}…): adapt again on the installed backbone")
    ranks = {n: int(tensors[f"{n}.v"].numel()) for n in meta["ranks"] if f"{n}.v" in tensors}
    layers = inject_adapters(model, [f"^{n.replace('.', '[.]')}$" for n in ranks], ranks) if ranks else {}
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.weight.copy_(tensors[f"{name}.lora_A"])
            layer.lora_B.weight.copy_(tensors[f"{name}.lora_B"])
            layer.v.copy_(tensors[f"{name}.v"])
        head = replace_head(model, spec)
        head.weight.copy_(tensors["head.weight"])
        head.bias.copy_(tensors["head.bias"])
    return layers, head
