"""The server's job runner: queued jobs from :class:`arenaseg.jobstore.JobStore`, each run as
``python -m arenaseg.worker job.json`` (:func:`spawn_worker`), ``workers`` at a time.

What it adds to a worker's own events:

- a worker that dies without a last event (killed, out of memory) ends its job with ``error``;
- a job that runs out of memory (CUDA, or a CPU allocation: the worker's ``error`` names it) is
  run once more, on the CPU when it ran on a GPU, else with smaller training crops
  (:func:`smaller`), after a ``warning`` event saying so;
- a job whose outputs could not be written under the server's data folder (a full disk, the
  file-size limit ``--max-job-file-mb``) fails with a line addressed to the server's
  administrator (:func:`server_write_error`); the worker publishes nothing partial;
- server paths in events are replaced by ``upload:SHA`` and ``output:NAME``
  (:func:`arenaseg.client.renamed`).

:class:`Runner` runs jobs on this machine; :class:`arenaseg.ray_backend.RayRunner` runs the same
worker as Ray tasks, overriding :meth:`Runner.execute` and :meth:`Runner.kill`.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

from .client import renamed
from .download import file_digest
from .jobstore import FINAL_EVENTS, JobStore

#: Error texts of an allocation that failed: torch's CUDA and CPU allocators, Python's own,
#: the C++ runtime's, and the OS's ENOMEM (an address-space limit, RLIMIT_AS).
_OUT_OF_MEMORY = re.compile(r"OutOfMemoryError|CUDA out of memory|can't allocate memory|"
                            r"MemoryError|bad_alloc|Cannot allocate memory|out of memory",
                            re.IGNORECASE)
#: An output the worker could not write (:mod:`arenaseg.io.outputs`), as the events show it.
_WRITE_FAILED = re.compile(r"'output:(\w+)' (?:could not|cannot) be written \(([^)]*?)"
                           r"(?: in '[^']*')?\)")


def out_of_memory(event: dict | None) -> bool:
    return bool(event and event.get("event") == "error"
                and _OUT_OF_MEMORY.search(event.get("message", "")))


def smaller(job: dict, device: str | None) -> tuple[dict, str] | None:
    """The job to retry after running out of memory on ``device`` (as the ``started`` event
    named it), and what changed; None when nothing is left to shrink.

    On a GPU: the same job on the CPU (same result up to float rounding, slower). On the CPU:
    an adapt job with one crop per step, half the slab (at least 16 voxels) and a quarter of
    the sampled voxels: less memory, a somewhat different result. A segment job already runs
    one window at a time.
    """
    job = json.loads(json.dumps(job))
    if device and device.startswith("cuda"):
        job["device"] = "cpu"
        return job, "retrying on the CPU"
    settings = job.get("settings")
    if job.get("command") != "adapt" or settings is None:
        return None
    before = (settings.get("crops_per_step", 1), settings.get("slab", 32),
              settings.get("max_points", 50_000))
    after = (1, max(16, before[1] // 2), max(1000, before[2] // 4))
    if after == before:
        return None
    settings.update(crops_per_step=after[0], slab=after[1], max_points=after[2])
    return job, (f"retrying with smaller crops ({after[0]} crop per step instead of {before[0]}, "
                 f"slab {after[1]} voxels instead of {before[1]}, {after[2]} sampled voxels "
                 f"instead of {before[2]})")


def server_write_error(message: str, file_limit_mb: float | None) -> str | None:
    """The administrator's line for a worker's failed output write, else None."""
    match = _WRITE_FAILED.search(message)
    if match is None:
        return None
    name, cause = match.groups()
    limit = (f" or raise the server's --max-job-file-mb (now {file_limit_mb:g} MB per file)"
             if file_limit_mb else "")
    return (f"the server could not write this job's {name} ({cause}) in its data folder, so "
            f"nothing was saved or sent: its administrator must free space there{limit}; "
            "then submit the job again")


def spawn_worker(job_path: Path, folder: Path, log, file_limit_mb: float | None = None,
                 memory_limit_gb: float | None = None, env: dict | None = None) -> subprocess.Popen:
    """Start ``python -m arenaseg.worker job_path`` in ``folder`` (its own session: a Ctrl-C
    in the server's terminal is the server's), stdout piped, stderr to ``log``, with the
    server's per-job limits: ``file_limit_mb`` (RLIMIT_FSIZE, MB per file written; Python
    ignores SIGXFSZ, so a write beyond it fails with EFBIG instead of killing the worker) and
    ``memory_limit_gb`` (RLIMIT_AS, GB of address space: an allocation beyond it fails, and
    the job is retried smaller instead of the host swapping or its OOM killer striking).
    ``env``: the worker's environment (default: this process's)."""
    if memory_limit_gb:  # glibc reserves address space per thread arena: few, so that the
        # limit bounds memory, not the number of cores
        env = dict(env or os.environ)
        env.setdefault("MALLOC_ARENA_MAX", "2")
    proc = subprocess.Popen([sys.executable, "-m", "arenaseg.worker", str(job_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                            cwd=folder, start_new_session=True, env=env)
    # set on the child at once (prlimit, no preexec_fn: the server has threads); the worker
    # imports torch for seconds before it allocates or writes anything
    for limit, amount in ((resource.RLIMIT_FSIZE, file_limit_mb and file_limit_mb * 2**20),
                          (resource.RLIMIT_AS, memory_limit_gb and memory_limit_gb * 2**30)):
        if amount:
            resource.prlimit(proc.pid, limit, (int(amount), int(amount)))
    return proc


def read_events(proc: subprocess.Popen):
    """The worker's events (dicts) from its stdout; lines that are not events are skipped (a
    library's print: the log has stderr)."""
    for line in proc.stdout:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            yield event


class Runner:
    """``workers`` threads, each running one queued job at a time as a worker process.

    Args:
        file_limit_mb: largest file a job may write, MB (None: no limit).
        memory_limit_gb: address space of a job's process, GB (None: no limit).
    """

    def __init__(self, store: JobStore, workers: int = 1, file_limit_mb: float | None = None,
                 memory_limit_gb: float | None = None):
        self.store = store
        self.workers = workers
        self.file_limit_mb = file_limit_mb
        self.memory_limit_gb = memory_limit_gb
        self.processes: dict[str, subprocess.Popen] = {}
        self.devices: dict[str, str] = {}  # job id -> the device its last run started on
        self.cancelled: set[str] = set()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for n in range(self.workers):
            thread = threading.Thread(target=self._loop, name=f"arenaseg-worker-{n}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self) -> None:
        """Stop taking jobs and stop the running workers; their jobs stay ``running`` in the
        database and become ``failed`` at the next start (:meth:`JobStore.recover`)."""
        self.stopping.set()
        self.wake.set()
        for job_id in list(self.processes):
            self.kill(job_id)
        for thread in self.threads:
            thread.join(timeout=10)

    def cancel(self, job_id: str) -> None:
        self.cancelled.add(job_id)
        self.kill(job_id)

    def kill(self, job_id: str) -> None:
        """Ask job ``job_id``'s worker to stop (SIGTERM: it stops within about a step)."""
        proc = self.processes.get(job_id)
        if proc is not None:
            try:
                proc.send_signal(signal.SIGTERM)
            except OSError:
                pass

    def _loop(self) -> None:
        while not self.stopping.is_set():
            job = self.store.claim_next()
            if job is None:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            try:
                self._run(job)
            except Exception as err:  # a server bug must not stop the queue
                if not self.stopping.is_set():
                    message = f"the server could not run this job ({type(err).__name__}: {err})"
                    self.store.finish(job["id"], "failed", {"event": "error", "message": message},
                                      message)

    def event(self, job_id: str, event: dict, shown: dict) -> dict | None:
        """Store one of the worker's events (server paths replaced); a last one is returned
        instead, to be stored with the job's end."""
        event = renamed(event, shown)
        if event.get("event") == "started":
            self.devices[job_id] = event.get("device")
        if event.get("event") in FINAL_EVENTS:
            return event
        self.store.add_event(job_id, event)
        return None

    def execute(self, job_id: str, worker: dict, folder: Path, shown: dict) -> tuple[dict | None, int]:
        """Run ``worker`` (a worker job) to its end, storing its events as they come; return its
        last event (None when it died without one) and its exit status (negative: a signal)."""
        path = folder / "job.json"
        path.write_text(json.dumps(worker))
        with open(folder / "worker.log", "ab") as log:
            proc = spawn_worker(path, folder, log, self.file_limit_mb, self.memory_limit_gb)
        self.processes[job_id] = proc
        if job_id in self.cancelled or self.stopping.is_set():  # while it was being claimed
            proc.send_signal(signal.SIGTERM)
        last = None
        try:
            for event in read_events(proc):
                last = self.event(job_id, event, shown) or last
            code = proc.wait()
        finally:
            proc.stdout.close()
            if proc.stdin:
                proc.stdin.close()
            self.processes.pop(job_id, None)
        return last, code

    def _run(self, job: dict) -> None:
        job_id = job["id"]
        folder = self.store.jobs_dir / job_id
        folder.mkdir(exist_ok=True)
        shown = job["request"].get("_shown", {})
        worker = job["worker_job"]
        last, code = self.execute(job_id, worker, folder, shown)
        retry = (smaller(worker, self.devices.get(job_id)) if out_of_memory(last)
                 and job_id not in self.cancelled and not self.stopping.is_set() else None)
        if retry is not None:
            worker, what = retry
            phase = "training" if "crops" in what else "reading"
            self.store.add_event(job_id, {"event": "warning", "phase": phase, "message":
                                          f"out of memory on the server ({last['message'][:200]}):"
                                          f" {what}"})
            last, code = self.execute(job_id, worker, folder, shown)
        self.devices.pop(job_id, None)
        if self.stopping.is_set() and (last is None or last["event"] != "done"):
            # stopped with the server (the SIGTERM may surface as any error inside a library):
            # failed at the next start
            return
        kind = last["event"] if last else None
        if kind == "done" and code == 0:
            try:
                result = self._results(job, worker)
            except OSError as err:  # the adapter's copy into the blobs: a disk that filled up
                message = (f"the server could not store this job's adapter ({err.strerror or err})"
                           " in its data folder, so nothing was sent: its administrator must free "
                           "space there; then submit the job again")
                self.store.finish(job_id, "failed", {"event": "error", "message": message}, message)
                self.cancelled.discard(job_id)
                return
            last.pop("traceback", None)
            last["files"] = result
            self.store.finish(job_id, "done", last, None, result)
        elif kind == "cancelled" or (kind is None and job_id in self.cancelled):
            self.store.finish(job_id, "cancelled", {"event": "cancelled"}, "cancelled")
        elif kind == "error":
            last.pop("traceback", None)  # stays in the server's log
            message = server_write_error(last.get("message", ""), self.file_limit_mb)
            if message:
                last["message"] = message
            self.store.finish(job_id, "failed", last, last.get("message"))
        else:
            cause = (f"killed by signal {signal.Signals(-code).name}" if code < 0
                     else f"exit status {code}")
            message = (f"the worker process ended without a result ({cause}): the server "
                       "goes on with the next job; submit this one again")
            self.store.finish(job_id, "failed", {"event": "error", "message": message}, message)
        self.cancelled.discard(job_id)

    def _results(self, job: dict, worker: dict) -> dict:
        segmentation = Path(worker["out"])
        result = {"segmentation": {"sha256": file_digest(segmentation),
                                   "suffix": job["request"].get("out_suffix", ".nii.gz")}}
        if worker.get("adapter_out"):
            # the user's own file from now on: a segment job names it by this hash
            sha = self.store.add_file(job["user_id"], Path(worker["adapter_out"]))
            result["adapter"] = {"sha256": sha, "suffix": ".safetensors"}
        return result
