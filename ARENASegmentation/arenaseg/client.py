"""``arenaseg adapt|segment ... --server URL``: run the job on an ``arenaseg serve`` server.

The same options, checks, phase lines, progress bar, summary, output paths and exit codes as a
local run: the inputs are uploaded (skipped when the server holds the same content already), the
job is submitted and followed through its server-sent events, and the outputs are downloaded,
checked against the SHA-256 the server announces, and published atomically
(:class:`arenaseg.io.outputs.Outputs`). Ctrl-C or SIGTERM cancels the job on the server.

A client that is cut off otherwise (killed, its connection lost) leaves the job running there:
the same command with ``--job ID`` follows it again (its events from the first) and fetches
its outputs to the same paths.

The token comes from ``--token-file`` or the environment variable ``ARENASEG_TOKEN``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import types
from pathlib import Path

from . import __version__
from .download import file_digest
from .errors import ArenaError
from .io.outputs import Outputs, WriteMismatch, check_writable, shown

VERSION_HEADER = "X-Arenaseg-Version"
OUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
#: Longest wait (s) for the server's rate limit before a request is tried again; beyond it the
#: 429 is the command's error.
MAX_RETRY_AFTER = 30
_OPTIONS = {"image": "--image", "annotations": "--annotations", "warm_start": "--warm-start",
            "adapter": "--adapter"}


def _token(args) -> str:
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as err:
            raise ArenaError(f"--token-file '{args.token_file}' cannot be read "
                             f"({err.strerror or err})") from None
        if not token:
            raise ArenaError(f"--token-file '{args.token_file}' is empty")
        return token
    token = os.environ.get("ARENASEG_TOKEN", "").strip()
    if not token:
        raise ArenaError("--server needs your token: set ARENASEG_TOKEN or give --token-file "
                         "(the server's administrator creates it with 'arenaseg token add')")
    return token


class Client:
    """A session with one server; every failure is one :class:`ArenaError` line."""

    def __init__(self, url: str, token: str):
        try:
            import httpx
        except ImportError:
            raise ArenaError("--server needs httpx: pip install 'arenaseg[server]'") from None
        self.httpx = httpx
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(60.0, connect=10.0),
                                 headers={"Authorization": f"Bearer {token}",
                                          VERSION_HEADER: __version__})

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, ok=(200, 201), **kwargs):
        """One request; a 429 (the server's rate limit) is retried after its ``Retry-After``
        when that is at most :data:`MAX_RETRY_AFTER` seconds, twice at most."""
        for attempt in range(3):
            try:
                response = self.http.request(method, path, **kwargs)
            except self.httpx.HTTPError as err:
                raise ArenaError(f"server {self.url} cannot be reached ({type(err).__name__}: "
                                 f"{err}): is 'arenaseg serve' running there?") from None
            wait = response.headers.get("retry-after", "")
            if (response.status_code != 429 or not wait.isdigit() or int(wait) > MAX_RETRY_AFTER
                    or attempt == 2 or "content" in kwargs):  # a streamed upload is sent once
                break
            time.sleep(int(wait))
        if response.status_code not in ok:
            raise ArenaError(f"server {self.url}: {self._detail(response)}")
        return response

    @staticmethod
    def _detail(response) -> str:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = None
        return f"{detail or response.reason_phrase} (HTTP {response.status_code})"

    def upload(self, path: str, option: str) -> str:
        """The SHA-256 of ``path``, uploaded unless the server holds it for us already."""
        if Path(path).is_dir():
            raise ArenaError(f"{option} '{shown(path)}' is a folder: with --server give a single "
                             "file (NIfTI, NRRD, MHA; convert a DICOM series first)")
        try:
            sha = file_digest(path)
        except OSError as err:
            raise ArenaError(f"{option} '{shown(path)}' cannot be read "
                             f"({err.strerror or err})") from None
        if self.request("GET", f"/v1/uploads/{sha}", ok=(200, 404)).status_code == 200:
            return sha
        with open(path, "rb") as f:
            answer = self.request("POST", "/v1/uploads", content=f,
                                  headers={"Content-Type": "application/octet-stream",
                                           "Content-Length": str(os.fstat(f.fileno()).st_size)})
        if answer.json()["sha256"] != sha:
            raise ArenaError(f"{option} '{shown(path)}' changed while it was uploaded: try again")
        return sha

    def events(self, job_id: str):
        """The job's events (dicts) as they come, until its last one; reconnects from the last
        event received when the stream breaks."""
        after, failures = 0, 0
        while True:
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events", params={"after": after},
                                      timeout=self.httpx.Timeout(60.0, connect=10.0)) as response:
                    if response.status_code != 200:
                        response.read()
                        raise ArenaError(f"server {self.url}: {self._detail(response)}")
                    data, seq = [], None
                    for line in response.iter_lines():
                        if line.startswith("data:"):
                            data.append(line[5:].strip())
                        elif line.startswith("id:"):
                            seq = int(line[3:].strip())
                        elif not line and data:
                            event = json.loads("\n".join(data))
                            data = []
                            after = seq if seq is not None else after
                            failures = 0
                            yield event
                            if event.get("event") in ("done", "error", "cancelled"):
                                return
            except self.httpx.HTTPError as err:
                failures += 1
                if failures > 5:
                    raise ArenaError(f"server {self.url}: lost the job's events ({err}); job "
                                     f"{job_id} may still run there: {fetch_later(job_id)}") from None
                time.sleep(min(2.0 * failures, 10.0))
                continue
            state = self.request("GET", f"/v1/jobs/{job_id}").json()["state"]
            if state in ("done", "failed", "cancelled"):
                raise ArenaError(f"server {self.url}: job {job_id} is {state} but sent no last "
                                 "event")

    def download(self, job_id: str, name: str, target: str, sha: str) -> None:
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/files/{name}") as response:
                if response.status_code != 200:
                    response.read()
                    raise ArenaError(f"server {self.url}: {self._detail(response)}")
                with open(target, "wb") as f:
                    for block in response.iter_bytes(1 << 20):
                        f.write(block)
        except self.httpx.HTTPError as err:
            raise OSError(f"download of the {name} failed ({err})") from None
        if file_digest(target) != sha:
            raise WriteMismatch(f"the downloaded {name} differs from the server's (SHA-256)")


def fetch_later(job_id: str) -> str:
    return f"to fetch its outputs later, run this same command with --job {job_id}"


def run_remote(args) -> None:
    """Run ``args`` (an adapt or segment command line with ``--server``) on the server."""
    from .cli import _job, report_adapt, report_segment
    from .config import BACKBONES

    job = _job(args)  # the same checks as a local run, before any upload
    fields = job.to_dict()
    if fields.get("weights"):
        raise ArenaError("--weights is not sent to a server: the server uses its own copy of "
                         "the backbone's weights; drop --weights")
    if args.command == "adapt" and fields["backbone"] not in BACKBONES:
        raise ArenaError(f"--backbone '{fields['backbone']}' is a file: with --server give a "
                         f"backbone id ({', '.join(BACKBONES)})")
    suffix = next((s for s in OUT_SUFFIXES if str(args.out).endswith(s)), None)
    if suffix is None:
        raise ArenaError(f"output segmentation '{shown(args.out)}' has an unsupported extension "
                         f"for --server: use one of {', '.join(OUT_SUFFIXES)}")
    for path, what in ((args.out, "output segmentation"),
                       (getattr(args, "adapter_out", None), "adapter output")):
        if path and not Path(path).parent.resolve().is_dir():
            raise ArenaError(f"folder of {what} '{shown(path)}' does not exist: create it first")
    check_writable(args.out, "output segmentation", "--out")
    adapter_out = getattr(args, "adapter_out", None)
    if adapter_out:
        if not str(adapter_out).endswith(".safetensors"):
            raise ArenaError(f"adapter output '{shown(adapter_out)}' has an unsupported "
                             "extension: use .safetensors")
        check_writable(adapter_out, "adapter output", "--adapter-out")

    client = Client(args.server, _token(args))
    try:
        request = {k: v for k, v in fields.items() if k not in ("out", "stop_on_stdin_eof",
                                                                 "weights", "adapter_out")}
        request["out_suffix"] = suffix
        if args.command == "adapt":
            request["adapter_out"] = bool(adapter_out)
        names = {"output:segmentation": str(args.out), "output:adapter": str(adapter_out)}
        job_id = getattr(args, "job", None)
        for name, option in _OPTIONS.items():
            if request.get(name):
                sha = (_digest(request[name], option) if job_id
                       else client.upload(request[name], option))
                names[f"upload:{sha}"] = request[name]
                names[f"upload-name:{sha}"] = Path(request[name]).name
                request[name] = sha
        if job_id:
            _attach(client, job_id, args.command, suffix)
        else:
            job_id = client.request("POST", "/v1/jobs", json=request).json()["id"]
            print(f"arenaseg: job {job_id} queued on {client.url} (Ctrl-C cancels it; if this "
                  f"client is cut off, it goes on: {fetch_later(job_id)})", file=sys.stderr,
                  flush=True)
        try:
            done = _follow(client, job_id, names, args)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (cli.Terminated): the job stops there too;
            # a lost connection is no reason to stop it: it is fetched later with --job
            try:
                client.http.delete(f"/v1/jobs/{job_id}", timeout=5)
                print(f"\narenaseg: job {job_id} cancelled on {client.url}", file=sys.stderr)
            except Exception:
                print(f"\narenaseg: job {job_id} could not be cancelled on {client.url}: it may "
                      f"still run there ({fetch_later(job_id)})", file=sys.stderr)
            raise
        files = done["files"]
        with Outputs() as outputs:
            for name, path, option in (("segmentation", args.out, "--out"),
                                       ("adapter", adapter_out, "--adapter-out")):
                if path and name in files:
                    outputs.write(path, lambda tmp, name=name: client.download(
                        job_id, name, tmp, files[name]["sha256"]),
                        what=f"output {name}", option=option)
            outputs.publish()
    finally:
        client.close()
    done["segmentation"] = str(args.out)
    done["adapter"] = str(adapter_out) if adapter_out and "adapter" in files else None
    if args.command == "adapt":
        report_adapt(args, types.SimpleNamespace(**done), job.settings)
    else:
        report_segment(args, done)


def _digest(path: str, option: str) -> str:
    try:
        return file_digest(path)
    except OSError as err:
        raise ArenaError(f"{option} '{shown(path)}' cannot be read ({err.strerror or err})") from None


def _attach(client: Client, job_id: str, command: str, suffix: str) -> None:
    """Check that ``--job`` names a job of this command whose segmentation fits ``--out``."""
    if not re.fullmatch(r"[0-9a-f]{24}", job_id):
        raise ArenaError(f"--job {job_id[:40]!r} is not a job id (24 hex digits, as 'arenaseg: "
                         "job ID queued' printed it)")
    job = client.request("GET", f"/v1/jobs/{job_id}").json()
    if job["command"] != command:
        raise ArenaError(f"--job {job_id} ran '{job['command']}', not '{command}': run "
                         f"'arenaseg {job['command']} ... --job {job_id}'")
    wrote = (job.get("result") or {}).get("segmentation", {}).get("suffix")
    if wrote and wrote != suffix:
        raise ArenaError(f"job {job_id} wrote a {wrote} segmentation: give --out ending in {wrote}")
    print(f"arenaseg: following job {job_id} on {client.url} ({job['state']})", file=sys.stderr,
          flush=True)


def renamed(value, names: dict[str, str]):
    """``value`` (an event, or any text, list or dict in it) with each of ``names``' keys
    replaced by its value, longest first: the server's names for a client's files
    (``upload:SHA``, ``output:segmentation``) and back."""
    if isinstance(value, str):
        for token in sorted(names, key=len, reverse=True):
            value = value.replace(token, names[token])
        return value
    if isinstance(value, dict):
        return {k: renamed(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [renamed(v, names) for v in value]
    return value


def _follow(client: Client, job_id: str, names: dict, args) -> dict:
    """Print the job's phases and progress as a local run does; return its ``done`` event."""
    from .cli import PhaseLines, _progress_bar

    def local(text: str) -> str:
        return renamed(text, names)

    lines = PhaseLines(args.explain)
    bar = None
    for event in client.events(job_id):
        kind = event.get("event")
        if kind == "phase":
            lines(event["phase"], local(event["message"]), event.get("done"), event.get("total"))
        elif kind == "warning":
            lines(event["phase"], "warning: " + local(event["message"]))
        elif kind == "progress":
            bar = bar or _progress_bar()
            bar(event["step"], event["steps"], event["loss"], event["ranks"])
        elif kind == "done":
            return event
        elif kind == "error":
            raise ArenaError(local(event.get("message", "the job failed on the server")))
        elif kind == "cancelled":
            raise ArenaError(f"job {job_id} was cancelled on the server")
    raise ArenaError(f"server {client.url}: job {job_id} ended without a result")
