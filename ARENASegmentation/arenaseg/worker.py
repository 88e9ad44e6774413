"""Background worker for GUI clients: ``python -m arenaseg.worker JOB.json``.

The job file is a JSON object: ``{"command": "adapt", "image": ..., "annotations": ...,
"label": ..., "out": ..., "adapter_out": ..., "structure": ..., "slice_axis": ...,
"warm_start": ..., "background_label": ..., "device": ..., "settings": {AdaptSettings fields}}`` or ``{"command":
"segment", "image": ..., "adapter": ..., "out": ..., "device": ...}``.

The worker prints one JSON object per line on stdout, flushed at once:
``{"event": "started", ...}``, ``{"event": "progress", "step", "steps", "loss", "total_rank",
"ranks"}``, then ``{"event": "done", ...}`` with output paths and the rank summary,
``{"event": "error", "message"}`` (exit 2) or ``{"event": "cancelled"}`` (exit 143 after
SIGTERM, within about a training step; outputs are written atomically at the very end, so a
cancelled job leaves none). CUDA (bf16 autocast) is used when present, else the CPU.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

from .errors import ArenaError
from .training import AdaptSettings, Cancelled


def emit(event: str, **fields) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _on_sigterm(signum, frame):
    raise Cancelled()


def run_job(job: dict) -> dict:
    """Run one job dict (see module doc) and return the ``done`` fields.

    Raises:
        ArenaError: unknown command, or a missing or malformed field.
    """
    try:
        return _run(job)
    except KeyError as err:
        raise ArenaError(f"job field {err} is missing: see 'python -m arenaseg.worker' docs") from None
    except (TypeError, ValueError) as err:
        raise ArenaError(f"job field has a wrong value or name ({err}): see the job format in "
                         "arenaseg/worker.py") from None


def _run(job: dict) -> dict:
    from .pipeline import adapt, segment

    command = job.get("command")
    if command == "adapt":
        settings = AdaptSettings(**job.get("settings", {}))

        def progress(step, loss, ranks):
            emit("progress", step=step, steps=settings.steps, loss=round(loss, 5),
                 total_rank=sum(ranks.values()), ranks=ranks)

        result = adapt(job["image"], job["annotations"], int(job["label"]), job["out"],
                       job.get("adapter_out"), settings=settings,
                       backbone=job.get("backbone", "arena-small-ct-unet"),
                       slice_axis=job.get("slice_axis"), structure=job.get("structure"),
                       device=job.get("device", "auto"), warm_start=job.get("warm_start"),
                       background_label=job.get("background_label"), weights=job.get("weights"),
                       progress=progress)
        return result.to_dict()
    if command == "segment":
        return segment(job["image"], job["adapter"], job["out"], device=job.get("device", "auto"),
                       weights=job.get("weights"))
    raise ArenaError(f"job command '{command}' is not 'adapt' or 'segment'")


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
        from .inference import pick_device

        emit("started", pid=os.getpid(), command=job.get("command"),
             device=str(pick_device(job.get("device", "auto"))))
        emit("done", **run_job(job))
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


if __name__ == "__main__":
    sys.exit(main())
