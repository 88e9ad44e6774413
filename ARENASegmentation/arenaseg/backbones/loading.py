"""Loading a backbone: build its network, find its weights (embedded, cached, downloaded or a
local file), load them strictly and freeze.

``load_backbone("fseft-swinunetr")`` downloads the weights once into the cache
(``$ARENASEG_CACHE/backbones``, default ``~/.cache/arenaseg/backbones``), verifies and loads them
strictly; ``load_backbone("fseft-swinunetr", weights="fseft.pth")`` uses a local file instead
(firewalled machines). The specs are data in :mod:`arenaseg.registry` (re-exported here), the
networks in the family modules (:mod:`.monai_nets`, :mod:`.suprem`, :mod:`.merlin`).
"""

from __future__ import annotations

import hashlib
import inspect
import os
import weakref
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..download import cache_dir
from ..errors import ArenaError
from .registry import (BASE_ORGANS, DEFAULT_BACKBONE, EMBEDDED_BACKBONE, REGISTRY, BackboneSpec,  # noqa: F401
                       Preprocessing, WeightsSource, get_spec, spec_for_file)


def weights_path(spec: BackboneSpec):
    """Path of the spec's embedded weights file inside the installed package (may not exist)."""
    return resources.files("arenaseg") / "weights" / spec.weights


def cached_weights_path(spec: BackboneSpec) -> Path:
    """Where the spec's downloaded checkpoint lives: ``<cache>/backbones/<filename>``, the cache
    being ``$ARENASEG_CACHE`` or ``~/.cache/arenaseg``. Put a hand-downloaded file there."""
    return cache_dir() / "backbones" / spec.source.filename


#: model → (what its tensors were, their checksum): hashing half a gigabyte takes a second.
_CHECKSUMS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def state_checksum(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (sorted names, raw float bytes).

    It identifies the exact backbone weights an adapter was trained on, whatever file they came
    from. It is computed again only when a tensor was replaced or changed in place since the last
    call on ``model`` (each tensor's storage and version counter)."""
    state = sorted(model.state_dict().items())
    seen = tuple((name, t.data_ptr(), t._version, tuple(t.shape)) for name, t in state)
    if model in _CHECKSUMS and _CHECKSUMS[model][0] == seen:
        return _CHECKSUMS[model][1]
    digest = hashlib.sha256()
    for name, tensor in state:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    _CHECKSUMS[model] = (seen, digest.hexdigest())
    return _CHECKSUMS[model][1]


def _locate_weights(spec: BackboneSpec, download: bool, progress) -> Path:
    from ..download import fetch, verify

    src = spec.source
    if src.package:
        return _package_weights(spec)
    path = cached_weights_path(spec)
    if path.is_file():
        verify(path, src.sha256, src.md5, src.size)
        return path
    if not download or not src.urls:
        raise ArenaError(f"weights of backbone '{spec.id}' are not in the cache: download "
                         f"{src.urls[0] if src.urls else src.homepage} and put the file at "
                         f"'{path}', or pass it with --weights FILE")
    return fetch(src.urls, path, sha256=src.sha256, md5=src.md5, size=src.size, progress=progress)


def _package_weights(spec: BackboneSpec) -> Path:
    """The weights file a Python package provides (``spec.source.package``), checked again here
    (size and SHA-256) whatever the package checked."""
    from importlib import import_module

    src = spec.source
    module, _, name = src.package.partition(":")
    fix = f"install it with {src.install}, or pass a copy of the file with --weights FILE"
    try:
        package = import_module(module)
    except ImportError:
        raise ArenaError(f"the weights of backbone '{spec.id}' are not installed (Python package "
                         f"'{module}' is missing): {fix}") from None
    try:
        path = Path(package.path(name))
    except Exception as err:  # the package's own errors: a shard missing, a bad join
        raise ArenaError(f"the weights of backbone '{spec.id}' from package '{module}' could not "
                         f"be put together ({err}): reinstall them with {src.install} "
                         f"--force-reinstall, or pass a copy with --weights FILE") from None
    from ..download import file_digest

    damaged = f"delete it and reinstall with {src.install} --force-reinstall, or pass a copy with --weights FILE"
    if not path.is_file():
        raise ArenaError(f"package '{module}' gave '{path}' for the weights of backbone "
                         f"'{spec.id}', which does not exist: {damaged}")
    if src.size is not None and path.stat().st_size != src.size:
        raise ArenaError(f"the weights file '{path}' of backbone '{spec.id}' has "
                         f"{path.stat().st_size} bytes, expected {src.size} (partial): {damaged}")
    if src.sha256 and file_digest(path) != src.sha256:
        raise ArenaError(f"the weights file '{path}' of backbone '{spec.id}' has SHA-256 "
                         f"{file_digest(path)}, expected {src.sha256}: {damaged}")
    return path


def load_backbone(backbone_id: str | os.PathLike = DEFAULT_BACKBONE,
                  weights: str | os.PathLike | None = None, *, use_checkpoint: bool = False,
                  download: bool = True, progress: bool | Callable[[int, int | None], None] = True,
                  warn: Callable[[str], None] | None = None,
                  **build_overrides) -> tuple[nn.Module, BackboneSpec]:
    """Build a backbone and load its pretrained weights, frozen and in eval mode.

    Weights come from ``weights`` (a local checkpoint file) when given, else from the embedded
    file (``spec.weights``), else from the spec's public checkpoint: taken from the cache or
    downloaded once (:func:`arenaseg.download.fetch`: resumable, progress bar on stderr,
    checksum, atomic move). The file is read safely (:func:`arenaseg.checkpoints.read_state_dict`),
    its keys renamed by ``spec.source.key_rules`` and loaded strictly
    (:func:`arenaseg.checkpoints.load_strict`): parts listed in ``spec.source.reinit`` keep their
    fixed-seed initialisation. The load report is kept in ``model.load_report`` (None when
    untrained), a weights file given (``weights`` or a path as ``backbone_id``) in
    ``model.given_weights`` as ``(option, path)``.

    Backbones without weights (none embedded or published, or ``build_overrides`` that change
    the shapes, without ``weights``) are initialised with a fixed seed so that their checksum is
    reproducible.

    Args:
        backbone_id: registry id, or the path of a checkpoint whose file name is a registry
            entry's (e.g. ``fseft.pth``).
        weights: local checkpoint file (``.pt``/``.pth``/``.safetensors``) in the layout of the
            backbone's source; nothing is downloaded then.
        use_checkpoint: gradient checkpointing (SwinUNETR backbones: ``spec.checkpointing``).
        download: allow downloading a missing public checkpoint (False: only the cache).
        progress: show the download progress bar; a callable also gets (bytes done, total)
            after each chunk (:func:`arenaseg.download.fetch`).
        warn: told when ``weights`` is not the published file of a backbone whose SHA-256 is
            pinned (a copy that changed): it loads, but its adapters fit only that file.
        build_overrides: constructor overrides (e.g. ``feature_size=12``).

    Raises:
        ArenaError: unknown id, weights missing or not fitting the network (missing and
            unexpected keys named), download failure (URL and cache path named), checksum
            mismatch, gradient checkpointing asked of a backbone without it.
    """
    option = "--weights" if weights is not None else "--backbone"  # what gave a weights file
    if backbone_id not in REGISTRY and (os.sep in str(backbone_id) or Path(backbone_id).is_file()):
        weights = weights or backbone_id
        spec = spec_for_file(backbone_id)
    else:
        spec = get_spec(str(backbone_id))
    if use_checkpoint:
        if not spec.checkpointing:
            raise ArenaError(f"backbone '{spec.id}' does not support gradient checkpointing: drop "
                             "the option or choose one of "
                             f"{', '.join(s.id for s in REGISTRY.values() if s.checkpointing)}")
        build_kwargs = dict(build_overrides, use_checkpoint=True)
    else:
        build_kwargs = dict(build_overrides)
    if "use_checkpoint" in build_kwargs and \
            "use_checkpoint" not in inspect.signature(spec.build).parameters:
        build_kwargs.pop("use_checkpoint")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = spec.build(**build_kwargs)
    report = None
    if weights is not None:
        report = _load_file(model, spec, Path(weights))
        _check_published(spec, Path(weights), warn, option)
    elif spec.weights and not build_overrides:
        path = weights_path(spec)
        if not path.is_file():
            raise ArenaError(f"weights of backbone '{spec.id}' are missing at '{path}': "
                             "reinstall arenaseg, or pass weights of this backbone (e.g. made by "
                             "'arenaseg pretrain') with --weights FILE")
        report = _load_file(model, spec, Path(str(path)), hint="reinstall arenaseg")
    elif spec.source is not None and not build_overrides:
        report = _load_file(model, spec, _locate_weights(spec, download, progress))
    model.load_report = report
    model.given_weights = None if weights is None else (option, str(weights))  # for check_backbone
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, spec


def _check_published(spec: BackboneSpec, path: Path, warn: Callable[[str], None] | None,
                     option: str) -> None:
    """Warn when ``path`` (given with ``option``) is not the published file of ``spec`` (pinned
    SHA-256)."""
    src = spec.source
    if warn is None or src is None or not src.sha256:
        return
    from ..download import file_digest

    digest = file_digest(path)
    if digest != src.sha256:
        fix = "drop --weights" if option == "--weights" else f"give --backbone {spec.id}"
        warn(f"{option} '{path}' is not the published weights file of backbone '{spec.id}' "
             f"(SHA-256 {digest[:12]}…, published {src.sha256[:12]}…): it loads, but adapters "
             f"made with it fit only this file; {fix} to use the installed weights")


def _load_file(model: nn.Module, spec: BackboneSpec, path: Path, hint: str | None = None):
    from .checkpoints import load_strict, map_keys, read_state_dict

    state = read_state_dict(path)
    if spec.source is not None:
        state = map_keys(state, spec.source.key_rules)
    try:
        return load_strict(model, state, path, spec.source.reinit if spec.source else ())
    except ArenaError as err:
        if hint is None:
            raise
        raise ArenaError(f"{err}; {hint}") from None
