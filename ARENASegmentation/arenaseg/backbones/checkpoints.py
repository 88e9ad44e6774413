"""Read public checkpoints safely and load them strictly after renaming their keys.

Public CT models ship their weights in several layouts (a raw state dict, ``{"state_dict": …}``,
``{"net": …}``, a MONAI bundle's ``model.pt``; prefixes ``module.`` from DistributedDataParallel
and ``backbone.`` from wrapper models; older module names such as ``swin_vit`` or ``mlp.fc1``).
:func:`read_state_dict` opens any of them without running pickled code, :func:`map_keys` renames
keys with a list of regular-expression rules, and :func:`load_strict` loads the result so that
every parameter the network expects comes from the file unless it is listed as deliberately
re-initialised: a wrong file is refused with the keys that are missing and unexpected.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ArenaError

#: Container keys under which training scripts store the state dict, tried in order.
CONTAINER_KEYS = ("state_dict", "net", "model")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, whatever its container.

    ``.safetensors`` files are read with safetensors; other files with
    ``torch.load(weights_only=True)``, which refuses to run pickled code. The state dict is taken
    from ``state_dict``, else ``net``, else ``model``, else the file's top-level dict.

    Raises:
        ArenaError: missing or unreadable file, pickled code, or no tensors found.
    """
    path = Path(path)
    if path.is_dir():
        raise ArenaError(f"checkpoint '{path}' is a folder: give the checkpoint file inside it")
    if not path.is_file():
        raise ArenaError(f"checkpoint '{path}' does not exist: check the path")
    if path.stat().st_size == 0:
        raise ArenaError(f"checkpoint '{path}' is empty: download it again")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as err:  # safetensors raises its own error types
            raise ArenaError(f"checkpoint '{path}' is not a valid safetensors file ({err}); "
                             "download it again") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err) and "global" not in str(err):  # not a refused object: garbage
            raise ArenaError(f"checkpoint '{path}' is not a PyTorch file (or is truncated): give "
                             "this backbone's checkpoint (.pt, .pth or .safetensors), or download "
                             "it again") from None
        raise ArenaError(f"checkpoint '{path}' holds more than tensors (pickled code or objects); "
                         "arenaseg never runs code from a checkpoint: re-save its state dict with "
                         "torch.save(model.state_dict(), ...) or as .safetensors") from None
    except Exception:  # torch.load fails on garbage in many ways (KeyError, EOFError, …)
        raise ArenaError(f"checkpoint '{path}' is not a PyTorch file (or is truncated): give "
                         "this backbone's checkpoint (.pt, .pth or .safetensors), or download it "
                         "again") from None
    state = obj
    if isinstance(obj, dict):
        for key in CONTAINER_KEYS:
            if isinstance(obj.get(key), dict):
                state = obj[key]
                break
    if not isinstance(state, dict) or not state or \
            not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArenaError(f"checkpoint '{path}' holds no state dict of tensors (top-level keys: "
                         f"{sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__}); "
                         "pass a file made with torch.save(model.state_dict(), ...)")
    return dict(state)


def map_keys(state: dict[str, torch.Tensor],
             rules: tuple[tuple[str, str | None], ...]) -> dict[str, torch.Tensor]:
    """Rename keys by ``(pattern, replacement)`` rules applied in order (``re.sub``); a key that
    matches a rule whose replacement is None is dropped (e.g. a self-supervised pretext head)."""
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            if replacement is None:
                if re.search(pattern, key):
                    key = None
                    break
            else:
                key = re.sub(pattern, replacement, key)
        if key is not None:
            out[key] = value
    return out


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_strict` did.

    Attributes:
        path: the checkpoint file.
        loaded: names of the parameters and buffers taken from the file.
        reinitialised: names the network expects that the file deliberately lacks (kept at
            their fixed-seed initialisation, e.g. a new decoder or head).
    """

    path: str
    loaded: tuple[str, ...]
    reinitialised: tuple[str, ...]


def _listing(names, limit: int = 6) -> str:
    names = sorted(names)
    more = f" … ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike,
                reinit: tuple[str, ...] = ()) -> LoadReport:
    """Copy ``state`` (already renamed to ``model``'s names) into ``model``, strictly.

    Every key of ``model.state_dict()`` must be in ``state`` unless it matches one of the
    ``reinit`` regular expressions; every key of ``state`` must exist in the model with the same
    shape.

    Raises:
        ArenaError: missing keys, unexpected keys or shape mismatches, named in the message.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not any(re.search(p, k) for p in reinit)]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
              for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{what}: {_listing(names)}" for what, names in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if names]
        raise ArenaError(f"checkpoint '{path}' does not fit this backbone ({'; '.join(parts)}); "
                         "pass the checkpoint file of this backbone, or choose the backbone that "
                         "matches the file")
    model.load_state_dict(state, strict=False)
    return LoadReport(str(path), tuple(sorted(state)),
                      tuple(sorted(k for k in expected if k not in state)))
