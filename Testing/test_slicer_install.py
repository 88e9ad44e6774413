"""First-use install (``dependencies.ensure``) and Windows console windows (``process``).

No Slicer application runs here: ``slicer.app`` is a recorder of the override cursor, and the
dialog functions of the real ``slicer.util`` (``errorDisplay``, ``confirmOkCancelDisplay``,
``confirmYesNoDisplay``) are replaced by recorders that stand in for the GUI dialogs. pip runs for
real, with no index (``PIP_NO_INDEX``) so that nothing is downloaded: a requirement that cannot
exist fails, and a hand-made local wheel installs into a temporary target folder.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import subprocess
import sys
import types
import zipfile

import pytest

from slicer_testing import MODULE_DIR

sys.path.insert(0, str(MODULE_DIR))
from ARENASegmentationLib import dependencies, process  # noqa: E402

BACKBONE = "arena-small-ct-unet"  # installed in the test environment: only the patched requirement is missing


class FakeApp:
    """``slicer.app``: counts the override cursors (Slicer's ``setOverrideCursor`` stacks them)."""

    def __init__(self):
        self.cursorDepth = 0
        self.cursorSets = 0
        self.restarted = False

    def setOverrideCursor(self, cursor):
        self.cursorDepth += 1
        self.cursorSets += 1

    def restoreOverrideCursor(self):
        self.cursorDepth -= 1

    testingEnabled = staticmethod(lambda: False)  # Slicer's API name; not a test

    def processEvents(self):
        pass

    def restart(self):  # what slicer.util.restart() calls
        self.restarted = True


@pytest.fixture
def gui(monkeypatch):
    """A fake ``slicer.app`` and recorders for the dialogs; each records the cursor depth at the
    moment the dialog would be shown."""
    import slicer
    import slicer.util

    app = FakeApp()
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setitem(sys.modules, "qt", types.SimpleNamespace(Qt=types.SimpleNamespace(WaitCursor=3)))
    rec = types.SimpleNamespace(app=app, errors=[], confirms=[], yesNo=[], statuses=[], answer=True)

    def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
        rec.errors.append({"text": text, "cursor": app.cursorDepth, **kwargs})

    def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):
        rec.confirms.append({"text": text, "cursor": app.cursorDepth})
        return rec.answer

    def confirmYesNoDisplay(text, windowTitle=None, parent=None, **kwargs):
        rec.yesNo.append({"text": text, "cursor": app.cursorDepth, **kwargs})
        return True

    monkeypatch.setattr(slicer.util, "errorDisplay", errorDisplay)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirmOkCancelDisplay)
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", confirmYesNoDisplay)
    for name in ("PIP_FIND_LINKS", "PIP_TARGET", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # never download
    return rec


# --- fault 6: one error dialog, no command line, no wait cursor under a dialog ---------------

def test_a_failed_pip_shows_one_short_error_dialog_and_restores_the_cursor(gui, monkeypatch):
    missing = "arena-no-such-package-7f3>=1"
    monkeypatch.setattr(dependencies, "BASE_REQUIREMENTS", dependencies.BASE_REQUIREMENTS + [missing])
    assert dependencies.ensure("arena", BACKBONE, gui.statuses.append) is False

    assert len(gui.confirms) == 1 and gui.confirms[0]["cursor"] == 0  # the question: normal cursor
    assert len(gui.errors) == 1, gui.errors  # exactly one error dialog
    error = gui.errors[0]
    assert error["cursor"] == 0
    assert missing in error["text"] and "network" in error["text"]  # what failed, and the fix
    for command in ("-m pip", "pip install", sys.executable, "constraints", "returned non-zero"):
        assert command not in error["text"], command
    assert "arena-no-such-package-7f3" in error["detailedText"]  # pip's own output, for 'Show Details'
    assert gui.app.cursorSets >= 1 and gui.app.cursorDepth == 0  # the cursor was set while pip ran, then restored
    assert gui.statuses and not dependencies.isInstalling()


def test_declining_returns_false_without_an_error_dialog(gui, monkeypatch):
    monkeypatch.setattr(dependencies, "BASE_REQUIREMENTS", dependencies.BASE_REQUIREMENTS + ["arena-no-such-package-7f3"])
    gui.answer = False
    assert dependencies.ensure("arena", BACKBONE, gui.statuses.append) is False
    assert len(gui.confirms) == 1 and gui.confirms[0]["cursor"] == 0
    assert gui.errors == [] and gui.app.cursorDepth == 0 and gui.app.cursorSets == 1  # only around the plan
    assert gui.statuses


def test_nothing_missing_returns_true_without_any_dialog(gui):
    assert dependencies.ensure("arena", BACKBONE) is True
    assert gui.confirms == gui.errors == gui.yesNo == [] and gui.app.cursorDepth == 0


def test_a_second_install_is_refused_with_one_dialog(gui, monkeypatch):
    monkeypatch.setattr(dependencies, "_installing", True)
    assert dependencies.ensure("arena", BACKBONE) is False
    assert gui.confirms == [] and len(gui.errors) == 1 and "already installing" in gui.errors[0]["text"]


def test_the_wait_cursor_is_restored_when_the_work_fails(gui):
    with pytest.raises(ValueError):
        with dependencies.waitCursor():
            assert gui.app.cursorDepth == 1
            raise ValueError("boom")
    assert gui.app.cursorDepth == 0


# --- fault 7: a restart when an install replaced a loaded distribution ------------------------

def test_restart_needed_only_for_changed_distributions_already_imported():
    names = {"torch": ["torch"], "monai": ["monai"], "scikit-image": ["skimage"], "numpy": ["numpy"]}
    before = {"torch": "2.1.0", "monai": "1.3.0", "numpy": "1.26.4"}
    after = {"torch": "2.5.1", "monai": "1.4.0", "numpy": "1.26.4", "scikit-image": "0.24"}
    changed = dependencies.changedDistributions(before, after)
    assert changed == ["monai", "scikit-image", "torch"]
    assert dependencies.needsRestart({"torch", "torch.nn", "os"}, changed, names) == ["torch"]
    assert dependencies.needsRestart({"os"}, changed, names) == []  # nothing loaded: no restart
    assert dependencies.needsRestart({"skimage.io", "monai"}, changed, names) == ["monai", "scikit-image"]
    assert dependencies.needsRestart({"numpy"}, changed, names) == []  # loaded but unchanged
    assert dependencies.needsRestart({"some_pkg"}, ["Some.Pkg"], {}) == ["some-pkg"]  # no metadata: its name


def _wheel(folder, name: str, version: str):
    """A minimal pure-Python wheel of ``name`` (import name ``name`` with underscores)."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = {f"{module}/__init__.py": f"VERSION = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
             f"{info}/top_level.txt": f"{module}\n"}

    def digest(text):
        return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()

    record = "".join(f"{path},{digest(text)},{len(text.encode())}\n" for path, text in files.items())
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in {**files, f"{info}/RECORD": record + f"{info}/RECORD,,\n"}.items():
            archive.writestr(member, text)
    return path


def test_an_install_that_replaces_a_loaded_package_asks_for_a_restart(gui, monkeypatch, tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    target.mkdir()
    _wheel(wheels, "arena-restart-probe", "2.0")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_TARGET", str(target))  # not this environment's site-packages
    monkeypatch.syspath_prepend(str(target))
    # another extension has imported the package: its module object stays in this process
    monkeypatch.setitem(sys.modules, "arena_restart_probe", types.ModuleType("arena_restart_probe"))
    monkeypatch.setattr(dependencies, "BASE_REQUIREMENTS", dependencies.BASE_REQUIREMENTS + ["arena-restart-probe>=2"])

    assert dependencies.ensure("arena", BACKBONE, gui.statuses.append) is False  # no run on a stale process
    assert (target / "arena_restart_probe" / "__init__.py").is_file()  # pip did install it
    assert gui.errors == []
    assert len(gui.yesNo) == 1 and gui.yesNo[0]["cursor"] == 0
    assert "arena-restart-probe" in gui.yesNo[0]["text"] + gui.yesNo[0]["detailedText"]
    assert gui.app.restarted and gui.app.cursorDepth == 0  # answered Yes: slicer.util.restart()


# --- fault 11: no console window on Windows ---------------------------------------------------

class _WindowsOs:
    """``process.os`` on Windows (``os.name == "nt"``) for the module under test only: patching the
    real ``os.name`` would also turn pathlib (and pytest's own reporting) into Windows code."""

    name = "nt"

    def __getattr__(self, attribute):
        return getattr(os, attribute)


class _Recorder:
    def __init__(self, result=None):
        self.calls, self.result = [], result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_taskkill_runs_without_a_console_window_on_windows(monkeypatch):
    run = _Recorder(subprocess.CompletedProcess([], 0))
    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setattr(process, "os", _WindowsOs())
    process.killProcessTree(types.SimpleNamespace(pid=4242))
    (args, kwargs), = run.calls
    assert args[0][0] == "taskkill" and "4242" in args[0]
    assert kwargs["creationflags"] & 0x08000000  # CREATE_NO_WINDOW


def test_the_worker_starts_without_a_console_window_on_windows(monkeypatch, tmp_path):
    child = types.SimpleNamespace(pid=4242, stdin=io.BytesIO(), stdout=io.BytesIO(b""), wait=lambda *a: 0,
                                  poll=lambda: 0)
    popen = _Recorder(child)
    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(process, "os", _WindowsOs())
    worker = process.WorkerProcess(["PythonSlicer", "-m", "arenaseg.worker"], {}, tmp_path / "worker.log")
    worker.readerThread.join(5)
    worker.close()
    (_, kwargs), = popen.calls
    assert kwargs["creationflags"] & 0x08000000 and "start_new_session" not in kwargs


def test_pip_runs_without_a_console_window_on_windows(monkeypatch):
    popen = _Recorder(RuntimeError("recorded"))
    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(process, "os", _WindowsOs())
    with pytest.raises(RuntimeError, match="recorded"):
        dependencies.runPythonModule("pip", ["--version"])
    assert popen.calls[0][1]["creationflags"] & 0x08000000


def test_no_windows_flags_elsewhere():
    if process.os.name != "nt":
        assert process.noConsoleWindow() == {}  # creationflags is rejected outside Windows
