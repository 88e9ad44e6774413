"""``arenaseg serve``: a department GPU server running the engine's jobs for several users.

HTTP API (every request carries ``Authorization: Bearer TOKEN``, else 401; a client sends its
version in ``X-Arenaseg-Version``, and a version other than the server's is answered 409 naming
both):

- ``POST /v1/uploads`` (raw body: a NIfTI, NRRD, MetaImage or safetensors file) → ``{"sha256",
  "size", "suffix"}``; stored under ``DATA/blobs`` by content hash, never by a client's name;
  larger than ``--max-upload-mb``: 413; another type: 415. ``GET /v1/uploads/{sha256}``: 200
  when the user holds that file, else 404.
- ``POST /v1/jobs`` (JSON: a worker job, :mod:`arenaseg.worker`, whose input files are upload
  hashes of the same user, with ``out_suffix`` instead of ``out`` and ``adapter_out`` true or
  false) → ``{"id", "state"}``; refused with 400 and one line when the job cannot run.
- ``GET /v1/jobs``, ``GET /v1/jobs/{id}`` (state: queued, running, done, failed, cancelled),
  ``GET /v1/jobs/{id}/events?after=N`` (server-sent events: the worker's JSON events, ``id:``
  their number; ends after ``done``, ``error`` or ``cancelled``), ``DELETE /v1/jobs/{id}``
  (cancels: SIGTERM to the worker), ``GET /v1/jobs/{id}/files/segmentation`` and ``.../adapter``.
  Another user's job is 404.

Each user may send ``--rate-limit`` requests (:data:`DEFAULT_RATE_LIMIT` by default, a moving
window kept in memory by the ``limits`` library); beyond it the answer is 429 with
``Retry-After`` (seconds).

Each job runs as ``python -m arenaseg.worker job.json`` (``--workers`` at a time), from a queue
in ``DATA/server.sqlite`` (:mod:`arenaseg.jobstore`), by :mod:`arenaseg.runner`: a worker that
dies without a last event (killed) ends its job with an ``error`` event and the next job runs; a
job out of memory is retried once, smaller; ``--max-job-file-mb`` and ``--max-job-memory-gb``
bound what one job may write and allocate. ``--backend ray`` runs the same worker as Ray tasks
(:mod:`arenaseg.ray_backend`, imported only then).

FastAPI and uvicorn are imported here only (the ``server`` extra): the engine runs without them.
"""


import asyncio
import hashlib
import ipaddress
import json
import math
import os
import re
import secrets
import sys
import time
from pathlib import Path

from . import __version__
from .config import BACKBONES, job_from_dict
from .errors import ArenaError
from .jobstore import FINAL_EVENTS, FINISHED, JobStore, sniff_suffix
from .runner import Runner

VERSION_HEADER = "X-Arenaseg-Version"
#: Segmentation formats the server writes (single files: no .nhdr/.mhd with a data file).
OUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
#: Job fields naming input files: upload hashes on the wire.
HASH_FIELDS = ("image", "annotations", "warm_start", "adapter")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_JOB_ID = re.compile(r"[0-9a-f]{24}")
#: Requests per user and window (``limits`` notation): far above what a client following its
#: jobs sends (about ten requests a job, one event stream each), low enough to stop a runaway
#: script from starving the other users.
DEFAULT_RATE_LIMIT = "600/minute"


def check_bind(host: str, certfile: str | None, keyfile: str | None) -> None:
    """Refuse to serve beyond this machine without TLS (tokens would travel in clear).

    Raises:
        ArenaError: ``host`` is not a loopback address and TLS is not configured, or only one
            of the certificate and the key is given.
    """
    if bool(certfile) != bool(keyfile):
        raise ArenaError("give both --ssl-certfile and --ssl-keyfile, or neither")
    for path, option in ((certfile, "--ssl-certfile"), (keyfile, "--ssl-keyfile")):
        if path and not Path(path).is_file():
            raise ArenaError(f"{option} '{path}' is not a file")
    if certfile:
        return
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ArenaError(f"--host {host} is not a loopback address and no TLS is configured: "
                         "tokens and scans would cross the network in clear; give "
                         "--ssl-certfile and --ssl-keyfile, or serve on 127.0.0.1 (e.g. behind an "
                         "SSH tunnel)")


def rate_limiter(text: str):
    """A per-user limiter for ``text`` (e.g. ``600/minute``, ``10/second``): a function of a
    user's key returning None while within the limit, else the seconds to wait.

    Raises:
        ArenaError: ``text`` is not a rate, or the ``limits`` library is missing.
    """
    try:
        from limits import parse, storage, strategies
    except ImportError:
        raise ArenaError("arenaseg serve needs the 'limits' library (the 'server' extra): "
                         "pip install 'arenaseg[server]'") from None
    try:
        item = parse(text)
    except ValueError:
        item = None
    if item is None or item.amount < 1:
        raise ArenaError(f"--rate-limit {text!r} must be a number of requests per second, minute "
                         "or hour, e.g. 600/minute")
    limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())

    def wait(key: str) -> float | None:
        if limiter.hit(item, key):
            return None
        return max(limiter.get_window_stats(item, key).reset_time - time.time(), 0.0)

    wait.rate = f"{item.amount} requests per {item.multiples} {item.GRANULARITY.name}"
    return wait


def worker_job(store: JobStore, user_id: int, job_id: str, request: dict) -> tuple[dict, dict]:
    """The worker's job for a client's ``request``, and the mapping of server paths to the
    tokens its events show instead (``upload:SHA``, ``output:segmentation``).

    Raises:
        ArenaError: a field the server does not take, an upload the user does not hold, or
            whatever :func:`arenaseg.config.job_from_dict` refuses.
    """
    if not isinstance(request, dict):
        raise ArenaError("the job must be a JSON object")
    fields = dict(request)
    suffix = fields.pop("out_suffix", ".nii.gz")
    if suffix not in OUT_SUFFIXES:
        raise ArenaError(f"job field out_suffix {json.dumps(suffix)} must be one of "
                         f"{', '.join(OUT_SUFFIXES)}")
    adapter_out = fields.pop("adapter_out", False)
    if not isinstance(adapter_out, bool):
        raise ArenaError("job field adapter_out must be true or false on the server")
    for name in ("out", "stop_on_stdin_eof"):
        if name in fields:
            raise ArenaError(f"job field {name} is set by the server: drop it")
    if fields.get("weights") is not None:
        raise ArenaError("job field weights (a checkpoint file) is not taken by the server: it "
                         "uses the backbones installed there")
    if fields.get("backbone") is not None and fields["backbone"] not in BACKBONES:
        raise ArenaError(f"job field backbone {json.dumps(fields['backbone'])} must be a registry "
                         f"id on the server: one of {', '.join(BACKBONES)}")
    shown = {}
    for name in HASH_FIELDS:
        value = fields.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not _SHA256.fullmatch(value):
            raise ArenaError(f"job field {name} must be the SHA-256 of an upload (64 lowercase "
                             "hex digits)")
        path = store.upload(user_id, value)
        if path is None:
            raise ArenaError(f"job field {name}: you have no upload {value}; upload the file first")
        fields[name] = str(path)
        shown[str(path)] = f"upload:{value}"
        shown[path.name] = f"upload-name:{value}"
    folder = store.jobs_dir / job_id
    fields["out"] = str(folder / f"segmentation{suffix}")
    shown[fields["out"]] = "output:segmentation"
    if adapter_out and fields.get("command") == "adapt":
        fields["adapter_out"] = str(folder / "adapter.safetensors")
        shown[fields["adapter_out"]] = "output:adapter"
    fields["stop_on_stdin_eof"] = True  # a worker whose server died stops
    job = job_from_dict(fields).to_dict()
    shown[str(store.data)] = "<server>"
    return job, shown


def create_app(store: JobStore, runner: Runner, max_upload_bytes: int,
               rate_limit: str = DEFAULT_RATE_LIMIT):
    """The FastAPI application (see the module doc for its routes)."""
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

    @asynccontextmanager
    async def lifespan(app):
        runner.start()
        yield
        await asyncio.to_thread(runner.stop)

    too_often = rate_limiter(rate_limit)
    app = FastAPI(title="arenaseg", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)

    limited: set[int] = set()  # users over the rate limit: one audit row per burst, not each

    def audit(request: Request, action: str, user_id: int | None, **fields) -> None:
        store.audit(action, None if user_id is None else store.user_name(user_id),
                    request.client.host if request.client else None, **fields)

    def user(request: Request) -> int:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            audit(request, "denied", None, detail=f"no token (401) {request.method} "
                  f"{request.url.path[:80]}")
            raise HTTPException(401, "no token: send 'Authorization: Bearer TOKEN' (a server "
                                "administrator creates one with 'arenaseg token add')",
                                headers={"WWW-Authenticate": "Bearer"})
        user_id = store.user_of(token.strip())
        if user_id is None:
            audit(request, "denied", None, detail=f"unknown token (401) {request.method} "
                  f"{request.url.path[:80]}")
            raise HTTPException(401, "the token is not known to this server",
                                headers={"WWW-Authenticate": "Bearer"})
        wait = too_often(str(user_id))
        if wait is not None:
            seconds = math.ceil(wait) or 1
            if user_id not in limited:
                limited.add(user_id)
                audit(request, "denied", user_id, detail=f"rate limit {rate_limit} (429)")
            raise HTTPException(429, f"user {store.user_name(user_id)} sent more than "
                                f"{too_often.rate} (the server's --rate-limit {rate_limit}): "
                                f"wait {seconds} s", headers={"Retry-After": str(seconds)})
        limited.discard(user_id)
        client = request.headers.get(VERSION_HEADER)
        if client is not None and client != __version__:
            raise HTTPException(409, f"client version {client} and server version {__version__} "
                                f"differ: install arenaseg {__version__} on the client")
        return user_id

    def own_job(job_id: str, user_id: int, request: Request) -> dict:
        job = store.job(job_id, user_id) if _JOB_ID.fullmatch(job_id) else None
        if job is None:
            audit(request, "denied", user_id, job_id=job_id if _JOB_ID.fullmatch(job_id) else None,
                  detail=f"no such job of this user (404) {request.method} {request.url.path[:80]}")
            raise HTTPException(404, f"no job {job_id[:40]} of yours on this server")
        return job

    def public(job: dict) -> dict:
        return {"id": job["id"], "command": job["command"], "state": job["state"],
                "created": job["created"], "started": job["started"],
                "finished": job["finished"], "message": job["message"], "result": job["result"]}

    @app.get("/v1/version")
    def version(user_id: int = Depends(user)):
        return {"version": __version__}

    @app.post("/v1/uploads", status_code=201)
    async def upload(request: Request, user_id: int = Depends(user)):
        too_large = HTTPException(413, f"the upload is larger than this server's limit of "
                                  f"{max_upload_bytes / 2**20:g} MB (--max-upload-mb)")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_upload_bytes:
            raise too_large
        temporary = store.incoming / f"{secrets.token_hex(12)}.part"
        digest, size, head = hashlib.sha256(), 0, b""
        try:
            with open(temporary, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_upload_bytes:
                        raise too_large
                    digest.update(chunk)
                    f.write(chunk)
                    if len(head) < 4096:
                        head += chunk[:4096 - len(head)]
            if size == 0:
                raise HTTPException(400, "the upload is empty")
            suffix = sniff_suffix(head)
            if suffix is None:
                raise HTTPException(415, "the upload is not a NIfTI, NRRD, MetaImage or "
                                    "safetensors file")
            sha = digest.hexdigest()
            store.add_blob(user_id, temporary, sha, suffix)
        except OSError as err:  # a full disk: the part file goes, the server goes on
            raise HTTPException(507, f"the server could not store the upload ({err.strerror or err}"
                                ") in its data folder: its administrator must free space there; "
                                "then upload again") from None
        finally:
            temporary.unlink(missing_ok=True)
        audit(request, "upload", user_id, sha256s=[sha], detail=f"{size} bytes, {suffix}")
        return {"sha256": sha, "size": size, "suffix": suffix}

    @app.get("/v1/uploads/{sha256}")
    def uploaded(sha256: str, user_id: int = Depends(user)):
        path = store.upload(user_id, sha256) if _SHA256.fullmatch(sha256) else None
        if path is None:
            raise HTTPException(404, f"no upload {sha256[:64]} of yours on this server")
        return {"sha256": sha256, "size": path.stat().st_size, "suffix": "".join(path.suffixes)}

    @app.post("/v1/jobs", status_code=201)
    async def submit(request: Request, user_id: int = Depends(user)):
        body = await request.body()
        if len(body) > 1 << 20:
            raise HTTPException(413, "the job is larger than 1 MB")
        try:
            fields = json.loads(body)
        except ValueError:
            raise HTTPException(400, "the job is not JSON") from None
        job_id = secrets.token_hex(12)
        try:
            job, shown = worker_job(store, user_id, job_id, fields)
        except ArenaError as err:
            raise HTTPException(400, str(err)) from None
        request_fields = dict(fields, _shown=shown)
        store.add_job(job_id, user_id, job["command"], request_fields, job)
        audit(request, job["command"], user_id, job_id=job_id,
              sha256s=[fields[name] for name in HASH_FIELDS if fields.get(name)])
        runner.wake.set()
        return {"id": job_id, "state": "queued"}

    @app.get("/v1/jobs")
    def jobs(user_id: int = Depends(user)):
        return [public(job) for job in store.jobs_of(user_id)]

    @app.get("/v1/jobs/{job_id}")
    def state(job_id: str, request: Request, user_id: int = Depends(user)):
        return public(own_job(job_id, user_id, request))

    @app.delete("/v1/jobs/{job_id}")
    def cancel(job_id: str, request: Request, user_id: int = Depends(user)):
        job = own_job(job_id, user_id, request)
        audit(request, "cancel", user_id, job_id=job_id, detail=f"was {job['state']}")
        if job["state"] == "queued" and store.cancel_queued(job_id):
            return public(store.job(job_id))
        if job["state"] in ("queued", "running"):
            runner.cancel(job_id)
        return public(store.job(job_id))

    @app.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str, request: Request, after: int = 0,
                     user_id: int = Depends(user)):
        own_job(job_id, user_id, request)
        last_id = request.headers.get("last-event-id", "")
        start = max(after, int(last_id) if last_id.isdigit() else 0)

        async def stream():
            seq, idle = start, 0.0
            while True:
                rows = store.events(job_id, seq)
                for seq, event in rows:
                    yield f"id: {seq}\ndata: {json.dumps(event)}\n\n"
                    if event.get("event") in FINAL_EVENTS:
                        return
                if rows:
                    idle = 0.0
                    continue
                if store.job(job_id)["state"] in FINISHED and not store.events(job_id, seq):
                    return  # its last event was sent before
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.2)
                idle += 0.2
                if idle >= 15:
                    idle = 0.0
                    yield ": still running\n\n"  # keeps proxies and clients from timing out

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/jobs/{job_id}/files/{name}")
    def files(job_id: str, name: str, request: Request, user_id: int = Depends(user)):
        job = own_job(job_id, user_id, request)
        if name not in ("segmentation", "adapter"):
            raise HTTPException(404, f"no file {name[:40]}: ask for segmentation or adapter")
        if job["state"] != "done":
            raise HTTPException(409, f"job {job_id} is {job['state']}, not done: no files")
        result = (job["result"] or {}).get(name)
        if result is None:
            raise HTTPException(404, f"job {job_id} wrote no {name}")
        worker = job["worker_job"]
        path = Path(worker["out"] if name == "segmentation" else worker["adapter_out"])
        audit(request, "download", user_id, job_id=job_id, sha256s=[result["sha256"]], detail=name)
        return FileResponse(path, media_type="application/octet-stream",
                            filename=f"{name}{result['suffix']}",
                            headers={"X-Content-SHA256": result["sha256"]})

    @app.exception_handler(HTTPException)
    async def one_line(request, exc):
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    return app


def serve(host: str, port: int, data: str, workers: int = 1, max_upload_mb: float = 1024,
          ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
          rate_limit: str = DEFAULT_RATE_LIMIT, max_job_file_mb: float | None = None,
          max_job_memory_gb: float | None = None, backend: str = "local",
          ray_address: str | None = None) -> None:
    """Run the server until SIGINT or SIGTERM.

    Raises:
        ArenaError: a bind that is refused (:func:`check_bind`), bad numbers, or the ``server``
            extra missing.
    """
    check_bind(host, ssl_certfile, ssl_keyfile)
    if not 1 <= workers <= 64:
        raise ArenaError(f"--workers {workers} must be >= 1 and <= 64")
    if not 0 < max_upload_mb <= 1_000_000:
        raise ArenaError(f"--max-upload-mb {max_upload_mb} must be > 0 and <= 1000000")
    if max_job_file_mb is not None and not 0 < max_job_file_mb <= 10_000_000:
        raise ArenaError(f"--max-job-file-mb {max_job_file_mb:g} must be > 0 and <= 10000000")
    if max_job_memory_gb is not None and not 1 <= max_job_memory_gb <= 100_000:
        raise ArenaError(f"--max-job-memory-gb {max_job_memory_gb:g} must be >= 1 and <= 100000 "
                         "(the worker's own libraries take about 1 GB of address space)")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise ArenaError(f"arenaseg serve needs the 'server' extra ({err.name} is missing): "
                         "pip install 'arenaseg[server]'") from None
    rate_limiter(rate_limit)  # refused before anything starts
    if backend not in ("local", "ray"):
        raise ArenaError(f"--backend {backend} must be local or ray")
    if ray_address and backend != "ray":
        raise ArenaError("--ray-address needs --backend ray")
    if backend == "ray":
        try:
            from .ray_backend import RayRunner
        except ImportError as err:
            if err.name != "ray" and not (err.name or "").startswith("ray."):
                raise
            raise ArenaError("--backend ray needs Ray on the server: pip install 'arenaseg[ray]'"
                             " (or pip install ray==2.60.0)") from None
    store = JobStore(data)
    failed = store.recover()
    for partial in store.incoming.glob("*.part"):  # uploads cut by the last server's end
        partial.unlink(missing_ok=True)
    if backend == "ray":
        runner = RayRunner(store, workers, max_job_file_mb, max_job_memory_gb, ray_address)
    else:
        runner = Runner(store, workers, max_job_file_mb, max_job_memory_gb)
    app = create_app(store, runner, int(max_upload_mb * 2**20), rate_limit)
    scheme = "https" if ssl_certfile else "http"
    where = f"Ray at {ray_address or 'a local instance'}" if backend == "ray" else "here"
    print(f"arenaseg: serving {data} on {scheme}://{host}:{port} ({workers} worker"
          f"{'s' if workers != 1 else ''} {where}, version {__version__})"
          + (f"; {len(failed)} job(s) left running by the last server marked failed" if failed else ""),
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                log_level=os.environ.get("ARENASEG_SERVER_LOG", "warning"))
