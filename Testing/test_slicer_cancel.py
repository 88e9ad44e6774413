"""Cancel in a real Slicer: the worker runs behind a launcher stand-in that forwards no signal
(as PythonSlicer does), so only a cooperative stop (end of stdin) or killing the process tree
reaches it. Cancel, scene close and the Widget's cleanup() must each leave no process and no
output, and the segmentation unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import ABDOMEN_SMALL, LIVER
from slicer_testing import import_module, slicer_app  # noqa: F401 (fixture)

HERE = Path(__file__).resolve().parent
LAUNCHER = [sys.executable, str(HERE / "launcher_stand_in.py"), sys.executable]


def alive(pid) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def module():
    return import_module()


@pytest.fixture()
def painted_small(module, slicer_app):  # noqa: F811
    """The small abdomen CT (122x101x30) in a fresh scene, 3 liver slices painted; the scene is
    ``slicer.mrmlScene`` for the test and can be closed by it."""
    import slicer
    import SimpleITK as sitk
    from arenaseg.io.annotations import paint_slices

    saved = slicer.mrmlScene
    slicer.mrmlScene = scene = slicer.vtkMRMLScene()
    ct = sitk.ReadImage(str(ABDOMEN_SMALL / "ct.nii.gz"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(ABDOMEN_SMALL / "labels.nii.gz")))  # kji
    direction = np.array(ct.GetDirection()).reshape(3, 3) * ct.GetSpacing()
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = np.diag([-1, -1, 1]) @ direction
    ijk_to_ras[:3, 3] = np.array(ct.GetOrigin()) * [-1, -1, 1]
    volume = slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(ct), ijk_to_ras, "small ct")
    painted = (paint_slices(labels.transpose(2, 1, 0), LIVER, 3, axis=2).transpose(2, 1, 0) > 0).astype(np.uint8)
    node = module.ARENASegmentationLogic.createSegmentationNode(volume, "painted")
    target = node.GetSegmentation().AddEmptySegment("", "liver")
    slicer.util.updateSegmentBinaryLabelmapFromArray(painted, node, target, volume)
    yield scene, volume, node, target, painted
    slicer.mrmlScene = saved


def start_behind_launcher(module, volume, node, target, command=None):
    """A long run (1000 steps) started through the launcher stand-in, waited for until training
    runs (or, for the stubborn worker, until it started)."""
    logic = module.ARENASegmentationLogic()
    logic.pythonCommand = lambda: command or LAUNCHER
    logic.startAdapt(volume, node, target, device="cpu", settings={"steps": 1000})
    launcher = logic.job["worker"].process.pid
    deadline = time.monotonic() + 300
    while logic.processEvents() and (logic.lastProgress is None if command is None else logic.workerPid is None):
        assert time.monotonic() < deadline, "the worker never started training"
        time.sleep(0.05)
    assert logic.isRunning and logic.workerPid not in (None, launcher)
    return logic, launcher, logic.job["runDir"]


def assert_nothing_left(module, logic, pids, run_dir, node, volume, painted):
    assert not logic.isRunning and logic.lastOutcome["status"] == "cancelled"
    assert not [pid for pid in pids if alive(pid)], "a process outlived the cancel"
    assert not run_dir.exists()
    seg = node.GetSegmentation()
    assert seg.GetNumberOfSegments() == 1
    assert np.array_equal(module.ARENASegmentationLogic.segmentArray(node, seg.GetNthSegmentID(0), volume), painted)


def test_launcher_stand_in_forwards_no_signal():
    """What makes the old cancel (SIGTERM to the launcher) useless: the child lives on."""
    proc = subprocess.Popen(LAUNCHER + ["-c", "import time, os; print(os.getpid(), flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    proc.terminate()
    proc.wait(10)
    try:
        assert alive(child)
    finally:
        psutil.Process(child).kill()


def test_cancel_stops_the_real_worker_behind_the_launcher(module, painted_small):
    _, volume, node, target, painted = painted_small
    logic, launcher, run_dir = start_behind_launcher(module, volume, node, target)
    worker = logic.workerPid
    # A loaded CI machine may take longer than the 5 s safety net for one step: here the worker
    # must stop by itself, so the net is pushed out of the way.
    logic.job["worker"].graceSeconds = 60
    logic.cancel()
    start = time.monotonic()
    outcome = logic.waitForCompletion(timeout=60, pollInterval=0.02)
    seconds = time.monotonic() - start
    print(f"cancel through the launcher: worker gone after {seconds:.2f} s")
    assert outcome["status"] == "cancelled"
    assert "cancelled" in logic.log  # the worker itself stopped (cooperative), it was not killed
    assert seconds < 60  # issue 13 asks for 2 s on an idle machine; printed above (bench/CANCEL.md)
    assert_nothing_left(module, logic, [worker, launcher], run_dir, node, volume, painted)


def test_closing_the_scene_stops_the_worker(module, painted_small):
    scene, volume, node, target, painted = painted_small
    logic, launcher, run_dir = start_behind_launcher(module, volume, node, target)
    worker = logic.workerPid
    scene.Clear(0)  # File > Close scene
    assert not logic.isRunning and logic.lastOutcome["status"] == "cancelled"
    assert not alive(worker) and not alive(launcher)
    assert not run_dir.exists()


def test_widget_cleanup_stops_the_worker(module, painted_small):
    _, volume, node, target, painted = painted_small
    logic, launcher, run_dir = start_behind_launcher(module, volume, node, target)
    worker = logic.workerPid
    widget = module.ARENASegmentationWidget(None)
    widget.logic = logic
    widget.cleanup()  # Slicer closing
    assert_nothing_left(module, logic, [worker, launcher], run_dir, node, volume, painted)


def test_a_worker_that_ignores_cancel_is_killed_with_its_tree(module, painted_small):
    _, volume, node, target, painted = painted_small
    stubborn = LAUNCHER + [str(HERE / "stubborn_worker.py")]
    logic, launcher, run_dir = start_behind_launcher(module, volume, node, target, command=stubborn)
    worker = logic.workerPid
    logic.CANCEL_GRACE_SECONDS = 0.5
    logic.job["worker"].graceSeconds = 0.5
    logic.cancel()
    outcome = logic.waitForCompletion(timeout=30, pollInterval=0.02)
    assert outcome["status"] == "cancelled"
    assert_nothing_left(module, logic, [worker, launcher], run_dir, node, volume, painted)


def test_undecodable_output_and_a_crash_still_end_the_job(module, tmp_path):
    """Bytes that are not UTF-8 and lines that are not JSON are logged; the job always ends."""
    from ARENASegmentationLib.process import WorkerProcess

    script = ("import sys; sys.stdout.buffer.write(b'caf\\xe9 \\xff not json\\n'); "
              "sys.stdout.buffer.write(b'[1, 2]\\n'); sys.stdout.flush(); sys.exit(3)")
    worker = WorkerProcess([sys.executable, "-c", script], {}, tmp_path / "log.txt")
    events, deadline = [], time.monotonic() + 30
    while not events or events[-1]["event"] != "exit":
        assert time.monotonic() < deadline, f"no exit event: {events}"
        events += worker.events()
        time.sleep(0.02)
    worker.close()
    assert events[-1] == {"event": "exit", "returncode": 3}
    assert [e["event"] for e in events[:-1]] == ["log", "log"]
    assert "\ufffd" in events[0]["line"] and json.loads(events[1]["line"]) == [1, 2]


def test_a_run_that_ends_normally_exits_cleanly_while_stdin_stays_open(small_liver, tmp_path):
    """The stdin watcher must not break a normal exit (it once aborted Python's shutdown:
    "could not acquire lock for <stdin> at interpreter shutdown", exit -6)."""
    job = {"command": "adapt", "image": str(ABDOMEN_SMALL / "ct.nii.gz"), "annotations": str(small_liver[0]),
           "label": LIVER, "out": str(tmp_path / "seg.nii.gz"), "device": "cpu", "settings": {"steps": 2},
           "stop_on_stdin_eof": True}
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = subprocess.Popen([sys.executable, "-m", "arenaseg.worker", str(tmp_path / "job.json")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read().decode()
    err = proc.stderr.read().decode()
    proc.wait(60)
    proc.stdin.close()
    assert proc.returncode == 0, err[-2000:]
    assert json.loads(out.splitlines()[-1])["event"] == "done" and "Fatal Python error" not in err
