"""Large-scan benchmark: peak memory (bytes per voxel) and the longest silence of ``arenaseg adapt``
and ``arenaseg segment`` on a CT the size of a thin-slice clinical scan.

The scan is ``abdomen_ct`` resampled (linear, SimpleITK) onto a 512 × 512 × 600 grid of
0.7 × 0.7 × 0.56 mm centred on it (air outside), int16 HU like a DICOM series: the size of a
thin-slice clinical CT. 3 axial liver slices are painted from its resampled reference labels. Each command runs as its own process: wall time, peak resident memory
(``os.wait4``) and the timestamps of every line it prints, from which the longest silent stretch
is taken. The report goes to a Markdown file with the machine and the load average.

    python bench/large_scan.py --data ../shared/data --out bench/LARGE_SCAN.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from arenaseg.io.annotations import paint_slices
from arenaseg.io.geometry import array_ijk, image_like

sys.path.insert(0, str(Path(__file__).parent))
from engine_benchmark import git_revision, machine  # noqa: E402

SIZE, SPACING = (512, 512, 600), (0.7, 0.7, 0.56)
LIVER = 5


def build(data: Path, folder: Path) -> tuple[Path, Path, int]:
    """Write the large CT (int16 HU) and its painted liver slices; return paths and voxel count."""
    ct = sitk.ReadImage(str(data / "abdomen_ct" / "ct.nii.gz"))
    labels = sitk.ReadImage(str(data / "abdomen_ct" / "labels.nii.gz"))
    grid = sitk.Image(SIZE, sitk.sitkInt16)
    grid.SetSpacing(SPACING)
    grid.SetDirection(ct.GetDirection())
    centre = np.array(ct.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ct.GetSize()]))
    half = np.array(ct.GetDirection()).reshape(3, 3) @ (np.array(SPACING) * (np.array(SIZE) - 1) / 2)
    grid.SetOrigin((centre - half).tolist())
    big = sitk.Resample(ct, grid, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    ref = sitk.Resample(labels, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    paint = paint_slices(array_ijk(ref), LIVER, 3, axis=2)
    del ref
    image, painted = folder / "ct.nii", folder / "painted.nii.gz"
    sitk.WriteImage(big, str(image))
    sitk.WriteImage(image_like(paint, big), str(painted))
    return image, painted, int(np.prod(SIZE))


def run(cmd: list[str]) -> dict:
    """Run ``cmd``; wall s, peak RSS MB, longest gap between printed lines (and to start/end)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
    stamps, lines = [0.0], []

    def read():  # a progress bar redraws with "\r": count those as lines too
        line = b""
        while byte := proc.stdout.read(1):
            if byte in b"\r\n":
                if line.strip():
                    stamps.append(time.perf_counter() - start)
                    lines.append(line.decode("utf-8", "replace").strip())
                line = b""
            else:
                line += byte

    reader = threading.Thread(target=read)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    reader.join()
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n" + "\n".join(lines))
    gaps = np.diff(stamps + [wall])
    return {"wall": wall, "peak_mb": usage.ru_maxrss / 1024, "silent_s": float(gaps.max()),
            "lines": lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--out", default="bench/LARGE_SCAN.md")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image, painted, voxels = build(Path(args.data), tmp)
        size = sitk.ReadImage(str(image)).GetSize()
        arenaseg = [sys.executable, "-m", "arenaseg"]
        adapt = run(arenaseg + ["adapt", "--image", str(image), "--annotations", str(painted),
                                "--label", str(LIVER), "--structure", "liver", "--steps", str(args.steps),
                                "--out", str(tmp / "seg.nii.gz"),
                                "--adapter-out", str(tmp / "liver.safetensors")])
        segment = run(arenaseg + ["segment", "--image", str(image), "--adapter",
                                  str(tmp / "liver.safetensors"), "--out", str(tmp / "seg2.nii.gz")])
    load = os.getloadavg()
    rows = [f"| {name} | {r['wall']:.1f} | {r['peak_mb']:.0f} | {r['peak_mb'] * 2**20 / voxels:.1f} "
            f"| {r['silent_s']:.1f} |" for name, r in (("adapt", adapt), ("segment", segment))]
    text = "\n".join([
        "# Large-scan benchmark: memory and silence on a thin-slice CT", "",
        f"- Date: {datetime.date.today()}; git revision {git_revision()}",
        f"- Machine: {machine()}; load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        f"- Command: `python bench/large_scan.py {' '.join(sys.argv[1:])}`",
        f"- Scan: `abdomen_ct` resampled to {SPACING} mm, int16 HU: {size[0]}×{size[1]}×{size[2]} "
        f"= {voxels / 1e6:.0f} M voxels; 3 painted axial liver slices; {args.steps} steps.",
        "- Each command is its own process; peak = peak resident memory (`os.wait4`); longest "
        "silence = longest time without a printed line (phase lines, progress bar updates).", "",
        "| command | wall s | peak MB | bytes per voxel | longest silence s |",
        "|---|---|---|---|---|", *rows, "",
        "Target (issue 11): peak ≤ 2.5 GB (2560 MB) on such a scan; every phase reports.", "",
        "## What `adapt` printed", "", "```", *adapt["lines"][-25:], "```", ""])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
