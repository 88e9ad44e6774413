"""Server load benchmark: 20 concurrent small jobs from 5 users on loopback, local and Ray
backends, and the remote-versus-local overhead of one ``arenaseg adapt`` on ``abdomen_ct``.

Every job goes through the real command line (``arenaseg adapt ... --server URL`` as its own
process, 4 per user, all 20 started at once) against a real ``arenaseg serve`` on 127.0.0.1.
Small job: the embedded backbone (arena-small-ct-unet) adapted to 3 painted liver slices of
``abdomen_ct_small`` in ``--steps`` steps, seed 0 to 3 (each user runs the four seeds), on the CPU.
Checked: every job ends done, none is lost (4 per user), each user's jobs start in the order they
were queued, and each output equals the same job run locally beforehand (segmentation bytes;
adapter tensors: its metadata names the CT as the worker read it, a server path). Latency: from
starting the client process to its exit (outputs written). Jobs per minute: 20 over the time from
the first client's start to the last one's exit.

Overhead: ``arenaseg adapt`` on ``abdomen_ct`` (3 painted liver slices, engine settings, the
embedded backbone) run here and with ``--server`` (local backend, a user holding no upload yet,
so the run includes uploading the CT and the labelmap), alternating, ``--overhead-runs`` times
each; upload time measured separately by posting the same two files as another user.

    python bench/server_benchmark.py --data ../shared/data --out bench/SERVER.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import SimpleITK as sitk
from safetensors.numpy import load_file

from arenaseg.backbones import EMBEDDED_BACKBONE
from arenaseg.io.annotations import paint_slices
from arenaseg.io.geometry import array_ijk, image_like

sys.path.insert(0, str(Path(__file__).parent))
from engine_benchmark import git_revision, machine  # noqa: E402

ARENASEG = [sys.executable, "-m", "arenaseg"]
#: Small jobs: the embedded U-Net, so that 20 of them fit the 2-core benchmark machine.
BACKBONE = EMBEDDED_BACKBONE
LIVER, USERS, PER_USER, SEEDS = 5, 5, 4, 4
TARGET_OVERHEAD_S = 2.0


def paint(folder: Path, scan: Path, name: str) -> Path:
    """3 painted axial liver slices of ``scan``'s reference labels."""
    labels = sitk.ReadImage(str(scan / "labels.nii.gz"))
    out = folder / f"{name}-painted.nii.gz"
    sitk.WriteImage(image_like(paint_slices(array_ijk(labels), LIVER, 3, axis=2), labels), str(out))
    return out


def adapt_argv(image: Path, painted: Path, out: Path, steps: int | None, seed: int = 0) -> list[str]:
    return ARENASEG + ["adapt", "--image", str(image), "--annotations", str(painted), "--label",
                       str(LIVER), "--structure", "liver", "--backbone", BACKBONE, "--device",
                       "cpu", "--seed", str(seed), "--out", str(out / "seg.nii.gz"),
                       "--adapter-out", str(out / "liver.safetensors")] + \
        (["--steps", str(steps)] if steps else [])


def timed(argv: list[str], env: dict | None = None) -> float:
    """Wall seconds of one command (which must succeed)."""
    start = time.perf_counter()
    run = subprocess.run(argv, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({run.returncode}): {run.stderr[-2000:]}")
    return time.perf_counter() - start


class Server:
    """``arenaseg serve`` on a free loopback port with its own data folder."""

    def __init__(self, data: Path, options: list[str]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = data
        self.tokens = {}
        self.log = open(data.parent / f"{data.name}-server.log", "w")
        self.proc = subprocess.Popen(ARENASEG + ["serve", "--data", str(data), "--port",
                                                 str(self.port)] + options,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        for _ in range(600):  # a local Ray instance takes seconds to start
            try:
                httpx.get(self.url + "/v1/version", timeout=1)
                return
            except httpx.HTTPError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server did not start: {self.log.name}")
                time.sleep(0.1)
        raise RuntimeError("the server did not answer within 60 s")

    def token(self, user: str) -> str:
        if user not in self.tokens:
            out = subprocess.run(ARENASEG + ["token", "add", "--data", str(self.data), user],
                                 capture_output=True, text=True, check=True).stdout
            self.tokens[user] = out.split()[-1]
        return self.tokens[user]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        self.log.close()


def same_outputs(out: Path, reference: Path) -> bool:
    if (out / "seg.nii.gz").read_bytes() != (reference / "seg.nii.gz").read_bytes():
        return False
    a, b = (load_file(str(d / "liver.safetensors")) for d in (out, reference))
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def load(backend: str, tmp: Path, image: Path, painted: Path, steps: int, references: dict,
         workers: int) -> dict:
    """20 concurrent clients (5 users × seeds 0-3) against one server; the measured numbers."""
    data = tmp / f"{backend}-data"
    server = Server(data, ["--backend", backend, "--workers", str(workers)])
    try:
        users = [f"user{n}" for n in range(USERS)]
        env = {user: dict(os.environ, ARENASEG_TOKEN=server.token(user)) for user in users}
        clients, results = [], {}
        start = time.perf_counter()
        for seed in range(SEEDS):  # each user's jobs queue in seed order, users interleaved
            for user in users:
                out = tmp / backend / f"{user}-seed{seed}"
                out.mkdir(parents=True)
                argv = adapt_argv(image, painted, out, steps, seed) + ["--server", server.url]

                def client(argv=argv, user=user, seed=seed, out=out):
                    began = time.perf_counter()
                    run = subprocess.run(argv, env=env[user], capture_output=True, text=True)
                    results[(user, seed)] = (began - start, time.perf_counter() - start,
                                             run.returncode, run.stderr, out)

                clients.append(threading.Thread(target=client))
                clients[-1].start()
                time.sleep(0.05)  # queued in this order (the server orders by arrival)
        for thread in clients:
            thread.join()
        failed = [f"{k}: {r[3][-300:]}" for k, r in results.items() if r[2] != 0]
        if failed:
            raise RuntimeError(f"{backend}: {len(failed)} client(s) failed: {failed[0]}")
        span = max(r[1] for r in results.values()) - min(r[0] for r in results.values())
        latencies = sorted(r[1] - r[0] for r in results.values())
        in_order, counts = True, []
        for user in users:
            with httpx.Client(base_url=server.url, timeout=30,
                              headers={"Authorization": f"Bearer {server.token(user)}"}) as c:
                jobs = sorted(c.get("/v1/jobs").json(), key=lambda j: j["created"])
            counts.append(sum(j["state"] == "done" for j in jobs))
            in_order &= [j["started"] for j in jobs] == sorted(j["started"] for j in jobs)
        identical = sum(same_outputs(r[4], references[seed]) for (user, seed), r in results.items())
    finally:
        server.stop()
    return {"backend": backend, "jobs": len(results), "done": sum(counts),
            "per_user": counts, "in_order": in_order, "identical": identical,
            "span": span, "per_minute": len(results) / span * 60,
            "p50": float(np.percentile(latencies, 50)), "p90": float(np.percentile(latencies, 90)),
            "max": latencies[-1], "min": latencies[0]}


def overhead(tmp: Path, data: Path, runs: int) -> dict:
    """Wall seconds of ``arenaseg adapt`` on abdomen_ct here and through a local server."""
    image = data / "abdomen_ct" / "ct.nii.gz"
    painted = paint(tmp, data / "abdomen_ct", "abdomen")
    server = Server(tmp / "overhead-data", [])
    local, remote, upload = [], [], []
    try:
        for n in range(runs):
            out = tmp / f"overhead-local-{n}"
            out.mkdir()
            local.append(timed(adapt_argv(image, painted, out, None)))
            out = tmp / f"overhead-remote-{n}"
            out.mkdir()
            env = dict(os.environ, ARENASEG_TOKEN=server.token(f"fresh{n}"))  # holds no upload
            remote.append(timed(adapt_argv(image, painted, out, None) + ["--server", server.url], env))
            with httpx.Client(base_url=server.url, timeout=120, headers={
                    "Authorization": f"Bearer {server.token(f'uploader{n}')}"}) as c:
                began = time.perf_counter()
                for path in (image, painted):
                    c.post("/v1/uploads", content=path.read_bytes()).raise_for_status()
                upload.append(time.perf_counter() - began)
    finally:
        server.stop()
    size = sum(p.stat().st_size for p in (image, painted))
    return {"local": local, "remote": remote, "upload": upload, "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get(
        "ARENASEG_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    parser.add_argument("--out", default=str(Path(__file__).parent / "SERVER.md"))
    parser.add_argument("--steps", type=int, default=5, help="training steps of a small job")
    parser.add_argument("--workers", type=int, default=1, help="serve --workers, both backends")
    parser.add_argument("--backends", nargs="+", default=["local", "ray"])
    parser.add_argument("--overhead-runs", type=int, default=2)
    args = parser.parse_args()
    data = Path(args.data)
    image = data / "abdomen_ct_small" / "ct.nii.gz"
    with tempfile.TemporaryDirectory(prefix="arenaseg-server-bench-") as tmp:
        tmp = Path(tmp)
        painted = paint(tmp, data / "abdomen_ct_small", "small")
        references, local_seconds = {}, []
        for seed in range(SEEDS):  # the same jobs run here: the outputs to match
            references[seed] = tmp / f"reference-{seed}"
            references[seed].mkdir()
            local_seconds.append(timed(adapt_argv(image, painted, references[seed], args.steps, seed)))
        rows = [load(backend, tmp, image, painted, args.steps, references, args.workers)
                for backend in args.backends]
        over = overhead(tmp, data, args.overhead_runs) if args.overhead_runs else None
    command = "python bench/server_benchmark.py " + shlex.join(sys.argv[1:])
    report = [
        "# Server load benchmark (issue 22)", "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; git "
        f"revision {git_revision()}",
        f"- Machine: {machine()}; 1-minute load average {os.getloadavg()[0]:.1f} at the end "
        "(other processes included)",
        f"- Command: `{command}`",
        f"- Small job: `arenaseg adapt --server` on `abdomen_ct_small` (122×101×30), 3 painted "
        f"liver slices, {BACKBONE}, {args.steps} steps, seed 0-3, CPU; 5 users × 4 jobs, all 20 "
        f"clients started at once; `serve --workers {args.workers}`. The same 4 jobs run here: "
        f"{statistics.mean(local_seconds):.1f} s each on average (process start to exit).", "",
        "| backend | jobs done | per user | in order per user | identical to local | jobs/min "
        "| latency p50 (s) | p90 (s) | max (s) | first to last (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[f"| {r['backend']} | {r['done']} of {r['jobs']} | {'/'.join(map(str, r['per_user']))} "
          f"| {'yes' if r['in_order'] else 'NO'} | {r['identical']} of {r['jobs']} "
          f"| {r['per_minute']:.1f} | {r['p50']:.1f} | {r['p90']:.1f} | {r['max']:.1f} "
          f"| {r['span']:.1f} |" for r in rows], "",
        "Latency counts the wait in the queue: with one job at a time, the last of 20 waits for "
        "the 19 before it.", ""]
    if over:
        local, remote, upload = (statistics.median(over[k]) for k in ("local", "remote", "upload"))
        added = remote - local - upload
        report += [
            "## Remote versus local: one `arenaseg adapt` on `abdomen_ct`", "",
            f"122×101×112 CT and its painted labelmap ({over['bytes'] / 2**20:.2f} MB together), "
            f"{BACKBONE}, engine settings, CPU; {len(over['local'])} runs each, alternating, "
            "medians; the remote run uploads both files first (a user holding none).", "",
            "| | runs (s) | median (s) |", "|---|---|---|",
            f"| local | {', '.join(f'{s:.1f}' for s in over['local'])} | {local:.1f} |",
            f"| `--server` (loopback) | {', '.join(f'{s:.1f}' for s in over['remote'])} | {remote:.1f} |",
            f"| upload of both files | {', '.join(f'{s:.2f}' for s in over['upload'])} | {upload:.2f} |",
            "",
            f"- Remote adds {remote - local:.1f} s, of which {upload:.2f} s upload: "
            f"{added:.1f} s beyond the upload, "
            f"{'MET' if added <= TARGET_OVERHEAD_S else 'NOT MET'} (target ≤ "
            f"{TARGET_OVERHEAD_S:.0f} s plus upload time).", ""]
    out = Path(args.out)
    temporary = out.with_name(f".{out.name}.tmp")
    temporary.write_text("\n".join(report))
    os.replace(temporary, out)  # never a half-written report
    print("\n".join(report))


if __name__ == "__main__":
    main()
