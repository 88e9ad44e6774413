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
    def __init__(self, data, max_upload_mb=1, options=(), env=None):
        self.data, self.max_upload_mb, self.options = data, max_upload_mb, list(options)
        self.env = env
        self.proc = None

    def start(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.data.parent / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(ARENASEG + ["serve", "--port", str(self.port), "--data",
                                                 str(self.data), "--max-upload-mb",
                                                 str(self.max_upload_mb)] + self.options,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env=None if self.env is None else dict(os.environ, **self.env))
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
    stolen = setup["bob"][:-1] + ("A" if setup["bob"][-1] != "A" else "B")  # one letter off
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


def test_a_client_cut_off_leaves_its_job_running_to_fetch_later(setup, remote_adapt, tmp_path):
    server = setup["server"]
    argv = adapt_options(setup, tmp_path)  # the remote adapt's job again: the same outputs
    client = subprocess.Popen(ARENASEG + argv + ["--server", server.url], text=True,
                              env=dict(os.environ, ARENASEG_TOKEN=setup["alice"]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in client.stderr:
        if " queued on " in line:
            break
    job_id = line.split()[2]
    assert f"run this same command with --job {job_id}" in line
    with api(server, setup["alice"]) as alice:
        while alice.get(f"/v1/jobs/{job_id}").json()["state"] == "queued":
            time.sleep(0.1)
        client.kill()  # SIGKILL mid-job: no goodbye, the connection just drops
        client.wait(timeout=30)
        client.stdout.close(), client.stderr.close()
        assert [e["event"] for e in events(alice, job_id)][-1] == "done"  # it went on
    assert list(tmp_path.iterdir()) == []

    run = remote(setup, argv + ["--job", job_id])
    assert run.returncode == 0, run.stderr
    assert f"following job {job_id}" in run.stderr and "training 2 steps" in run.stderr
    assert f"wrote {tmp_path / 'seg.nii.gz'} and {tmp_path / 'liver.safetensors'}" in run.stdout
    for name in ("seg.nii.gz", "liver.safetensors"):
        assert (tmp_path / name).read_bytes() == (remote_adapt[0] / name).read_bytes()

    # Ctrl-C is not a cut: it cancels the job on the server, as it stops a local run
    client = subprocess.Popen(ARENASEG + argv + ["--server", server.url, "--steps", "1000"],
                              env=dict(os.environ, ARENASEG_TOKEN=setup["alice"]), text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for line in client.stderr:
        if " queued on " in line:
            break
    client.send_signal(signal.SIGINT)
    rest = client.stderr.read()
    assert client.wait(timeout=60) == 130
    cancelled = line.split()[2]
    assert f"job {cancelled} cancelled on {server.url}" in rest
    with api(server, setup["alice"]) as alice:
        assert [e["event"] for e in events(alice, cancelled)][-1] == "cancelled"

    wrong = remote(setup, ["segment", "--image", str(CT), "--adapter", str(tmp_path / "liver.safetensors"),
                           "--out", str(tmp_path / "other.nii.gz"), "--job", job_id])
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1
    assert f"--job {job_id} ran 'adapt', not 'segment'" in wrong.stderr


def test_disk_full_and_out_of_memory_on_the_server(tmp_path, small_liver):
    """Real OS limits on the job's process: RLIMIT_FSIZE (a write fails as on a full disk) and
    RLIMIT_AS (an allocation fails as on a host out of memory)."""
    data = tmp_path / "data"
    erin = add_token(data, "erin")
    # The worker's libraries take 1.1 GB of address space here (more with a CUDA build of torch),
    # an adapt with 16 crops of slab 64 3.6 GB more, the retry with 1 crop of slab 32 0.75 GB
    # more: the limit lies between, above what this machine's libraries take.
    threads = {"OMP_NUM_THREADS": "2", "MALLOC_ARENA_MAX": "2"}
    probe = subprocess.run([sys.executable, "-c", "import torch, monai, arenaseg.pipeline; print("
                            "[l for l in open('/proc/self/status') if l.startswith('VmPeak')][0]"
                            ".split()[1])"], env=dict(os.environ, **threads),
                           capture_output=True, text=True, check=True)
    limit = round(int(probe.stdout) / 2**20 + 1.9, 1)
    server = Server(data, options=["--max-job-file-mb", "0.05", "--max-job-memory-gb", str(limit)],
                    env=threads).start()
    try:
        with api(server, erin) as client:
            job = {"command": "adapt", "image": upload(client, CT),
                   "annotations": upload(client, small_liver[0]), "label": LIVER, "device": "cpu",
                   "settings": {"steps": 2}}
            # the adapter (149 kB) is over the 50 kB file-size limit; the segmentation (6 kB) is not
            full = client.post("/v1/jobs", json=dict(job, adapter_out=True)).json()["id"]
            seen = list(events(client, full))
            assert seen[-1]["event"] == "error"
            assert seen[-1]["message"] == (
                "the server could not write this job's adapter (file too large) in its data "
                "folder, so nothing was saved or sent: its administrator must free space there or "
                "raise the server's --max-job-file-mb (now 0.05 MB per file); then submit the job "
                "again")
            assert client.get(f"/v1/jobs/{full}/files/segmentation").status_code == 409
            assert sorted(p.name for p in (data / "jobs" / full).iterdir()) == ["job.json", "worker.log"]

            big = dict(job, settings={"steps": 2, "crops_per_step": 16, "slab": 64})
            oom = client.post("/v1/jobs", json=big).json()["id"]  # the server goes on
            seen = list(events(client, oom))
            assert seen[-1]["event"] == "done", seen[-1]
            [warning] = [e for e in seen if e["event"] == "warning"]
            assert "out of memory on the server" in warning["message"]
            assert ("retrying with smaller crops (1 crop per step instead of 16, slab 32 voxels "
                    "instead of 64") in warning["message"]
            assert [e["event"] for e in seen].count("started") == 2
            assert client.get(f"/v1/jobs/{oom}/files/segmentation").status_code == 200
    finally:
        server.stop()


def test_kill_9_of_the_server_during_a_queue_of_10(setup, remote_adapt, tmp_path):
    """kill -9 of the server mid-job with 10 jobs of 5 users queued: after the restart finished
    results are kept, the running job is failed, the 10 run in order per user, each output the
    same as the same job run here."""
    server = setup["server"]
    adapter = remote_adapt[0] / "liver.safetensors"
    tokens = {"alice": setup["alice"], "bob": setup["bob"]}
    tokens.update({name: add_token(setup["data"], name) for name in ("carol", "dave", "erin")})
    with api(server, setup["alice"]) as alice:
        done = next(j for j in alice.get("/v1/jobs").json() if j["state"] == "done")
        running = alice.post("/v1/jobs", json={
            "command": "adapt", "image": upload(alice, CT), "annotations": upload(alice, setup["painted"]),
            "label": LIVER, "device": "cpu", "settings": {"steps": 1000}}).json()["id"]
    queue = []  # (user, job id) in the order submitted: two rounds over the five users
    for _ in range(2):
        for name, token in tokens.items():
            with api(server, token) as client:
                job = {"command": "segment", "image": upload(client, CT),
                       "adapter": upload(client, adapter), "device": "cpu"}
                queue.append((name, client.post("/v1/jobs", json=job).json()["id"]))
    with api(server, setup["alice"]) as alice:
        last = alice.post("/v1/jobs", json={"command": "adapt", "image": upload(alice, CT),
                                            "annotations": upload(alice, setup["painted"]),
                                            "label": LIVER, "device": "cpu",
                                            "settings": {"steps": 1000}}).json()["id"]
        for event in events(alice, running, until=("progress",)):
            pass
    server.proc.kill()  # kill -9 mid-job: no clean-up at all
    server.proc.wait(timeout=30)
    server.log.close()
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

    assert main(["segment", "--image", str(CT), "--adapter", str(adapter), "--device", "cpu",
                 "--out", str(tmp_path / "local.nii.gz")]) == 0  # the same job, here
    local = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "local.nii.gz")))
    started = {}
    for name, job_id in queue:
        with api(server, tokens[name]) as client:
            assert [e["event"] for e in events(client, job_id)][-1] == "done"
            job = client.get(f"/v1/jobs/{job_id}").json()
            started[job_id] = job["started"]
            out = tmp_path / f"{job_id}.nii.gz"
            out.write_bytes(client.get(f"/v1/jobs/{job_id}/files/segmentation").content)
            assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), local)
    for name in tokens:  # in order per user
        times = [started[job_id] for user, job_id in queue if user == name]
        assert times == sorted(times)
    with api(server, setup["alice"]) as alice:  # the job queued behind them: cancelled
        assert alice.get(f"/v1/jobs/{last}").json()["state"] in ("queued", "running")
        assert alice.delete(f"/v1/jobs/{last}").status_code == 200
        assert [e["event"] for e in events(alice, last)][-1] == "cancelled"
        assert alice.get(f"/v1/jobs/{last}").json()["state"] == "cancelled"


def test_ray_backend_same_results_events_and_cancel(setup, remote_adapt, tmp_path):
    """One real job through a local Ray instance (started by the server, its ports guarded by
    Ray's token) gives the local backend's outputs; a running job cancels."""
    pytest.importorskip("ray")
    data = tmp_path / "data"
    frank = add_token(data, "frank")
    server = Server(data, options=["--backend", "ray"]).start()
    try:
        run = subprocess.run(ARENASEG + adapt_options(setup, tmp_path) + ["--server", server.url],
                             env=dict(os.environ, ARENASEG_TOKEN=frank), capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr + (data.parent / f"server-{server.port}.log").read_text()
        assert "reading " + str(CT) in run.stderr and "training 2 steps" in run.stderr
        assert (tmp_path / "seg.nii.gz").read_bytes() == (remote_adapt[0] / "seg.nii.gz").read_bytes()
        from safetensors.numpy import load_file

        # the same tensors (the metadata names the CT as the worker read it: here a path on the node)
        ray_adapter, local_adapter = (load_file(str(d / "liver.safetensors"))
                                      for d in (tmp_path, remote_adapt[0]))
        assert ray_adapter.keys() == local_adapter.keys()
        assert all(np.array_equal(ray_adapter[k], local_adapter[k]) for k in local_adapter)
        with api(server, frank) as client:
            [job] = client.get("/v1/jobs").json()
            assert job["state"] == "done"
            log = (data / "jobs" / job["id"] / "worker.log")  # the node's log came back
            assert log.is_file()
            long = client.post("/v1/jobs", json={
                "command": "adapt", "image": upload(client, CT),
                "annotations": upload(client, setup["painted"]), "label": LIVER,
                "device": "cpu", "settings": {"steps": 1000}}).json()["id"]
            for event in events(client, long, until=("progress",)):
                pass
            assert client.delete(f"/v1/jobs/{long}").status_code == 200
            assert [e["event"] for e in events(client, long)][-1] == "cancelled"
            assert client.get(f"/v1/jobs/{long}").json()["state"] == "cancelled"
    finally:
        server.stop()
    assert server.proc.returncode == 0


def test_ray_backend_without_ray_says_how_to_install(tmp_path):
    # the import of ray fails as it does where ray is not installed (None in sys.modules)
    code = ("import sys; sys.modules['ray'] = None; from arenaseg.cli import main; "
            f"sys.exit(main(['serve', '--data', {str(tmp_path / 'data')!r}, '--backend', 'ray']))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "--backend ray needs Ray on the server: pip install 'arenaseg[ray]'" in run.stderr


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


def test_a_relative_data_folder_is_kept_absolute(tmp_path, monkeypatch):
    """``serve --data data`` (relative) failed every job: each worker runs inside its own job
    folder, where the relative job-file path no longer resolved."""
    from arenaseg.jobstore import JobStore

    monkeypatch.chdir(tmp_path)
    store = JobStore("data")
    try:
        assert store.data == (tmp_path / "data").resolve()
        assert store.jobs_dir.is_absolute() and store.blobs.is_absolute()
    finally:
        store.close()
    monkeypatch.chdir("/")
    assert (tmp_path / "data" / "jobs").is_dir()
