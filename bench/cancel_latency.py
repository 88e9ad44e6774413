"""Cancel latency: how long the background worker takes to stop after SIGTERM (Cancel in Slicer).

The worker (``python -m arenaseg.worker job.json``, as the Slicer module starts it) adapts the
embedded backbone to three painted liver slices of the real abdomen CT with the engine defaults.
After its first progress event the benchmark sends SIGTERM and measures the seconds until the
process has exited; it repeats this ``--repeats`` times and checks that nothing was written. The
Slicer module adds its polling interval (0.1–0.5 s) on top. Target: under 2 s.

    python bench/cancel_latency.py --data ../shared/data --out bench/CANCEL.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from arenaseg.io.annotations import paint_slices
from arenaseg.config import AdaptJob, AdaptSettings
from arenaseg.io.geometry import array_ijk, image_like
from arenaseg.io.images import read_image
from arenaseg.io.labels import read_labels_on

sys.path.insert(0, str(Path(__file__).parent))
from engine_benchmark import git_revision, machine  # noqa: E402

LIVER = 5
TARGET_S = 2.0


def cancel_once(job: Path) -> float:
    """Start the worker on ``job``, SIGTERM it after its first progress event; seconds to exit."""
    proc = subprocess.Popen([sys.executable, "-m", "arenaseg.worker", str(job)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if json.loads(line)["event"] == "progress":
            break
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    elapsed = time.perf_counter() - sent
    last = [json.loads(line) for line in proc.stdout.read().splitlines()][-1]
    if proc.returncode != 128 + signal.SIGTERM or last["event"] != "cancelled":
        raise RuntimeError(f"worker did not cancel: exit {proc.returncode}, last event {last}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get(
        "ARENASEG_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    parser.add_argument("--out", default=str(Path(__file__).parent / "CANCEL.md"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    data = Path(args.data)
    ct_path = data / "abdomen_ct" / "ct.nii.gz"
    ct = read_image(ct_path)
    ref = array_ijk(read_labels_on(ct, data / "abdomen_ct" / "labels.nii.gz", "labels"))
    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sitk.WriteImage(image_like(paint_slices(ref, LIVER, 3, axis=2), ct), str(tmp / "painted.nii.gz"))
        job = tmp / "job.json"
        job.write_text(AdaptJob(image=str(ct_path), annotations=str(tmp / "painted.nii.gz"),
                                label=LIVER, out=str(tmp / "seg.nii.gz"), structure="liver",
                                adapter_out=str(tmp / "liver.safetensors"), device="cpu",
                                settings=AdaptSettings(steps=1000)).to_json())
        for _ in range(args.repeats):
            seconds.append(cancel_once(job))
            left = sorted(p.name for p in tmp.iterdir())
            if left != ["job.json", "painted.nii.gz"]:
                raise RuntimeError(f"a cancelled worker left files behind: {left}")
    worst = max(seconds)
    report = [
        "# Cancel latency of the background worker", "",
        f"- Date: {datetime.date.today()}; git revision {git_revision()}",
        f"- Machine: {machine()}; 1-minute load average {os.getloadavg()[0]:.1f} at the end",
        f"- Command: `python bench/cancel_latency.py --data {args.data} --out {args.out}`",
        "- Job: adapt the embedded backbone to 3 painted liver slices of `abdomen_ct` (engine "
        "defaults), SIGTERM after the first progress event; nothing was left on disk after any run.", "",
        "| run | seconds from SIGTERM to exit |", "|---|---|",
        *[f"| {i} | {s:.2f} |" for i, s in enumerate(seconds, 1)], "",
        f"- Mean {np.mean(seconds):.2f} s, worst {worst:.2f} s: "
        f"{'MET' if worst < TARGET_S else 'NOT MET'} (target < {TARGET_S:.0f} s).", ""]
    Path(args.out).write_text("\n".join(report))
    print("\n".join(report))


if __name__ == "__main__":
    main()
