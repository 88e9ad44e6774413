"""Adapter files: safetensors tensors plus JSON metadata in the safetensors header.

One ``.safetensors`` file holds every tensor the method trained, by its name in the adapted
model (ARENA: the active components of ``A``, ``B``, ``v`` only; always the new head); its
header's ``arenaseg`` entry is a JSON object with the backbone id and checksum, the method and
its settings (λ, ρ, η, r0, …), the rank of every layer, the preprocessing and the structure. An
adapter is only ever loaded onto the exact backbone it was trained on.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from . import __version__
from .backbones import BackboneSpec, state_checksum
from .config import ADAPTER_METHODS, METHODS, AdaptSettings
from .errors import ArenaError
from .methods import Method, load_state, prepare
from .io.outputs import Outputs, write_safetensors

FORMAT = "arenaseg-adapter/3"  # 3: ARENA gates scaled by the spectral norm of W0


def save_adapter(path: str | os.PathLike, tuning: Method, metadata: dict,
                 outputs: Outputs | None = None, reading: dict[str, torch.Tensor] | None = None) -> Path:
    """Prune ``tuning`` (:meth:`~arenaseg.methods.Method.prune`: ARENA drops its switched-off
    components) and write its trained tensors (:meth:`~arenaseg.methods.Method.state`) and
    ``metadata``; the file
    is re-opened and compared before it is published (:func:`~arenaseg.io.outputs.write_safetensors`),
    with ``outputs``' other files when given. ``metadata`` must hold ``backbone``,
    ``backbone_checksum`` and ``settings``; the ranks are added here. ``reading``: the frozen
    backbone's reading of the paint (:func:`arenaseg.reading.painted_reading`), stored beside.

    Raises:
        ArenaError: the write failed (file, cause, fix); nothing was published.
    """
    tuning.prune()
    tensors = dict(tuning.state(), **(reading or {}))
    meta = dict(metadata, format=FORMAT, arenaseg_version=__version__, method=tuning.method,
                ranks=tuning.ranks(), initial_ranks=tuning.initial_ranks(),
                stored_ranks=tuning.stored_ranks())
    return write_safetensors(path, tensors, {"arenaseg": json.dumps(meta)}, what="adapter output",
                             option="--adapter-out", outputs=outputs)


#: What an edited or damaged adapter asks of the user (every metadata message ends with it).
_FIX = "save the adapter again with 'arenaseg adapt --adapter-out', or restore the original file"
#: The largest label value a segmentation holds (uint32, :func:`~arenaseg.postprocessing.select_objects`).
_MAX_LABEL = 2**32 - 1


def _show(value) -> str:
    """``value`` as JSON, cut to one short phrase."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _text(value) -> bool:
    return isinstance(value, str) and value != ""


def _regex(value) -> bool:
    try:
        re.compile(value)
    except (re.error, TypeError):
        return False
    return True


def _dict(value) -> bool:
    return isinstance(value, dict)


#: Every field of the metadata: (required, test of a valid value, what it must be). ``format`` is
#: read first (another format: another version). ``label`` may be absent (adapters saved outside
#: :func:`~arenaseg.pipeline.adapt` segment with label 1), never wrong.
_FIELDS = {
    "format": (True, _text, f"'{FORMAT}'"),
    "arenaseg_version": (True, _text, "the version of arenaseg that saved it, such as '0.1.0'"),
    "method": (True, lambda v: v in METHODS, f"one of {', '.join(METHODS)}"),
    "backbone": (True, _text, "the id of the backbone it was trained on"),
    "backbone_checksum": (True, lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v),
                          "the 64 hexadecimal digits of the backbone weights' SHA-256"),
    "settings": (True, lambda v: isinstance(v, dict), "an object of settings"),
    "ranks": (True, _dict, "an object of layer name: effective rank"),
    "initial_ranks": (True, _dict, "an object of layer name: r0"),
    "stored_ranks": (True, _dict, "an object of layer name: stored rank"),
    "label": (False, lambda v: _whole(v) and 1 <= v <= _MAX_LABEL,
              f"a whole number from 1 to {_MAX_LABEL} (the value written in the segmentation)"),
    "structure": (False, lambda v: v is None or _text(v), "a structure name, or null"),
    "targets": (False, lambda v: isinstance(v, list) and all(map(_text, v)), "a list of layer names"),
    "preprocessing": (False, lambda v: isinstance(v, dict), "an object"),
    "annotated_axis": (False, lambda v: v is None or (_whole(v) and 0 <= v <= 2), "0, 1, 2 or null"),
    "annotated_slices": (False, lambda v: isinstance(v, list) and all(_whole(k) and k >= 0 for k in v),
                         "a list of slice indices >= 0"),
    "source_image": (False, lambda v: v is None or isinstance(v, str), "a file name, or null"),
    "objects": (False, lambda v: v is None or (_whole(v) and v >= 0), "a whole number >= 0, or null"),
    "volume_ml": (False, lambda v: v is None or (_number(v) and v >= 0), "a number >= 0, or null"),
    "profile": (False, lambda v: v is None or (isinstance(v, dict) and all(
        _text(k) and _number(f) and 0 <= f <= 1 for k, f in v.items())),
        "an object of class name: fraction from 0 to 1, or null"),
}
#: The smallest rank of each rank field (a layer of ``ranks`` may have switched every component off).
_RANKS = {"ranks": 0, "initial_ranks": 1, "stored_ranks": 1}

#: Every setting an adapter stores (:class:`~arenaseg.config.AdaptSettings`): (test, rule). The
#: ranges the settings themselves enforce are checked again by ``AdaptSettings.from_dict``.
_SETTINGS = {
    "method": (lambda v: v in METHODS, f"one of {', '.join(METHODS)}"),
    "rank": (lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    "lam": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "lr": (lambda v: v is None or (_number(v) and v > 0), "a finite number > 0, or null"),
    "rho": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "steps": (lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    "crops_per_step": (lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    "slab": (lambda v: _whole(v) and v >= 16 and v % 16 == 0, "a whole multiple of 16, >= 16"),
    "max_points": (lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    "seed": (lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
    "targets": (lambda v: v is None or (isinstance(v, list) and all(_regex(t) for t in v)),
                "a list of regular expressions, or null"),
    "train_decoder": (lambda v: isinstance(v, bool), "true or false"),
    "checkpointing": (lambda v: isinstance(v, bool), "true or false"),
    "interpolate_mm": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "self_training": (lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
}


def _bad(path, field: str, value, rule: str) -> ArenaError:
    return ArenaError(f"adapter '{path}': metadata field {field} is {_show(value)}, must be {rule}: {_FIX}")


def _versions(path, meta: dict, what: str) -> ArenaError:
    """``what`` (fields this arenaseg does not know) as the mark of another version of the
    program: the message names the version that saved the file and this one."""
    writer = meta.get("arenaseg_version")
    if isinstance(writer, str) and writer and writer != __version__:
        return ArenaError(f"adapter '{path}' was saved by arenaseg {writer}, this is arenaseg "
                          f"{__version__}, which does not know its {what}: segment with arenaseg "
                          f"{writer}, or adapt again with this version ('arenaseg adapt "
                          "--adapter-out'; in Slicer: untick Warm start)")
    said = f"says arenaseg {writer} saved it" if isinstance(writer, str) and writer else \
        f"names no valid arenaseg_version ({_show(writer)})"
    return ArenaError(f"adapter '{path}' has {what} unknown to this arenaseg {__version__}, yet it "
                      f"{said}: if another version of arenaseg saved it, segment with that version; "
                      f"else {_FIX}")


def check_metadata(path, meta, tensors: dict[str, torch.Tensor]) -> dict:
    """Validate the whole metadata of adapter ``path`` against its ``tensors``: every field's
    type and range, the required fields, the settings, the method in both places, and the ranks
    against the tensors present (what :func:`apply_adapter` and the pipeline then rely on).

    Returns:
        The metadata (format 2 of the methods other than arena: without ARENA's old ``v0``).

    Raises:
        ArenaError: one line naming the file, the field, its value and the fix; fields or a
            format this version does not know name the version that saved the file and this one.
    """
    if not isinstance(meta, dict):
        kind = {list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(
            type(meta), "null")
        raise ArenaError(f"adapter '{path}': its metadata is a JSON {kind}, must be "
                         f"an object of fields (format, settings, ranks, ...): {_FIX}")
    fmt = meta.get("format")
    if fmt is None:
        raise ArenaError(f"adapter '{path}': metadata field 'format' is missing (must be "
                         f"'{FORMAT}'): {_FIX}")
    if fmt == "arenaseg-adapter/2" and meta.get("method") != "arena":  # only ARENA changed in 3
        if isinstance(meta.get("settings"), dict):
            meta = dict(meta, settings={k: v for k, v in meta["settings"].items() if k != "v0"})
    elif fmt != FORMAT:
        raise _versions(path, meta, f"format {_show(fmt)} (it reads '{FORMAT}', and "
                        "'arenaseg-adapter/2' for the methods other than arena)")
    unknown = sorted(set(meta) - set(_FIELDS))
    if unknown:
        raise _versions(path, meta, f"metadata field{'s' if len(unknown) > 1 else ''} {unknown}")
    for field, (required, valid, rule) in _FIELDS.items():
        if field not in meta:
            if required:
                raise ArenaError(f"adapter '{path}': metadata field '{field}' is missing (must be "
                                 f"{rule}): {_FIX}")
        elif not valid(meta[field]):
            raise _bad(path, f"'{field}'", meta[field], rule)
    for field, low in _RANKS.items():
        for name, r in meta[field].items():
            if not (_text(name) and _whole(r) and r >= low):
                raise _bad(path, f"'{field}' of layer '{name}'", r, f"a whole number >= {low}")
    settings = meta["settings"]
    unknown = sorted(set(settings) - {f.name for f in fields(AdaptSettings)})
    if unknown:
        raise _versions(path, meta, f"setting{'s' if len(unknown) > 1 else ''} {unknown}")
    for name, value in settings.items():
        valid, rule = _SETTINGS.get(name, (lambda v: True, ""))
        if not valid(value):
            raise _bad(path, f"'settings.{name}'", value, rule)
    method = settings.get("method", AdaptSettings.method)
    if method != meta["method"]:
        raise _bad(path, "'settings.method'", method, f"the adapter's method {_show(meta['method'])}")
    if settings.get("targets") and method not in ADAPTER_METHODS:
        raise _bad(path, "'settings.targets'", settings["targets"],
                   f"null for method {method} (targets apply to {', '.join(ADAPTER_METHODS)})")
    try:
        AdaptSettings.from_dict(settings)
    except ArenaError as err:  # a range the settings enforce beyond the types checked here
        problems = getattr(err, "problems", None)
        if problems:
            name, value, rule = problems[0]
            raise _bad(path, f"'settings.{name}'", value, rule) from None
        raise ArenaError(f"adapter '{path}': metadata field 'settings' cannot work ({err}): {_FIX}") from None
    _check_ranks(path, meta, tensors)
    _check_reading(path, tensors)
    return meta


def _check_reading(path, tensors: dict[str, torch.Tensor]) -> None:
    """The frozen backbone's reading (:data:`arenaseg.reading.TENSORS`): all or none of its
    tensors, samples ``(n, C)`` with n ≥ 1 and one ``C``, mean and scale ``(C,)``."""
    from .reading import TENSORS

    held = [name for name in TENSORS if name in tensors]
    extra = sorted(n for n in tensors if n.startswith("reading.") and n not in TENSORS)
    if extra or 0 < len(held) < len(TENSORS):
        name = extra[0] if extra else next(n for n in TENSORS if n not in tensors)
        raise ArenaError(f"adapter '{path}': tensor '{name}' is {'unexpected' if extra else 'missing'} "
                         f"(the reading is {', '.join(TENSORS)}): {_FIX}")
    if not held:
        return
    structure = tensors["reading.structure"]
    channels = structure.shape[-1] if structure.dim() == 2 else None
    for name, want in (("reading.structure", 2), ("reading.background", 2), ("reading.mean", 1),
                       ("reading.scale", 1)):
        t = tensors[name]
        if t.dim() != want or t.shape[-1] != channels or t.shape[0] < 1 or not t.is_floating_point():
            raise ArenaError(f"adapter '{path}': tensor '{name}' has shape {tuple(t.shape)} "
                             f"(must be {'(n, C)' if want == 2 else '(C,)'}, C = {channels}, float): {_FIX}")


def _check_ranks(path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """The three rank fields agree with each other, with ``targets`` and with the tensors: each
    stored layer has its ``lora_A`` (first dimension: the stored rank), no adapter tensor belongs
    to another layer, and each effective rank counts the active components (ARENA's non-zero
    gates ``v``, AdaLoRA's non-zero ``lora_E``, LoRA's whole rank)."""
    method, ranks, initial, stored = meta["method"], meta["ranks"], meta["initial_ranks"], meta["stored_ranks"]
    if method not in ADAPTER_METHODS:
        for field in ("ranks", "initial_ranks", "stored_ranks"):
            if meta[field]:
                raise _bad(path, f"'{field}'", meta[field], f"empty for method {method} (no adapted layers)")
        return
    if set(ranks) != set(initial):
        raise _bad(path, "'ranks'", ranks, "an object with the layers of 'initial_ranks'")
    if "targets" in meta and set(meta["targets"]) != set(initial):
        raise _bad(path, "'targets'", meta["targets"], "the layers of 'initial_ranks'")
    for name, r in stored.items():
        if name not in initial or r > initial[name] or (method != "arena" and r != initial[name]):
            rule = "at most its rank in 'initial_ranks'" if method == "arena" else "its rank in 'initial_ranks'"
            raise _bad(path, f"'stored_ranks' of layer '{name}'", r,
                       rule if name in initial else "a layer of 'initial_ranks'")
    if method != "arena" and set(stored) != set(initial):
        raise _bad(path, "'stored_ranks'", stored, "an object with the layers of 'initial_ranks'")
    owners = {tensor.split(".lora_")[0] for tensor in tensors if ".lora_" in tensor}
    if method == "arena":
        owners |= {tensor[:-2] for tensor in tensors if tensor.endswith(".v") and tensor[:-2] in initial}
    extra = sorted(owners - set(stored))
    if extra:
        raise _bad(path, "'stored_ranks'", stored, f"an object that names every layer with tensors "
                   f"(the file has tensors of layer '{extra[0]}')")
    for name, r in stored.items():
        down = next((tensors[t] for t in (f"{name}.lora_A.weight", f"{name}.lora_A.default.weight",
                                           f"{name}.lora_A.default") if t in tensors), None)
        if down is None or down.dim() < 1 or down.shape[0] != r:
            held = "no tensor" if down is None else f"lora_A tensor {tuple(down.shape)}"
            raise _bad(path, f"'stored_ranks' of layer '{name}'", r,
                       f"the rank its tensors hold (the file has {held})")
        active = r
        if method == "arena":
            gates = tensors.get(f"{name}.v")
            if gates is None or tuple(gates.shape) != (r,):
                held = "no gates" if gates is None else f"gates of shape {tuple(gates.shape)}"
                raise _bad(path, f"'stored_ranks' of layer '{name}'", r,
                           f"the rank its tensors hold (the file has {held} {name}.v)")
            active = int(torch.count_nonzero(gates))
        elif method == "adalora" and f"{name}.lora_E.default" in tensors:
            active = int(torch.count_nonzero(tensors[f"{name}.lora_E.default"]))
        if ranks[name] != active:
            raise _bad(path, f"'ranks' of layer '{name}'", ranks[name],
                       f"{active}, the active components its tensors hold")
    for name in set(ranks) - set(stored):
        if ranks[name] != 0:
            raise _bad(path, f"'ranks' of layer '{name}'", ranks[name],
                       "0: the file holds no tensor of this layer")


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of an adapter file, the whole metadata validated
    (:func:`check_metadata`) before anything reads, loads or writes with it.

    Raises:
        ArenaError: missing, corrupt, edited into values that cannot work, or from another
            version of arenaseg (the message names both versions).
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
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError, RecursionError) as err:
        raise ArenaError(f"adapter '{path}' is corrupt or not an arenaseg adapter ({type(err).__name__}): "
                         "save it again with 'arenaseg adapt --adapter-out'") from None
    meta = check_metadata(path, meta, tensors)
    broken = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        raise ArenaError(f"adapter '{path}' is corrupt: non-finite values in {broken[:3]}: save it "
                         "again with 'arenaseg adapt --adapter-out'")
    return tensors, meta


def check_backbone(model: nn.Module, spec: BackboneSpec, meta: dict, source: str = "adapter") -> None:
    """Raise :class:`ArenaError` unless the adapter (``meta``) was made for exactly this
    backbone: its id and its weights checksum (:func:`~arenaseg.backbones.state_checksum`)."""
    if meta.get("backbone") != spec.id:
        raise ArenaError(f"adapter '{source}' was made for backbone '{meta.get('backbone')}', "
                         f"not '{spec.id}': use the backbone it was trained on")
    checksum = state_checksum(model)
    if meta.get("backbone_checksum") != checksum:
        given = getattr(model, "given_weights", None)
        loaded, fix = (f"{given[0]} '{given[1]}'",
                       ("drop --weights" if given[0] == "--weights" else f"give --backbone {spec.id}")
                       + " to use the installed weights, or give the file the adapter was made "
                       "with") if given else ("installed", "adapt again on the installed backbone")
        raise ArenaError(f"adapter '{source}' was made for other weights of backbone '{spec.id}' "
                         f"(checksum {str(meta.get('backbone_checksum'))[:12]}…, {loaded} "
                         f"{checksum[:12]}…): {fix}")


def apply_adapter(model: nn.Module, spec: BackboneSpec, tensors: dict[str, torch.Tensor],
                  meta: dict, source: str = "adapter") -> Method:
    """Prepare a freshly loaded backbone for the saved method and load the saved tensors (the
    frozen backbone's reading, ``reading.*``, is not the method's: it stays out).

    Raises:
        ArenaError: the adapter was made for another backbone (id or weights checksum), or its
            tensors do not fit.
    """
    check_backbone(model, spec, meta, source)
    modules = dict(model.named_modules())
    missing = [name for name in meta["stored_ranks"] if name not in modules]
    if missing:
        raise ArenaError(f"adapter '{source}': metadata field 'stored_ranks' names layer "
                         f"'{missing[0]}', which backbone '{spec.id}' does not have: {_FIX}")
    tuning = prepare(model, spec, AdaptSettings.from_dict(meta["settings"]), meta.get("structure"),
                     ranks=meta["stored_ranks"])
    load_state(tuning, {n: t for n, t in tensors.items() if not n.startswith("reading.")}, source)
    tuning.fresh_decoder = False
    return tuning
