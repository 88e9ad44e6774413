"""Engine benchmark: few-slice adaptation on the real abdomen CT, ARENA vs fixed-rank LoRA.

It runs on the default backbone (``--backbone`` for another): ``bench/REPORT.md`` is the
Merlin-derived encoder, which never saw the shared scans; ``bench/REPORT_SMALL_UNET.md`` is the
small U-Net, pretrained on both (``--backbone arena-small-ct-unet --out
bench/REPORT_SMALL_UNET.md``), and its figures stand in the default's report as the old default.

For each structure, k = 3 axial slices are painted from the reference labels; ``arenaseg adapt``
runs as its own process (as a user would run it) and the benchmark records Dice on the unpainted
slices, the discovered ranks, the process's wall time and peak resident memory. Every Dice stands
next to Slicer's *Fill between slices* (ITK morphological contour interpolation) from the same
painted slices; for the new structures ARENA also runs at k = 1, 2, 5 and 8 (``--k-sweep``). It
also records the zero-shot Dice of the base organs, for a backbone pretrained on them. Results go to
a Markdown report with the machine, its load average, the command and the git revision.

    python bench/engine_benchmark.py --data ../shared/data --out bench/REPORT.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from arenaseg.adapter_file import read_adapter
from arenaseg.config import DEFAULT_METHOD
from arenaseg.io.annotations import dice, find_annotation, paint_slices
from arenaseg.backbones import DEFAULT_BACKBONE, EMBEDDED_BACKBONE, get_spec, load_backbone
from arenaseg.io.geometry import array_ijk, image_like
from arenaseg.io.images import read_image
from arenaseg.io.labels import read_labels_on
from arenaseg.inference import sliding_window_logits
from arenaseg.preprocessing import to_canonical, to_input_grid
from arenaseg.training import AdaptSettings

sys.path.insert(0, str(Path(__file__).parent))
from fill_between_slices import fill_between_slices  # noqa: E402

#: The report the rank and speed work (issue 10) must not lose Dice against: its figures before
#: that work (bladder 0.847, iliopsoas 0.801, IVC 0.729 at k = 3).
BASELINE = "3818537"
STRUCTURES = [  # (name, TotalSegmentator label value, pretrained base organ?)
    ("liver", 5, True), ("spleen", 1, True), ("aorta", 52, True),
    ("urinary_bladder", 21, False), ("iliopsoas_left", 88, False), ("inferior_vena_cava", 63, False),
]
#: Structures no backbone here was pretrained on (the others are the small U-Net's base organs).
NEW = {name for name, _, base in STRUCTURES if not base}
ZERO_SHOT_SCANS = [("abdomen_ct", "abdomen_ct/ct.nii.gz", "abdomen_ct/labels.nii.gz"),
                   ("abdomen_ct_dicom", "abdomen_ct_dicom/dicom", "abdomen_ct_dicom/labels.nii.gz")]
#: Per backbone: seconds and MB one adapt may take, and the issue that set them.
BUDGETS = {EMBEDDED_BACKBONE: (30, 1536, "issue 10"), "merlin-resnet152": (60, 4096, "issue 19")}
OLD_DEFAULT = Path(__file__).parent / "REPORT_SMALL_UNET.json"
BASE_VALUES = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5,
               "stomach": 6, "pancreas": 7, "duodenum": 19, "aorta": 52}


# The peak is read by a small launcher: Linux starts a child's maxrss at its parent's resident
# size at fork, and a benchmark holding a backbone would otherwise report its own memory.
PEAK_LAUNCHER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:]); "
                 "_, s, u = os.wait4(p.pid, 0); print(f'PEAK_KB {u.ru_maxrss}', file=sys.stderr); "
                 "sys.exit(os.waitstatus_to_exitcode(s))")


def run_adapt(cmd: list[str]) -> tuple[float, float, str]:
    """Run one command; return wall seconds, its peak RSS in MB (``os.wait4`` in a launcher) and
    its output."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_LAUNCHER, *cmd], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    output, _, peak = proc.stdout.rpartition("PEAK_KB ")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output}")
    return wall, int(peak) / 1024, output


def zero_shot(data: Path, backbone: str) -> dict:
    """Dice of the backbone's own output classes (argmax, no adaptation) per scan and organ
    (empty for a backbone without pretrained classes)."""
    if not get_spec(backbone).classes:
        return {}
    model, spec = load_backbone(backbone)
    results = {}
    for scan, image_path, labels_path in ZERO_SHOT_SCANS:
        ct = read_image(data / image_path)
        ref = array_ijk(read_labels_on(ct, data / labels_path, "labels"))
        x, affine = to_canonical(ct, spec.preprocessing)
        pred = sliding_window_logits(model, x, spec.preprocessing.roi_size, torch.device("cpu")).argmax(0)
        pred = array_ijk(to_input_grid(pred.numpy(), affine, ct, linear=False))
        results[scan] = {organ: dice(pred == spec.classes.index(organ), ref == value)
                         for organ, value in BASE_VALUES.items() if (ref == value).any()}
    return results


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}; Python {platform.python_version()}, torch {torch.__version__}")


def kept_rows(jsonl: Path) -> tuple[list[dict], Callable[[dict], None]]:
    """The rows a benchmark kept in ``jsonl`` (a JSON object a line, reused by its later runs),
    and ``record(row)``, which adds the git revision that measured ``row``, appends it to the
    list and the file, and prints it."""
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []

    def record(row: dict) -> None:
        row["revision"] = git_revision()
        rows.append(row)
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    return rows, record


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "REPORT.md"))
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help="registry id of the backbone")
    parser.add_argument("--methods", nargs="+", default=[DEFAULT_METHOD, "lora", "linear-probe"])
    parser.add_argument("--structures", nargs="+", default=[s[0] for s in STRUCTURES])
    parser.add_argument("--k", type=int, default=3, help="painted axial slices")
    parser.add_argument("--k-sweep", type=int, nargs="*", default=[1, 2, 5, 8],
                        help="further k for ARENA on the new structures (none: --k-sweep)")
    parser.add_argument("--extra", default="", help="extra arguments for arenaseg adapt")
    parser.add_argument("--baseline", default=BASELINE,
                        help="git revision whose bench/REPORT.json the Dice is compared with")
    parser.add_argument("--rewrite", action="store_true",
                        help="rewrite the Markdown report from the JSON results of an earlier run")
    args = parser.parse_args()
    if args.rewrite:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        args.backbone = saved.get("backbone", EMBEDDED_BACKBONE)
        Path(args.out).write_text(report(saved["rows"], saved["zero_shot"], saved["command"], args,
                                         saved["revision"], saved["machine"], saved.get("sweep", []),
                                         saved.get("load"), saved.get("previous", {})))
        return
    previous = {}  # the baseline report's results, to show what changed
    baseline = subprocess.run(["git", "show", f"{args.baseline}:bench/REPORT.json"], text=True,
                              capture_output=True, cwd=Path(__file__).parent)
    if baseline.returncode == 0 and args.backbone == EMBEDDED_BACKBONE:
        saved = json.loads(baseline.stdout)
        previous = {"revision": saved["revision"],
                    "dice": {f"{r['structure']}/{r['method']}": r["dice"] for r in saved["rows"]}}
    data = Path(args.data)
    ct_path, labels_path = data / "abdomen_ct/ct.nii.gz", data / "abdomen_ct/labels.nii.gz"
    ct = read_image(ct_path)
    ref = array_ijk(read_labels_on(ct, labels_path, "labels"))
    exe = shutil.which("arenaseg") or sys.executable
    base_cmd = [exe] if exe.endswith("arenaseg") else [exe, "-m", "arenaseg"]
    rows, sweep, loads = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def run(name, value, base, k, method):
            painted = paint_slices(ref, value, k, axis=2)
            ann = tmp / f"{name}_{k}_painted.nii.gz"
            sitk.WriteImage(image_like(painted, ct), str(ann))
            unpainted = ~find_annotation(painted, value, axis=2).known
            seg, adapter = tmp / f"{name}_{method}.nii.gz", tmp / f"{name}_{method}.safetensors"
            cmd = base_cmd + ["adapt", "--image", str(ct_path), "--annotations", str(ann),
                              "--label", str(value), "--out", str(seg), "--adapter-out",
                              str(adapter), "--method", method, "--structure", name,
                              "--device", "cpu", "--backbone", args.backbone] + args.extra.split()
            wall, peak_mb, _ = run_adapt(cmd)
            loads.append(os.getloadavg()[0])
            pred = array_ijk(sitk.ReadImage(str(seg))) == value
            _, meta = read_adapter(adapter)
            fill = fill_between_slices(painted == value, ct.GetSpacing())
            row = {"structure": name, "label": value, "base": base, "method": method, "k": k,
                   "dice": dice(pred, ref == value, unpainted),
                   "fill_dice": dice(fill, ref == value, unpainted), "wall_s": wall,
                   "peak_mb": peak_mb, "ranks": meta["ranks"],
                   "initial_rank": sum(meta["initial_ranks"].values()),
                   "painted_slices": list(find_annotation(painted, value, axis=2).slices)}
            print(json.dumps({key: v for key, v in row.items() if key != "ranks"}), flush=True)
            return row

        for name, value, base in STRUCTURES:
            if name in args.structures:
                rows += [run(name, value, base, args.k, method) for method in args.methods]
        for name, value, base in STRUCTURES:
            if name in args.structures and not base:
                sweep += [run(name, value, base, k, "arena") for k in args.k_sweep]
    zs = zero_shot(data, args.backbone)
    command = "python bench/engine_benchmark.py " + " ".join(sys.argv[1:])
    revision, host = git_revision(), machine()
    load = [min(loads), max(loads)] if loads else None
    Path(args.out).write_text(report(rows, zs, command, args, revision, host, sweep, load, previous))
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"command": command, "backbone": args.backbone, "revision": revision, "machine": host, "rows": rows, "zero_shot": zs,
         "sweep": sweep, "load": load, "previous": previous}, indent=1))
    print(f"wrote {args.out}")


def report(rows: list[dict], zs: dict, command: str, args, revision: str, host: str,
           sweep: list[dict] = (), load: list[float] | None = None, previous: dict | None = None) -> str:
    s = AdaptSettings()
    spec = get_spec(args.backbone)
    saw = args.backbone == EMBEDDED_BACKBONE  # pretrained on both shared scans and their organs
    methods = [m for m in args.methods if any(r["method"] == m for r in rows)]
    by = {(r["structure"], r["method"]): r for r in rows}
    names = [n for n, _, _ in STRUCTURES if any(r["structure"] == n for r in rows)]
    base = {n for n, _, b in STRUCTURES if b} if saw else set()
    old = {}  # the old default (the small U-Net, which saw this scan): ARENA's Dice at the same k
    if not saw and OLD_DEFAULT.exists():
        old = {r["structure"]: r["dice"] for r in json.loads(OLD_DEFAULT.read_text())["rows"]
               if r["method"] == "arena" and r["k"] == args.k}
    probe = {}  # the frozen-feature linear probe, bench/MERLIN.md (same painted slices)
    merlin = Path(__file__).parent / "MERLIN.jsonl"
    if args.backbone == "merlin-resnet152" and merlin.exists():
        for line in merlin.read_text().splitlines():
            r = json.loads(line)
            if r["kind"] == "dice" and r["scan"] == "abdomen_ct" and r["k"] == args.k:
                probe[r["structure"]] = r["probe"]
    adapted = next((len(r["ranks"]) for r in rows if r["method"] == "arena"), 0)
    if saw:
        provenance = ("- **The backbone saw this scan in pretraining** (it was pretrained on both shared "
                      "scans, with the base-organ labels: liver, spleen and aorta among them). Every figure "
                      "here is on a training scan of the backbone: base-organ numbers are a sanity check; "
                      "the new structures (bladder, iliopsoas, IVC), whose labels it never saw, are the "
                      "closer test, but still not a result on an unseen patient.")
    else:
        provenance = (f"- Backbone `{args.backbone}` ({spec.architecture}). **Its encoder never saw this "
                      "scan nor any organ label**: Merlin was pretrained on about 15,000 Stanford abdominal "
                      "CT exams with their reports, the shared scans are TotalSegmentator cases. The "
                      "decoder is trained per task from the painted slices only, so every figure here "
                      "is on a patient the backbone never saw.")
    lines = ["# Engine benchmark: few-slice adaptation on `abdomen_ct`", "",
             f"- Date: {datetime.date.today()}; git revision {revision}",
             f"- Machine: {host}; CPU only; 1-minute load average after each run "
             + (f"{load[0]:.2f}–{load[1]:.2f}" if load else "not recorded"),
             f"- Command: `{command}`",
             f"- Protocol: k = {args.k} painted axial slices per structure (spread evenly inside the "
             "structure), taken from the TotalSegmentator reference labels of "
             "`abdomen_ct` (122×101×112 voxels, 3 mm); Dice on all unpainted slices. Each run is "
             "one `arenaseg adapt` process (wall time and peak resident memory of that process, "
             "imports and inference included).",
             f"- Settings (defaults): r0 = {s.rank} on {adapted} convolutions, λ = {s.lam}, η = {s.learning_rate}, "
             f"ρ = {s.rho}, {s.steps} steps × {s.crops_per_step} crops of "
             f"{'×'.join(map(str, spec.preprocessing.roi_size))} canonical voxels; "
             "LoRA (PEFT, scaling 1): same layers, r0, steps and crops; `linear-probe`: no adapter, "
             "only the head (and the decoder, where the backbone trains one). Extra arguments: "
             f"`{args.extra or 'none'}`.",
             provenance,
             "- *Fill between slices*: Slicer's Segment Editor effect (ITK morphological contour "
             "interpolation, `itk-morphologicalcontourinterpolation`, default settings) on the "
             "same painted slices, Dice on the same unpainted slices.", "",
             "## Dice on unpainted slices", "",
             "| structure | structure in pretraining | backbone saw this scan | Fill between slices | "
             + ("frozen-feature linear probe | " if probe else "")
             + " | ".join(f"{m} Dice | {m} rank | {m} wall s | {m} peak MB" for m in methods)
             + (" | old default (small U-Net, saw this scan): ARENA Dice" if old else "") + " |",
             "|---|---|---|---|" + ("---|" if probe else "") + "---|---|---|---|" * len(methods)
             + ("---|" if old else "")]
    for n in names:
        cells = []
        for m in methods:
            r = by.get((n, m))
            cells += ([f"{r['dice']:.3f}", f"{sum(r['ranks'].values())}/{r['initial_rank']}",
                       f"{r['wall_s']:.1f}", f"{r['peak_mb']:.0f}"] if r else ["—"] * 4)
        fill = next((f"{by[(n, m)]['fill_dice']:.3f}" for m in methods if (n, m) in by), "—")
        extra = [f"{probe[n]:.3f}" if n in probe else "—"] if probe else []
        tail = [f"{old[n]:.3f}" if n in old else "—"] if old else []
        lines.append(f"| {n} | {'yes' if n in base else 'no'} | {'yes' if saw else 'no'} | {fill} | "
                     + " | ".join(extra + cells + tail) + " |")
    means = {}
    for m in methods:
        for group, members in (("all six", names), ("new", [n for n in names if n in NEW]),
                               ("base", [n for n in names if n not in NEW])):
            vals = [by[(n, m)]["dice"] for n in members if (n, m) in by]
            means[(m, group)] = float(np.mean(vals)) if vals else float("nan")
    lines += ["", "| mean Dice | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for group in ("all six", "new", "base"):
        lines.append(f"| {group} | " + " | ".join(f"{means[(m, group)]:.3f}" for m in methods) + " |")
    walls = [r["wall_s"] for r in rows]
    peaks = [r["peak_mb"] for r in rows]
    lines += ["", "## Targets (2-core CPU)", ""]

    def target(ok, text):
        lines.append(f"- {'MET' if ok else 'NOT MET'}: {text}")
    seconds, mb, issue = BUDGETS.get(args.backbone, (float("inf"), float("inf"), "none"))
    lines.append(f"Budgets for `{args.backbone}` ({issue}).")
    lines.append("")
    for n in ("liver", "urinary_bladder"):
        if (n, "arena") in by:
            target(by[(n, "arena")]["wall_s"] <= seconds, f"{n}: one ARENA adapt (imports, training, "
                   f"segmentation of the whole scan, writing) ≤ {seconds} s: {by[(n, 'arena')]['wall_s']:.1f} s")
    target(max(walls) <= seconds, f"every adapt ≤ {seconds} s: max {max(walls):.1f} s, median {np.median(walls):.1f} s")
    target(max(peaks) <= mb, f"peak memory ≤ {mb / 1024:.1f} GB: max {max(peaks):.0f} MB")
    losses = {n: previous["dice"][f"{n}/arena"] - by[(n, "arena")]["dice"] for n in names
              if previous and f"{n}/arena" in previous["dice"] and (n, "arena") in by}
    if not previous and saw:
        lines.append(f"- NOT CHECKED: Dice against the report before the rank and speed work (revision "
                     f"{BASELINE}): its bench/REPORT.json is not in this checkout's history")
    if losses:
        worst = max(losses, key=losses.get)
        target(losses[worst] <= 0.02, f"no structure's ARENA Dice more than 0.02 below the report "
               f"before the rank and speed work (revision {previous['revision']}): largest loss {losses[worst]:+.3f} ({worst}); "
               + ", ".join(f"{n} {previous['dice'][f'{n}/arena']:.3f} → {by[(n, 'arena')]['dice']:.3f}"
                           for n in losses))
    if "arena" in methods:
        target(means[("arena", "all six")] >= 0.75, f"ARENA mean Dice over the six ≥ 0.75: "
               f"{means[('arena', 'all six')]:.3f}")
        target(means[("arena", "new")] >= 0.70, f"ARENA mean Dice over the three new structures ≥ 0.70: "
               f"{means[('arena', 'new')]:.3f}")
    if {"arena", "lora"} <= set(methods):
        for group in ("all six", "new"):
            target(means[("arena", group)] >= means[("lora", group)],
                   f"ARENA ≥ LoRA on the {group} mean: {means[('arena', group)]:.3f} vs "
                   f"{means[('lora', group)]:.3f}")
    arena = {(r["structure"], r["k"]): r for r in [*rows, *sweep] if r["method"] == "arena"}
    if sweep:
        ks = sorted({k for _, k in arena})
        lines += ["", "## ARENA against Fill between slices, k painted slices (new structures)", "",
                  "Same painted slices for both; Dice on the unpainted slices; "
                  + ("the backbone saw this scan in pretraining, not these structures." if saw
                     else "the backbone never saw this scan."), "",
                  "| structure | " + " | ".join(f"k = {k}: ARENA / Fill" for k in ks) + " |",
                  "|---|" + "---|" * len(ks)]
        for n in names:
            if n not in NEW:
                continue
            lines.append(f"| {n} | " + " | ".join(
                f"{arena[(n, k)]['dice']:.3f} / {arena[(n, k)]['fill_dice']:.3f}"
                if (n, k) in arena else "—" for k in ks) + " |")
        wins = [(n, k) for (n, k), r in arena.items() if n in NEW and r["dice"] > r["fill_dice"]]
        lines += ["", f"ARENA is above Fill between slices in {len(wins)} of "
                  f"{sum(1 for n, _ in arena if n in NEW)} (structure, k) pairs. "
                  "Interpolation cannot reach beyond the first and last painted slice and gives "
                  "nothing from a single slice."]
    if zs:
        lines += ["", "## Zero-shot Dice of the base organs (backbone alone, argmax)", "",
                  "| scan | " + " | ".join(BASE_VALUES) + " |", "|---|" + "---|" * len(BASE_VALUES)]
        for scan, d in zs.items():
            lines.append(f"| {scan} | " + " | ".join(f"{d[o]:.3f}" if o in d else "—"
                                                     for o in BASE_VALUES) + " |")
        lines += ["", "Both scans are the backbone's training scans: this checks that it learnt its "
                  "classes, it is not a generalisation estimate."]
    lines += ["", "## ARENA's discovered rank per layer", ""]
    arena_rows = [r for r in rows if r["method"] == "arena"]
    if arena_rows:
        layers = list(arena_rows[0]["ranks"])
        lines += ["| layer | " + " | ".join(r["structure"] for r in arena_rows) + " |",
                  "|---|" + "---|" * len(arena_rows)]
        for layer in layers:
            lines.append(f"| `{layer.replace('features.model.', '')}` | " +
                         " | ".join(str(r["ranks"][layer]) for r in arena_rows) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
