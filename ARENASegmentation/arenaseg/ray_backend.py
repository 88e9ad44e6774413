"""``arenaseg serve --backend ray [--ray-address ADDR]``: the server's jobs as Ray tasks.

Each job is one Ray task (``num_gpus=1`` when the cluster has GPUs, else one CPU) on an existing
Ray cluster (``ADDR``, e.g. ``ray://head:10001`` or ``auto``) or on a local Ray instance started
with the server. The task runs the same ``python -m arenaseg.worker`` as the local backend, in a
temporary folder on its node: the inputs travel through Ray's object store (nodes need no shared
disk with the server), its events come back as a Ray streaming generator, and its outputs (and
its log's tail) come back as the generator's last item, written into the job's folder on the
server. Cancel is ``ray.cancel``: the task stops its worker with SIGTERM.

Events, cancel, results, limits and the out-of-memory retry are the local backend's
(:class:`arenaseg.runner.Runner`); only :meth:`RayRunner.execute` and :meth:`RayRunner.kill`
differ. Ray is imported here only (the ``ray`` extra).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import ray

from .client import renamed
from .jobstore import JobStore
from .runner import Runner, read_events, spawn_worker

#: Worker-job fields naming input files, sent through the object store.
INPUTS = ("image", "annotations", "warm_start", "adapter")
OUTPUTS = ("out", "adapter_out")
_LOG_TAIL = 64 * 1024  # bytes of the node's worker log sent back to the server's worker.log


def run_on_node(worker: dict, inputs: dict, file_limit_mb, memory_limit_gb, threads):
    """The Ray task (a generator): the worker's events with node paths turned back into the
    server's, then ``{"_exit": status, "_outputs": {field: bytes}, "_log": bytes}``.

    ``threads``: the server's ``OMP_NUM_THREADS`` (None: unset). The worker gets it instead of
    the one CPU Ray sets for the task, so that it computes as a local worker does, in the same
    order: the same job gives the same bytes through Ray as locally (one thread changed 13
    voxels of 290,000 and the adapter by 6e-4). Ray's CPU count is for scheduling only."""
    folder = Path(tempfile.mkdtemp(prefix="arenaseg-job-"))
    try:
        job, back = dict(worker), {}
        (folder / "out").mkdir()
        for name, ref in inputs.items():
            local = folder / Path(worker[name]).name
            local.write_bytes(ray.get(ref[0]))  # a ref inside a list: fetched here, on the node
            job[name], back[str(local)] = str(local), worker[name]
        for name in OUTPUTS:
            if worker.get(name):
                local = folder / "out" / Path(worker[name]).name
                job[name], back[str(local)] = str(local), worker[name]
        path = folder / "job.json"
        path.write_text(json.dumps(job))
        with open(folder / "worker.log", "wb") as log:
            env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
            if threads is not None:
                env["OMP_NUM_THREADS"] = threads
            proc = spawn_worker(path, folder, log, file_limit_mb, memory_limit_gb, env)
        try:
            for event in read_events(proc):
                yield renamed(event, back)
            code = proc.wait()
        except BaseException:  # ray.cancel (KeyboardInterrupt) or a dropped generator
            _stop(proc)
            raise
        finally:
            proc.stdout.close()
            proc.stdin.close()
        outputs = {name: Path(job[name]).read_bytes() for name in OUTPUTS
                   if worker.get(name) and Path(job[name]).is_file()}
        with open(folder / "worker.log", "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - _LOG_TAIL))
            tail = log.read()
        yield {"_exit": code, "_outputs": outputs, "_log": tail}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the worker stops within about a step), then SIGKILL after a minute."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    except OSError:
        pass


class RayRunner(Runner):
    """:class:`~arenaseg.runner.Runner` whose jobs run as Ray tasks (see the module doc).

    Args:
        address: a Ray cluster's address (``ray.init(address=...)``); None: a local instance.
    """

    def __init__(self, store: JobStore, workers: int = 1, file_limit_mb: float | None = None,
                 memory_limit_gb: float | None = None, address: str | None = None):
        super().__init__(store, workers, file_limit_mb, memory_limit_gb)
        self.address = address
        self.task = None

    def start(self) -> None:
        handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
        ray.init(address=self.address or "local", include_dashboard=False, log_to_driver=False,
                 namespace="arenaseg", configure_logging=False)
        if threading.current_thread() is threading.main_thread():
            for number, handler in handlers.items():  # ray.init takes SIGTERM: give it back to
                signal.signal(number, handler)        # the server's graceful stop (uvicorn)
        gpus = ray.cluster_resources().get("GPU", 0)
        self.task = ray.remote(run_on_node).options(num_gpus=1 if gpus else 0, num_cpus=1,
                                                    max_retries=0)
        super().start()

    def stop(self) -> None:
        super().stop()
        ray.shutdown()

    def kill(self, job_id: str) -> None:
        generator = self.processes.get(job_id)
        if generator is not None:
            ray.cancel(generator)

    def execute(self, job_id: str, worker: dict, folder: Path, shown: dict) -> tuple[dict | None, int]:
        inputs = {name: [ray.put(Path(worker[name]).read_bytes())] for name in INPUTS
                  if worker.get(name)}
        generator = self.task.remote(worker, inputs, self.file_limit_mb, self.memory_limit_gb,
                                     os.environ.get("OMP_NUM_THREADS"))
        self.processes[job_id] = generator
        if job_id in self.cancelled or self.stopping.is_set():  # while it was being submitted
            ray.cancel(generator)
        last, code = None, -signal.SIGTERM
        try:
            for ref in generator:
                item = ray.get(ref)
                if "_exit" in item:
                    code = item["_exit"]
                    with open(folder / "worker.log", "ab") as log:
                        log.write(item["_log"])
                    failed = self._write(worker, folder, item["_outputs"])
                    last = failed or last
                    break
                last = self.event(job_id, item, shown) or last
        except ray.exceptions.TaskCancelledError:  # also Ray's RayTaskError(TaskCancelledError)
            pass  # no last event: cancelled (or, while the server stops, failed at its restart)
        except ray.exceptions.RayError as err:  # the task failed, or its node or cluster is lost
            lines = str(err).strip().splitlines() or [""]
            last = {"event": "error", "message": f"the Ray task of this job failed "
                    f"({type(err).__name__}: {lines[-1][:300]}): submit the job again"}
            code = 1
        finally:
            self.processes.pop(job_id, None)
        return last, code

    def _write(self, worker: dict, folder: Path, outputs: dict) -> dict | None:
        """The task's outputs into the job's folder, all or none (an ``error`` event if not)."""
        written = []  # (temporary, target)
        try:
            for name, data in outputs.items():
                target = Path(worker[name])
                written.append((folder / f".{target.name}.{secrets.token_hex(4)}.part", target))
                written[-1][0].write_bytes(data)
            for part, target in written:  # every file is complete: rename into place
                os.replace(part, target)
        except OSError as err:
            for part, target in written:
                part.unlink(missing_ok=True)
                target.unlink(missing_ok=True)
            return {"event": "error", "message": f"the server could not write this job's outputs "
                    f"({err.strerror or err}) in its data folder, so nothing was saved or sent: its "
                    "administrator must free space there; then submit the job again"}
        return None
