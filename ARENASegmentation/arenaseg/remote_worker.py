"""A worker job run on an ``arenaseg serve`` server: the job field ``"server": URL``.

``python -m arenaseg.worker JOB.json`` with a ``server`` field uploads the job's input files
(skipped when the server holds the same content already), submits the job, prints the server's
events on stdout as a local run prints its own (``started``, ``phase``, ``warning``,
``progress``, then ``done``, ``error`` or ``cancelled``), with this computer's paths in place of
the server's, and downloads the outputs to the job's ``out`` and ``adapter_out`` (checked against
the server's SHA-256 and published atomically). A GUI client therefore reads one event stream,
wherever the job runs. Before the server starts the job it prints ``phase`` events
``uploading`` and ``queued``; ``started`` carries ``server`` (the URL) and the server's device.

The token comes from the environment variable ``ARENASEG_TOKEN``: never from the job file (a
temporary file) nor from the command line (other users of the computer can list it). The end of
stdin (``stop_on_stdin_eof``) or SIGTERM cancels the job on the server. Needs httpx, not torch.
"""

from __future__ import annotations

import _thread
import os
import signal
from pathlib import Path
from typing import Callable

from .client import OUT_SUFFIXES, Client, renamed
from .errors import ArenaError, Cancelled
from .io.outputs import Outputs, check_writable, shown, signals_held

#: Job fields naming input files: uploaded, and sent as their SHA-256.
UPLOADED = ("image", "annotations", "warm_start", "adapter")
#: Job fields that stay here: the server sets its own output paths and stop rule.
LOCAL_ONLY = ("out", "adapter_out", "stop_on_stdin_eof", "server")


class RemoteJob:
    """One worker job (a dict with ``server``) run on that server; :meth:`run` blocks,
    :meth:`cancel` may be called from another thread (the stdin watcher)."""

    def __init__(self, job: dict, emit: Callable):
        self.job, self.emit = job, emit
        self.url = str(job["server"]).rstrip("/")
        self.token = os.environ.get("ARENASEG_TOKEN", "").strip()
        self.jobId = None
        self.cancelled = False

    def run(self) -> dict:
        """Run the job there; returns the ``done`` fields with this computer's output paths.

        Raises:
            ArenaError: no token, an output that cannot be written, the server unreachable or
                refusing (401 token, 409 version, 413 size: its one line), or the job's error.
            Cancelled: cancelled here (stdin closed, SIGTERM) or on the server.
        """
        job = self.job
        if not self.token:
            raise ArenaError(f"server {self.url} needs your token in the environment variable "
                             "ARENASEG_TOKEN (a server administrator creates it with 'arenaseg "
                             "token add')")
        if job.get("weights"):
            raise ArenaError("job field weights is not sent to a server: it uses its own copy of "
                             "the backbone's weights; drop weights, or clear the server URL")
        suffix = next((s for s in OUT_SUFFIXES if str(job["out"]).endswith(s)), None)
        if suffix is None:
            raise ArenaError(f"job field out '{shown(job['out'])}' must end with one of "
                             f"{', '.join(OUT_SUFFIXES)} for a server")
        outputs = [("segmentation", job["out"], "out")]
        if job.get("adapter_out"):
            outputs.append(("adapter", job["adapter_out"], "adapter_out"))
        for _, path, field in outputs:
            check_writable(path, f"job field {field}")
        client = Client(self.url, self.token)
        try:
            request = {k: v for k, v in job.items() if k not in LOCAL_ONLY}
            request["out_suffix"] = suffix
            if job["command"] == "adapt":
                request["adapter_out"] = bool(job.get("adapter_out"))
            names = {f"output:{name}": str(path) for name, path, _ in outputs}
            for field in UPLOADED:
                path = request.get(field)
                if path:
                    self.emit("phase", phase="uploading", message=f"uploading {path} to {self.url}")
                    sha = client.upload(path, f"job field {field}")
                    names.update({f"upload:{sha}": path, f"upload-name:{sha}": Path(path).name})
                    request[field] = sha
            try:
                with signals_held():  # a cancel meanwhile lands after the id is known: deleted below
                    self.jobId = client.request("POST", "/v1/jobs", json=request).json()["id"]
                if self.cancelled:  # stdin closed while uploading or submitting
                    raise Cancelled()
                self.emit("phase", phase="queued", message=f"job {self.jobId} queued on {self.url}")
                done = self._follow(client, names)
                files = done.pop("files", {})
                self.emit("phase", phase="downloading", message=f"downloading the results from {self.url}")
                with Outputs() as staged:
                    for name, path, field in outputs:
                        if name in files:
                            staged.write(path, lambda tmp, name=name: client.download(
                                self.jobId, name, tmp, files[name]["sha256"]),
                                what=f"output {name}", option=f"job field {field}")
                    staged.publish()
            except BaseException:  # cancel, SIGTERM, a lost connection: the job stops there too
                self._delete()
                raise
        finally:
            client.close()
        return done

    def _follow(self, client: Client, names: dict) -> dict:
        """Relay the job's events until its last one; returns the ``done`` event's fields."""
        for event in client.events(self.jobId):
            event = renamed(event, names)
            kind = event.pop("event", None)
            if kind == "started":  # our process id: the one a GUI client can stop
                self.emit("started", pid=os.getpid(), command=self.job["command"],
                          device=event.get("device"), server=self.url)
            elif kind in ("phase", "warning", "progress"):
                self.emit(kind, **event)
            elif kind == "done":
                return event
            elif kind == "error":
                raise ArenaError(f"{event.get('message') or 'the job failed'} (job {self.jobId} on "
                                 f"server {self.url})")
            elif kind == "cancelled":
                raise Cancelled()
        raise ArenaError(f"server {self.url}: job {self.jobId} ended without a result")

    def _delete(self) -> bool:
        """Cancel the job on the server (a fresh connection: safe from any thread)."""
        if self.jobId is None:
            return False
        import httpx

        from .client import VERSION_HEADER
        from . import __version__

        try:
            response = httpx.delete(f"{self.url}/v1/jobs/{self.jobId}", timeout=10.0,
                                    headers={"Authorization": f"Bearer {self.token}",
                                             VERSION_HEADER: __version__})
            return response.status_code == 200
        except httpx.HTTPError:
            return False

    def cancel(self) -> None:
        """The stdin watcher's cancel: cancel the job on the server, whose ``cancelled`` event
        then ends :meth:`run`; before the job exists, or when the server cannot be told, stop
        this process's main thread as SIGTERM does."""
        self.cancelled = True
        if not self._delete():
            _thread.interrupt_main(signal.SIGTERM)
