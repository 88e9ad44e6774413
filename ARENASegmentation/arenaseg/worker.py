"""Background worker for GUI clients: ``python -m arenaseg.worker JOB.json``.

The job file is the JSON of an :class:`arenaseg.config.AdaptJob` or
:class:`~arenaseg.config.SegmentJob` (``job.to_json()``): ``"command"`` (``"adapt"`` or
``"segment"``) and the job's fields, which are the keyword arguments of
:func:`arenaseg.pipeline.adapt` or :func:`~arenaseg.pipeline.segment` (an adapt job's
``"settings"`` holds :class:`~arenaseg.config.AdaptSettings` fields), plus
``"stop_on_stdin_eof"``. ``label`` is a label value or, in a 3D Slicer ``.seg.nrrd``, a segment
name; ``series`` (optional) is the SeriesInstanceUID to read when ``image`` is a DICOM folder
holding several series.

The worker prints one JSON object per line on stdout, flushed at once:
``{"event": "started", ...}``, ``{"event": "phase", "phase", "message"}`` as each phase
(reading, preprocessing, training, inference, writing) starts, ``{"event": "warning", "phase",
"message"}`` for a doubtful input (one line: file, what was seen, what was done),
``{"event": "progress", "step", "steps", "loss", "total_rank",
"ranks"}``, then ``{"event": "done", ...}`` with output paths and the rank summary,
``{"event": "error", "message"}`` (exit 2) or ``{"event": "cancelled"}`` (exit 143 after
SIGTERM, within about a training step; outputs are written atomically at the very end, so a
cancelled job leaves none, or all of them when the signal came as they were put in place).
CUDA (bf16 autocast) is used when present, else the CPU.

With ``"server": URL`` the job runs on that ``arenaseg serve`` server instead, with the token in
the environment variable ``ARENASEG_TOKEN``: the same events and output files
(:mod:`arenaseg.remote_worker`), and no torch needed here.
"""

from __future__ import annotations

import _thread
import json
import os
import signal
import sys
import threading
import traceback

from .config import AdaptJob, job_from_dict
from .errors import ArenaError, Cancelled  # torch-free: a job relayed to a server needs no torch
from .io.outputs import ReadablePaths, interrupt, interrupts_not_lost


def emit(event: str, **fields) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def phase(name: str, message: str, done: int | None = None, total: int | None = None) -> None:
    """A phase line, or a ``warning`` event for the engine's ``warning: ...`` input warnings
    (e.g. which DICOM series was used, NaN voxels, a thin volume)."""
    if message.startswith("warning: "):
        emit("warning", phase=name, message=message[len("warning: "):])
    else:
        emit("phase", phase=name, message=message,
             **({"done": done, "total": total} if total else {}))


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: a second cannot cut the clean-up
    interrupt(Cancelled())  # never inside a step that must finish (io.outputs.signals_held)


#: Job fields naming files or folders the job reads; each is read through an ASCII alias when it
#: is not UTF-8 (:class:`~arenaseg.io.outputs.ReadablePaths`); outputs go through
#: :class:`~arenaseg.io.outputs.Outputs`, which handles such paths itself.
INPUT_FIELDS = ("image", "annotations", "warm_start", "weights", "backbone", "adapter")


def _stop_at_stdin_eof(cancel=None) -> None:
    """Job field ``"stop_on_stdin_eof": true``: the end of stdin cancels the job like SIGTERM
    (or calls ``cancel``: a job on a server is cancelled there).

    Slicer's PythonSlicer launcher forwards stdin to the interpreter it starts but no signal, so
    a GUI client cancels by closing the worker's stdin; a client that dies closes it too.
    """
    try:  # the raw descriptor: a daemon thread blocked in sys.stdin's buffer aborts Python's exit
        while os.read(sys.stdin.fileno(), 4096):
            pass
    except (OSError, ValueError):
        pass
    if cancel is not None:
        cancel()
    else:
        _thread.interrupt_main(signal.SIGTERM)  # runs _on_sigterm in the main thread


def run_job(job: dict) -> dict:
    """Run one job dict (see module doc) and return the ``done`` fields.

    Raises:
        ArenaError: unknown command, or a missing or malformed field.
    """
    with ReadablePaths() as paths:
        try:
            return _run_job(job, paths)
        except ArenaError as err:
            raise ArenaError(paths.explain(str(err))) from None


def _run_job(job: dict, paths: ReadablePaths) -> dict:
    try:
        return _run(job, paths)
    except KeyError as err:
        raise ArenaError(f"job field {err} is missing: see the job format in "
                         "arenaseg/worker.py") from None
    except (TypeError, ValueError) as err:
        raise ArenaError(f"job field has a wrong value or name ({err}): see the job format in "
                         "arenaseg/worker.py") from None


def _run(fields: dict, paths: ReadablePaths) -> dict:
    from .pipeline import adapt, segment

    job = job_from_dict(fields)  # arenaseg.config: the fields, their defaults and checks
    arguments = job.arguments()
    for name in INPUT_FIELDS:
        if isinstance(arguments.get(name), str):
            arguments[name] = paths(arguments[name], f"job field {name}")

    def status(name, message, done=None, total=None):
        phase(name, paths.explain(message), done, total)

    if isinstance(job, AdaptJob):
        def progress(step, steps, loss, ranks):
            emit("progress", step=step, steps=steps, loss=round(loss, 5),
                 total_rank=sum(ranks.values()), ranks=ranks)

        return adapt(**arguments, progress=progress, status=status).to_dict()
    return segment(**arguments, status=status)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if len(argv) != 1:
            raise ArenaError("usage: python -m arenaseg.worker JOB.json")
        try:
            with open(argv[0]) as f:
                job = json.load(f)
        except (OSError, ValueError) as err:
            raise ArenaError(f"job file '{argv[0]}' cannot be read as JSON ({err})") from None
        # not a field of the engine's job but where it runs (job_from_dict refuses a non-dict)
        server = job.pop("server", None) if isinstance(job, dict) else None
        job_from_dict(job)  # every field's name and type, before any work
        if server:
            return _run_remote(dict(job, server=server))
        if job.get("stop_on_stdin_eof"):
            threading.Thread(target=_stop_at_stdin_eof, daemon=True).start()
        from .inference import pick_device

        emit("started", pid=os.getpid(), command=job.get("command"),
             device=str(pick_device(job.get("device", "auto"))))
        with interrupts_not_lost():
            result = run_job(job)
        emit("done", **result)
        return 0
    except Cancelled:
        emit("cancelled")
        return 143
    except ArenaError as err:
        emit("error", message=str(err))
        return 2
    except Exception as err:  # an engine bug: report it rather than die silently
        emit("error", message=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        return 1


def _run_remote(job: dict) -> int:
    """The job on its server (:mod:`arenaseg.remote_worker`): same events, same outputs."""
    from .remote_worker import RemoteJob

    remote = RemoteJob(job, emit)
    if job.get("stop_on_stdin_eof"):
        threading.Thread(target=_stop_at_stdin_eof, args=(remote.cancel,), daemon=True).start()
    with interrupts_not_lost():
        result = remote.run()
    emit("done", **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
