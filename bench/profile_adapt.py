"""Where the seconds of one ``arenaseg adapt`` go, on this machine: imports, reading,
preprocessing, the frozen backbone's reading pass, each training step (forward, backward,
optimizer, proximal step), sliding-window inference, resampling back and post-processing,
writing. Each configuration runs in its own process (glibc's allocator settings are per
process), on the urinary bladder of ``abdomen_ct`` with 3 painted axial slices, and the table
shows what each speed-up brings.

    python bench/profile_adapt.py --data ../shared/data --out bench/PROFILE.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from engine_benchmark import git_revision, machine  # noqa: E402

# name → (bf16 autocast on a CPU with native bf16, glibc keeps freed memory)
CONFIGS = {"float32, system allocator (before)": (False, False),
           "float32, freed memory kept": (False, True),
           "bf16 autocast, freed memory kept (default)": (True, True)}
STRUCTURE, VALUE, K = "urinary_bladder", 21, 3


def one_run(data: Path, bf16: bool, reuse: bool) -> dict:
    """One adapt in this process, timed by phase (status events) and by training part."""
    from arenaseg import precision

    if not bf16:
        precision.native_bf16 = lambda: False
    if not reuse:
        precision._REUSING = False  # as if already tried: glibc's defaults stay
    import SimpleITK as sitk

    from arenaseg.io.annotations import paint_slices
    from arenaseg.io.geometry import array_ijk, image_like
    from arenaseg.io.images import read_image
    from arenaseg.io.labels import read_labels_on
    from arenaseg.pipeline import adapt

    ct_path = data / "abdomen_ct/ct.nii.gz"
    ct = read_image(ct_path)
    ref = array_ijk(read_labels_on(ct, data / "abdomen_ct/labels.nii.gz", "labels"))
    marks: list[tuple[str, float]] = []

    def status(phase, message, done=None, total=None):
        name = "backbone reading pass" if "frozen backbone" in message else phase
        if done is None and (not marks or marks[-1][0] != name):
            marks.append((name, time.perf_counter()))
        if phase == "inference" and done is not None and done == total:
            marks.append(("resampling back, post-processing", time.perf_counter()))

    with tempfile.TemporaryDirectory() as tmp:
        ann = Path(tmp) / "painted.nii.gz"
        sitk.WriteImage(image_like(paint_slices(ref, VALUE, K, axis=2), ct), str(ann))
        start = time.perf_counter()
        result = adapt(str(ct_path), str(ann), VALUE, str(Path(tmp) / "out.nii.gz"),
                       str(Path(tmp) / "a.safetensors"), structure=STRUCTURE, device="cpu",
                       status=status)
        end = time.perf_counter()
    phases: dict[str, float] = {}
    for (name, t), (_, t_next) in zip(marks, marks[1:] + [("end", end)]):
        phases[name] = phases.get(name, 0.0) + t_next - t
    return {"phases": phases, "total": end - start, "steps": len(result.loss),
            "parts": result.training_parts}


def import_seconds() -> float:
    """Wall seconds of ``import arenaseg.cli, arenaseg.pipeline`` in a fresh interpreter, less
    the interpreter's own start."""
    def run(code):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return time.perf_counter() - t
    return min(run("import arenaseg.cli, arenaseg.pipeline") for _ in range(2)) - min(run("pass") for _ in range(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "PROFILE.md"))
    parser.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(Path(args.data), *map(bool, args.one))))
        return
    rows = {}
    for name, (bf16, reuse) in CONFIGS.items():
        out = subprocess.run([sys.executable, __file__, "--data", args.data, "--one", str(int(bf16)),
                              str(int(reuse))], capture_output=True, text=True, check=True).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
        rows[name]["load"] = os.getloadavg()[0]
    imports = import_seconds()
    Path(args.out).write_text(report(rows, imports, args))
    print(f"wrote {args.out}")


def report(rows: dict, imports: float, args) -> str:
    names = list(rows)
    phases = list(dict.fromkeys(p for r in rows.values() for p in r["phases"]))
    parts = list(dict.fromkeys(p for r in rows.values() for p in r["parts"] if not p.startswith("start")))
    head = "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    lines = [
        "# Where one adaptation's time goes (2-core CPU)", "",
        f"- Date: {time.strftime('%Y-%m-%d')}; git revision {git_revision()}",
        f"- Machine: {machine()}; 1-minute load average after each run "
        + ", ".join(f"{r['load']:.2f}" for r in rows.values()),
        "- Command: `python bench/profile_adapt.py " + " ".join(sys.argv[1:]) + "`",
        f"- Job: `arenaseg adapt` (the same function, `arenaseg.pipeline.adapt`, in a fresh process "
        f"per column) on `abdomen_ct`, {STRUCTURE}, k = {K} painted axial slices, default settings "
        f"({next(iter(rows.values()))['steps']} steps), CPU.",
        "- Columns: bf16 autocast (oneDNN's bf16 convolutions, used only on CPUs with native bf16 "
        "instructions: AVX512-BF16 or AMX) and glibc keeping freed memory (`mallopt`; without it "
        "each step maps and zeroes fresh pages for every activation, which showed as system time "
        "as large as the user time).", "",
        "## Seconds by phase", "", head.rstrip("\n"),
        f"| imports (`arenaseg.cli`, `arenaseg.pipeline`) | " + " | ".join(f"{imports:.1f}" for _ in names) + " |"]
    for p in phases:
        lines.append(f"| {p} | " + " | ".join(f"{rows[n]['phases'].get(p, 0):.1f}" for n in names) + " |")
    lines.append("| of which ARENA's SVD start (one more batch before step 1) | " + " | ".join(
        f"{rows[n]['parts'].get('start (method)', 0):.1f}" for n in names) + " |")
    lines.append("| **whole command (imports included)** | " + " | ".join(
        f"**{rows[n]['total'] + imports:.1f}**" for n in names) + " |")
    lines += ["", "## Training, milliseconds per step", "", head.rstrip("\n")]
    for p in parts:
        lines.append(f"| {p} | " + " | ".join(
            f"{1000 * rows[n]['parts'].get(p, 0) / max(rows[n]['steps'], 1):.0f}" for n in names) + " |")
    lines.append("| **one step** | " + " | ".join(
        f"**{1000 * sum(rows[n]['parts'].get(p, 0) for p in parts) / max(rows[n]['steps'], 1):.0f}**"
        for n in names) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
