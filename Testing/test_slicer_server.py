"""The Slicer module with a server (issue 22): a real ``arenaseg serve`` on loopback with a real
token, the module's Logic and the effect's logic on real MRML (slicer-core), the same background
worker, which runs the job on the server. The result equals a local run's, progress arrives,
Cancel cancels the job on the server, and a bad token or an unreachable server is one line with
the user's segment untouched.

Small jobs (the embedded backbone, 2 training steps, the 122x101x30 abdomen CT) keep the module
near a minute and a half on 2 CPU cores.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ABDOMEN_SMALL, LIVER
from slicer_testing import MODULE_DIR, import_module, slicer_app  # noqa: F401 (fixture)

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

#: Slicer's PythonSlicer stand-in: forwards stdin but no signal, so Cancel is the end of stdin only.
LAUNCHER = [sys.executable, str(Path(__file__).resolve().parent / "launcher_stand_in.py"), sys.executable]
SMALL = {"backbone": "arena-small-ct-unet", "device": "cpu", "steps": 2, "warmStart": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv("ARENASEG_ADAPTERS", str(tmp_path_factory.mktemp("adapters")))
    patch.delenv("ARENASEG_TOKEN", raising=False)  # the token comes from the token file here
    yield import_module()
    patch.undo()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``arenaseg serve`` on a free loopback port, this worktree's engine, a token for alice in a
    token file (as the module's settings name it)."""
    root = tmp_path_factory.mktemp("slicer-server")
    data = root / "data"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(MODULE_DIR), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "arenaseg"]
    out = subprocess.run(command + ["token", "add", "--data", str(data), "alice"], env=env,
                         capture_output=True, text=True, check=True).stdout
    token = root / "alice.token"
    token.write_text(out.split()[-1] + "\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(command + ["serve", "--port", str(port), "--data", str(data)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                httpx.get(url + "/v1/version", timeout=1)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, (root / "server.log").read_text()
                time.sleep(0.1)
        else:
            raise AssertionError("the server did not start")
        yield {"url": url, "tokenFile": str(token), "root": root}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def jobs_on(server) -> list:
    """alice's jobs on the server, oldest first, as the server reports them."""
    token = open(server["tokenFile"]).read().strip()
    answer = httpx.get(server["url"] + "/v1/jobs", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert answer.status_code == 200, answer.text
    return sorted(answer.json(), key=lambda job: job["created"])


@pytest.fixture()
def painted_small(module, slicer_app):  # noqa: F811
    """The small abdomen CT in a fresh scene, 3 axial liver slices painted in segment "liver"."""
    import SimpleITK as sitk
    import slicer
    from arenaseg.io.annotations import paint_slices

    saved = slicer.mrmlScene
    slicer.mrmlScene = slicer.vtkMRMLScene()
    ct = sitk.ReadImage(str(ABDOMEN_SMALL / "ct.nii.gz"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(ABDOMEN_SMALL / "labels.nii.gz")))  # kji
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = np.diag([-1, -1, 1]) @ np.array(ct.GetDirection()).reshape(3, 3) * ct.GetSpacing()
    ijk_to_ras[:3, 3] = np.array(ct.GetOrigin()) * [-1, -1, 1]
    volume = slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(ct), ijk_to_ras, "small ct")
    painted = (paint_slices(labels.transpose(2, 1, 0), LIVER, 3, axis=2).transpose(2, 1, 0) > 0).astype(np.uint8)
    node = module.ARENASegmentationLogic.createSegmentationNode(volume, "painted")
    target = node.GetSegmentation().AddEmptySegment("", "liver")
    slicer.util.updateSegmentBinaryLabelmapFromArray(painted, node, target, volume)
    yield volume, node, target, painted
    slicer.mrmlScene = saved


def untouched(module, node, target, volume, painted) -> bool:
    segmentation = node.GetSegmentation()
    return segmentation.GetNumberOfSegments() == 1 and np.array_equal(
        module.ARENASegmentationLogic.segmentArray(node, target, volume), painted)


def test_the_effect_on_a_server_gives_the_local_result_with_its_progress(module, server, painted_small):
    from ARENASegmentationLib import editing

    volume, node, target, painted = painted_small
    logic = module.ARENASegmentationLogic()
    logic.startAdapt(volume, node, target, **SMALL)
    local = logic.waitForCompletion(timeout=300)
    assert local["status"] == "done", local["message"]
    assert logic.server == "" and any(line.startswith("started on this computer (cpu)") for line in logic.log)

    # The effect, with the settings the module passes it (runSettings: the panel's and the server's)
    effect = editing.EffectLogic(logic, lambda: dict(SMALL, server=server["url"] + "/",
                                                     tokenFile=server["tokenFile"]))
    events = []
    effect.run(node, target, volume, onProgress=events.append)
    assert logic.where() == f"on server {server['url']}"  # the panel says so from the start
    remote = logic.waitForCompletion(timeout=300)
    assert remote["status"] == "done", remote["message"]
    assert np.array_equal(remote["result"], local["result"]) and remote["result"].any()
    assert remote["summary"]["ranks"] == local["summary"]["ranks"]
    assert [e["step"] for e in events] == [1, 2] and logic.history == [(e["step"], e["loss"], e["total_rank"])
                                                                      for e in events]
    assert f"started on server {server['url']} (cpu)" in logic.log
    assert any(line.startswith("uploading ") for line in logic.log)
    assert os.path.isfile(remote["summary"]["adapter"])  # downloaded, then kept like a local one
    assert remote["summary"]["server"] == server["url"] and local["summary"]["server"] is None
    assert f"on cpu of server {server['url']}" in module.results.summaryText(remote["summary"])
    assert effect.session.hasPreview and untouched(module, node, target, volume, painted)
    assert jobs_on(server)[-1]["state"] == "done"


def test_cancel_cancels_the_job_on_the_server(module, server, painted_small):
    """Through the launcher stand-in, as in Slicer: only the end of stdin reaches the worker."""
    volume, node, target, painted = painted_small
    logic = module.ARENASegmentationLogic()
    logic.pythonCommand = lambda: LAUNCHER
    logic.startAdapt(volume, node, target, **dict(SMALL, steps=1000), server=server["url"],
                     tokenFile=server["tokenFile"])
    run_dir = logic.job["runDir"]
    deadline = time.monotonic() + 300
    while logic.processEvents() and logic.lastProgress is None:
        assert time.monotonic() < deadline, "training never started on the server"
        time.sleep(0.05)
    assert jobs_on(server)[-1]["state"] == "running"
    logic.job["worker"].graceSeconds = 60  # the worker must stop by itself, not by the safety net
    logic.cancel()
    start = time.monotonic()
    outcome = logic.waitForCompletion(timeout=60, pollInterval=0.02)
    print(f"cancel through the server: worker gone after {time.monotonic() - start:.2f} s")
    assert outcome["status"] == "cancelled" and "cancelled" in logic.log
    assert jobs_on(server)[-1]["state"] == "cancelled"
    assert not run_dir.exists() and untouched(module, node, target, volume, painted)


@pytest.mark.parametrize("case", ["bad token", "no server there"])
def test_a_refused_or_unreachable_server_is_one_line_and_the_segment_is_untouched(module, server, painted_small,
                                                                                  tmp_path, case):
    volume, node, target, painted = painted_small
    tokenFile, url = server["tokenFile"], server["url"]
    if case == "bad token":
        tokenFile = tmp_path / "wrong.token"
        tokenFile.write_text("not-a-token\n")
    else:
        url = f"http://127.0.0.1:{free_port()}"
    before = len(jobs_on(server))
    logic = module.ARENASegmentationLogic()
    logic.startAdapt(volume, node, target, **SMALL, server=url, tokenFile=str(tokenFile))
    outcome = logic.waitForCompletion(timeout=120)
    message = outcome["message"]
    assert outcome["status"] == "error" and "\n" not in message and url in message
    assert ("the token is not known to this server (HTTP 401)" in message if case == "bad token"
            else "cannot be reached" in message and "arenaseg serve" in message)
    assert untouched(module, node, target, volume, painted) and len(jobs_on(server)) == before


def test_settings_that_cannot_work_are_refused_before_any_process(module, painted_small, tmp_path):
    volume, node, target, painted = painted_small
    logic = module.ARENASegmentationLogic()
    for server, tokenFile, expected in (("gpu.example.org:8765", "", "not an http:// or https:// address"),
                                        ("http://127.0.0.1:8765", "", "no token"),
                                        ("http://127.0.0.1:8765", str(tmp_path / "missing"), "cannot be read")):
        with pytest.raises(RuntimeError, match=expected):
            logic.startAdapt(volume, node, target, **SMALL, server=server, tokenFile=tokenFile)
        assert not logic.isRunning
    assert untouched(module, node, target, volume, painted)


def test_a_worker_cancelled_before_its_job_exists_leaves_nothing_on_the_server(server, small_liver, tmp_path):
    """stdin closed at once (Cancel right after Adapt): no job is left running on the server,
    the worker says cancelled, exit 143, no output here. Engine level: the worker alone."""
    import json

    before = len(jobs_on(server))
    job = {"command": "adapt", "image": str(ABDOMEN_SMALL / "ct.nii.gz"), "annotations": str(small_liver[0]),
           "label": LIVER, "out": str(tmp_path / "seg.nrrd"), "device": "cpu", "settings": {"steps": 2},
           "stop_on_stdin_eof": True, "server": server["url"]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = dict(os.environ, ARENASEG_TOKEN=open(server["tokenFile"]).read().strip(),
               PYTHONPATH=os.pathsep.join(filter(None, [str(MODULE_DIR), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "arenaseg.worker", str(tmp_path / "job.json")],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 143 and json.loads(done.stdout.splitlines()[-1]) == {"event": "cancelled"}
    assert all(job["state"] in ("cancelled", "done", "failed") for job in jobs_on(server)[before:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.json"]


def test_the_panel_says_where_jobs_run_or_what_is_wrong(module, monkeypatch, tmp_path):
    """The line under the Server settings (the Qt widgets are stand-ins: no Slicer application)."""
    import types

    token = tmp_path / "token"
    token.write_text("secret\n")
    widget = module.ARENASegmentationWidget()
    widget.ui = types.SimpleNamespace(serverWhereLabel=types.SimpleNamespace(text=""))
    for settings, expected in (({"server": "", "tokenFile": ""}, "Jobs run on this computer."),
                               ({"server": "https://gpu.example.org:8765/", "tokenFile": str(token)},
                                "Jobs run on server https://gpu.example.org:8765."),
                               ({"server": "https://gpu.example.org:8765", "tokenFile": str(tmp_path / "gone")},
                                "cannot be read"),
                               ({"server": "gpu.example.org", "tokenFile": str(token)}, "not an http://")):
        monkeypatch.setattr(module, "serverSettings", lambda settings=settings: settings)
        widget.showWhereJobsRun()
        assert expected in widget.ui.serverWhereLabel.text
