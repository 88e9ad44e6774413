"""The department server (issue 22), loopback only: `arenaseg serve` as a real process on a free
port with a temporary --data, two users' tokens, the command line's --server client, and the
raw HTTP API for what a client must not be able to do.

Short jobs (2 training steps) keep the module within a few minutes on 2 CPU cores.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from arenaseg import __version__  # noqa: E402
from arenaseg.cli import main  # noqa: E402
from arenaseg.download import file_digest  # noqa: E402
from conftest import ABDOMEN_SMALL, LIVER  # noqa: E402

CT = ABDOMEN_SMALL / "ct.nii.gz"
ARENASEG = [sys.executable, "-m", "arenaseg"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_token(data, name) -> str:
    out = subprocess.run(ARENASEG + ["token", "add", "--data", str(data), name],
                         capture_output=True, text=True, check=True).stdout
    return out.split()[-1]


class Server:
    def __init__(self, data, max_upload_mb=1, options=()):
        self.data, self.max_upload_mb, self.options = data, max_upload_mb, list(options)
        self.proc = None

    def start(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.data.parent / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(ARENASEG + ["serve", "--port", str(self.port), "--data",
                                                 str(self.data), "--max-upload-mb",
                                                 str(self.max_upload_mb)] + self.options,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(200):
            try:
                httpx.get(self.url + "/v1/version", timeout=1)
                return self
            except httpx.HTTPError:
                assert self.proc.poll() is None, (self.data.parent / f"server-{self.port}.log").read_text()
                time.sleep(0.1)
        raise AssertionError("the server did not start")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.log.close()


def api(server, token, version=__version__):
    headers = {"X-Arenaseg-Version": version}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=server.url, headers=headers, timeout=60)


def events(client, job_id, until=("done", "error", "cancelled")):
    """The job's server-sent events, parsed, as they come."""
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                yield event
                if event["event"] in until:
                    return


def upload(client, path) -> str:
    response = client.post("/v1/uploads", content=path.read_bytes())
    assert response.status_code == 201, response.text
    return response.json()["sha256"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_liver):
    root = tmp_path_factory.mktemp("server")
    data = root / "data"
    alice, bob = add_token(data, "alice"), add_token(data, "bob")
    server = Server(data).start()
    yield {"root": root, "data": data, "alice": alice, "bob": bob, "server": server,
           "painted": small_liver[0]}
    if server.proc.poll() is None:
        server.stop()


def remote(setup, argv, token=None, **kwargs):
    env = dict(os.environ, ARENASEG_TOKEN=token or setup["alice"])
    return subprocess.run(ARENASEG + argv + ["--server", setup["server"].url], env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)


def adapt_options(setup, out_dir):
    return ["adapt", "--image", str(CT), "--annotations", str(setup["painted"]),
            "--label", str(LIVER), "--structure", "liver", "--steps", "2", "--seed", "3",
            "--device", "cpu", "--out", str(out_dir / "seg.nii.gz"),
            "--adapter-out", str(out_dir / "liver.safetensors")]


@pytest.fixture(scope="module")
def remote_adapt(setup):
    out = setup["root"] / "remote"
    out.mkdir()
    run = remote(setup, adapt_options(setup, out))
    assert run.returncode == 0, run.stderr
    return out, run


def test_remote_adapt_gives_the_local_result(setup, remote_adapt, tmp_path, capsys):
    out, run = remote_adapt
    assert "reading " + str(CT) in run.stderr  # the phases, with the client's own paths
    assert "training 2 steps" in run.stderr and "job " in run.stderr
    assert f"wrote {out / 'seg.nii.gz'} and {out / 'liver.safetensors'}" in run.stdout
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary left

    assert main(adapt_options(setup, tmp_path)) == 0  # the same job, here
    capsys.readouterr()
    remote_seg, local_seg = (sitk.ReadImage(str(d / "seg.nii.gz")) for d in (out, tmp_path))
    assert np.array_equal(sitk.GetArrayFromImage(remote_seg), sitk.GetArrayFromImage(local_seg))
    assert sitk.GetArrayFromImage(remote_seg).any()
    for geometry in ("GetOrigin", "GetSpacing", "GetDirection", "GetSize"):
        assert getattr(remote_seg, geometry)() == pytest.approx(getattr(local_seg, geometry)())
    from safetensors.numpy import load_file

    remote_adapter, local_adapter = (load_file(str(d / "liver.safetensors")) for d in (out, tmp_path))
    assert remote_adapter.keys() == local_adapter.keys()
    assert all(np.array_equal(remote_adapter[k], local_adapter[k]) for k in local_adapter)


def test_tokens_isolation_size_and_version(setup, remote_adapt):
    server, data = setup["server"], setup["data"]
    blobs = sorted(p.name for p in (data / "blobs").rglob("*"))
    for token in (None, "wrong-token", setup["alice"] + "x"):
        with api(server, token) as client:
            response = client.post("/v1/uploads", content=CT.read_bytes())
            assert response.status_code == 401, response.text
            assert client.get("/v1/jobs").status_code == 401
            assert client.post("/v1/jobs", json={"command": "adapt"}).status_code == 401
    assert sorted(p.name for p in (data / "blobs").rglob("*")) == blobs  # nothing stored
    assert list((data / "incoming").iterdir()) == []

    with api(server, setup["alice"]) as alice, api(server, setup["bob"]) as bob:
        [job] = alice.get("/v1/jobs").json()
        assert job["state"] == "done" and bob.get("/v1/jobs").json() == []
        for method, path in (("GET", ""), ("GET", "/events"), ("GET", "/files/segmentation"),
                             ("GET", "/files/adapter"), ("DELETE", "")):
            assert bob.request(method, f"/v1/jobs/{job['id']}{path}").status_code == 404
        assert alice.get(f"/v1/jobs/{job['id']}/files/adapter").status_code == 200
        # alice's uploads are not bob's: he cannot name them in a job
        sha = job["result"]["adapter"]["sha256"]
        assert bob.get(f"/v1/uploads/{sha}").status_code == 404
        refused = bob.post("/v1/jobs", json={"command": "segment", "image": sha, "adapter": sha})
        assert refused.status_code == 400 and "no upload" in refused.json()["detail"]

        big = alice.post("/v1/uploads", content=b"\0" * int(1.5 * 2**20))
        assert big.status_code == 413 and "1 MB" in big.json()["detail"]
        assert list((data / "incoming").iterdir()) == []
        assert alice.post("/v1/uploads", content=b"not an image").status_code == 415

    with api(server, setup["alice"], version="0.0.1") as old:
        response = old.get("/v1/jobs")
        assert response.status_code == 409
        assert "0.0.1" in response.json()["detail"] and __version__ in response.json()["detail"]

    # the command line says it in one line, exit 2
    run = remote(setup, ["segment", "--image", str(CT), "--adapter",
                         str(remote_adapt[0] / "liver.safetensors"),
                         "--out", str(setup["root"] / "never.nii.gz")], token="wrong")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]
    assert "not known to this server" in run.stderr and "HTTP 401" in run.stderr
    assert not (setup["root"] / "never.nii.gz").exists()


def audit(data, *options) -> list[list[str]]:
    out = subprocess.run(ARENASEG + ["audit", "--data", str(data), *options],
                         capture_output=True, text=True, check=True).stdout
    return [line.split("\t") for line in out.splitlines()]


def test_audit_log(setup, remote_adapt):
    server, data = setup["server"], setup["data"]
    ct_sha, paint_sha = (file_digest(p) for p in (CT, setup["painted"]))
    with api(server, setup["alice"]) as alice:
        job = alice.get("/v1/jobs").json()[0]  # the remote adapt: alice's first job
    rows = audit(data, "--job", job["id"], "--user", "alice")
    assert [row[1:5] for row in rows[:3]] == [  # test_tokens_... fetches the adapter again
        ["alice", "adapt", job["id"], f"{ct_sha},{paint_sha}"],
        ["alice", "download", job["id"], job["result"]["segmentation"]["sha256"]],
        ["alice", "download", job["id"], job["result"]["adapter"]["sha256"]]]
    assert all(row[0].endswith("Z") and row[5] == "127.0.0.1" for row in rows)
    uploads = [row for row in audit(data, "--user", "alice") if row[2] == "upload"]
    assert [row[4] for row in uploads[:2]] == [ct_sha, paint_sha]  # before the job
    assert uploads[0][0] < rows[0][0]
    # bob's tries on alice's job (test_tokens_isolation_size_and_version): refused, each a row
    tries = audit(data, "--job", job["id"], "--user", "bob")
    assert len(tries) == 5 and all(row[2] == "denied" and "(404)" in row[6] for row in tries)

    before = audit(data)
    blobs = sorted(p.name for p in (data / "blobs").rglob("*"))
    stolen = "x" + setup["bob"][1:]
    with api(server, stolen) as client:
        assert client.post("/v1/uploads", content=CT.read_bytes()).status_code == 401
    after = audit(data)
    assert after[:len(before)] == before
    [denied] = after[len(before):]
    assert denied[1:5] == ["-", "denied", "-", "-"] and denied[5] == "127.0.0.1"
    assert "unknown token (401) POST /v1/uploads" in denied[6]
    assert sorted(p.name for p in (data / "blobs").rglob("*")) == blobs
    stored = b"".join(p.read_bytes() for p in data.glob("server.sqlite*"))
    for token in (stolen, setup["alice"], setup["bob"]):  # never a token, only their hashes
        assert token.encode() not in stored


def test_worker_killed_mid_job_is_an_error_and_the_next_job_runs(setup, remote_adapt):
    server = setup["server"]
    with api(server, setup["alice"]) as alice:
        image, paint = upload(alice, CT), upload(alice, setup["painted"])
        job_id = alice.post("/v1/jobs", json={
            "command": "adapt", "image": image, "annotations": paint, "label": LIVER,
            "device": "cpu", "settings": {"steps": 1000}}).json()["id"]
        # the next job, queued behind it: a segment with the adapter the first test produced
        out = setup["root"] / "after-kill.nii.gz"
        client = subprocess.Popen(
            ARENASEG + ["segment", "--image", str(CT), "--adapter",
                        str(remote_adapt[0] / "liver.safetensors"), "--out", str(out),
                        "--device", "cpu", "--server", server.url],
            env=dict(os.environ, ARENASEG_TOKEN=setup["alice"]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen = []
        for event in events(alice, job_id):
            seen.append(event)
            if event["event"] == "started":
                pid = event["pid"]
            if event["event"] == "progress":
                os.kill(pid, signal.SIGKILL)
        assert seen[-1]["event"] == "error" and "SIGKILL" in seen[-1]["message"]
        assert alice.get(f"/v1/jobs/{job_id}").json()["state"] == "failed"
        stdout, stderr = client.communicate(timeout=300)
        assert client.returncode == 0, stderr
        assert f"wrote {out}" in stdout and sitk.GetArrayFromImage(sitk.ReadImage(str(out))).any()


def test_restart_keeps_results_and_the_queue(setup, remote_adapt):
    server = setup["server"]
    with api(server, setup["alice"]) as alice:
        done = next(j for j in alice.get("/v1/jobs").json() if j["state"] == "done")
        image, paint = upload(alice, CT), upload(alice, setup["painted"])
        job = {"command": "adapt", "image": image, "annotations": paint, "label": LIVER,
               "device": "cpu", "settings": {"steps": 1000}}
        running = alice.post("/v1/jobs", json=job).json()["id"]
        queued = alice.post("/v1/jobs", json=job).json()["id"]
        for event in events(alice, running, until=("started",)):
            pass
    server.stop()
    server.start()  # same --data, a new port
    with api(server, setup["alice"]) as alice:
        assert alice.get(f"/v1/jobs/{done['id']}").json()["state"] == "done"
        segmentation = alice.get(f"/v1/jobs/{done['id']}/files/segmentation")
        assert segmentation.status_code == 200
        assert segmentation.content == (remote_adapt[0] / "seg.nii.gz").read_bytes()
        assert (alice.get(f"/v1/jobs/{done['id']}/files/adapter").content
                == (remote_adapt[0] / "liver.safetensors").read_bytes())
        failed = alice.get(f"/v1/jobs/{running}").json()
        assert failed["state"] == "failed" and "server stopped" in failed["message"]
        assert [e["event"] for e in events(alice, running)][-1] == "error"
        assert alice.get(f"/v1/jobs/{queued}").json()["state"] in ("queued", "running")
        assert alice.delete(f"/v1/jobs/{queued}").status_code == 200
        assert [e["event"] for e in events(alice, queued)][-1] == "cancelled"
        assert alice.get(f"/v1/jobs/{queued}").json()["state"] == "cancelled"


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.org"])
def test_no_bind_beyond_loopback_without_tls(tmp_path, host):
    run = subprocess.run(ARENASEG + ["serve", "--host", host, "--port", str(free_port()),
                                     "--data", str(tmp_path / "data")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("arenaseg: error: ")
    assert f"--host {host} is not a loopback address" in run.stderr and "--ssl-certfile" in run.stderr


def test_rate_limit_per_user(tmp_path):
    data = tmp_path / "data"
    carol, dave = add_token(data, "carol"), add_token(data, "dave")
    server = Server(data, options=["--rate-limit", "3/minute"]).start()  # start() asks as nobody
    try:
        with api(server, carol) as client:
            assert [client.get("/v1/jobs").status_code for _ in range(3)] == [200] * 3
            refused = client.get("/v1/jobs")
            assert refused.status_code == 429
            assert 1 <= int(refused.headers["retry-after"]) <= 60
            detail = refused.json()["detail"]
            assert "carol" in detail and "3 requests per 1 minute" in detail
            assert "--rate-limit 3/minute" in detail
        with api(server, dave) as client:  # another user's budget is their own
            assert client.get("/v1/jobs").status_code == 200
    finally:
        server.stop()
    run = subprocess.run(ARENASEG + ["serve", "--port", str(free_port()), "--data", str(data),
                                     "--rate-limit", "lots"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "--rate-limit 'lots' must be a number of requests per second, minute or hour" in run.stderr
