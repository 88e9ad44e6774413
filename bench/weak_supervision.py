"""Tried for issue 9: interpolated slices as weak supervision during adaptation.

Between the painted slices, shape-based interpolation (``arenaseg.io.annotations.interpolate``:
the signed distances to the two nearest painted outlines, blended linearly) gives pseudo-labels;
a binary cross-entropy on them, weighted ``0.5^(d / h)`` with d the distance (mm) to the nearest
painted slice, is added to the loss (``AdaptSettings(interpolate_mm=h)``; h = 0: painted slices
only, the default). Also reported: the interpolation's own Dice on the unpainted slices between
the painted ones (how good the pseudo-labels are) and Fill between slices (ITK) on all unpainted
slices. ARENA with the engine defaults otherwise, seed 0, embedded backbone (it saw this scan);
Dice on the unpainted slices, as in ``bench/REPORT.md``.

    python bench/weak_supervision.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from arenaseg.io.annotations import dice, find_annotation, interpolate, paint_slices
from arenaseg.backbones import load_backbone
from arenaseg.config import AdaptSettings
from arenaseg.io.geometry import array_ijk
from arenaseg.io.images import read_image
from arenaseg.io.labels import read_labels_on
from arenaseg.inference import predict
from arenaseg.pipeline import Scan, fit
from arenaseg.backbones import EMBEDDED_BACKBONE

sys.path.insert(0, str(Path(__file__).parent))
from engine_benchmark import git_revision, machine  # noqa: E402
from fill_between_slices import fill_between_slices  # noqa: E402

STRUCTURES = {"urinary_bladder": 21, "iliopsoas_left": 88, "inferior_vena_cava": 63, "portal_vein": 64}
HALF_LIVES = (0.0, 2.0, 6.0)  # mm; 0: no pseudo-labels


def interpolation_dice(annotation, spacing, ref: np.ndarray) -> float:
    """Dice of the interpolated structure on the unpainted slices between the painted ones."""
    points, targets, _ = interpolate(annotation, spacing, 1.0, max_points=10**9)
    seg = np.zeros(ref.shape, bool)
    seg[tuple(points[targets > 0.5].T)] = True
    between = np.zeros(ref.shape, bool)
    index = [slice(None)] * 3
    index[annotation.axis] = slice(min(annotation.slices), max(annotation.slices) + 1)
    between[tuple(index)] = True
    return dice(seg, ref, between & ~annotation.known)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "WEAK_SUPERVISION.md"))
    parser.add_argument("--k", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rewrite", action="store_true", help="only rewrite the report from the JSON")
    args = parser.parse_args()
    out = Path(args.out)
    if args.rewrite:
        saved = json.loads(out.with_suffix(".json").read_text())
        out.write_text(report(saved["meta"], saved["rows"]))
        return
    torch.set_num_threads(args.threads)
    ct = read_image(Path(args.data) / "abdomen_ct/ct.nii.gz")
    ref = array_ijk(read_labels_on(ct, Path(args.data) / "abdomen_ct/labels.nii.gz", "labels"))
    scan = Scan.from_image(ct, load_backbone(EMBEDDED_BACKBONE)[1])
    rows, started = [], time.perf_counter()
    for name, value in STRUCTURES.items():
        for k in args.k:
            painted = paint_slices(ref, value, k, axis=2)
            annotation = find_annotation(painted, value, axis=2)
            unpainted = ~annotation.known
            row = {"structure": name, "k": k,
                   "fill": dice(fill_between_slices(painted == value, ct.GetSpacing()), ref == value, unpainted),
                   "interpolation_between": interpolation_dice(annotation, ct.GetSpacing(), ref == value),
                   "arena": {}}
            between = np.zeros(ref.shape, bool)
            between[:, :, min(annotation.slices):max(annotation.slices) + 1] = True
            for h in HALF_LIVES:
                result = fit(scan, annotation, AdaptSettings(seed=0, interpolate_mm=h), EMBEDDED_BACKBONE)
                seg = array_ijk(predict(result.tuning, result.spec, scan, torch.device("cpu"), value,
                                        annotation).image) == value
                row["arena"][str(h)] = dice(seg, ref == value, unpainted)
                if not h:  # where the default loses: between the painted slices, or beyond them
                    row["between"] = dice(seg, ref == value, between & unpainted)
                    row["beyond_voxels"] = [int(seg[~between].sum()), int((ref[~between] == value).sum())]
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {"command": "python bench/weak_supervision.py " + " ".join(sys.argv[1:]),
            "revision": git_revision(), "machine": machine(), "threads": args.threads,
            "seconds": round(time.perf_counter() - started)}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.write_text(report(meta, rows))
    print(f"wrote {out}")


def report(meta: dict, rows: list[dict]) -> str:
    heads = [f"ARENA, h = {h:g} mm" if h else "ARENA (painted slices only)" for h in HALF_LIVES]
    lines = ["# Interpolated slices as weak supervision (issue 9): tried, not adopted", "",
             f"- Command: `{meta['command']}` ({meta['seconds']} s, {meta['threads']} thread)",
             f"- Revision: {meta['revision']}", f"- Machine: {meta['machine']}",
             "- `abdomen_ct`, which the embedded backbone saw in pretraining; the structures are "
             "not pretraining classes. k axial slices spread evenly inside the structure; Dice on "
             "the unpainted slices. Pseudo-labels: shape-based interpolation between the painted "
             "slices, weight 0.5^(d / h), d = distance to the nearest painted slice (mm); the "
             "slices are 3 mm apart.", "",
             "| structure | k | interpolation, between the painted slices | Fill between slices | "
             + " | ".join(heads) + " |", "|---|---|---|---|" + "---|" * len(heads)]
    for r in rows:
        lines.append(f"| {r['structure']} | {r['k']} | {r['interpolation_between']:.3f} | {r['fill']:.3f} | "
                     + " | ".join(f"{r['arena'][str(h)]:.3f}" for h in HALF_LIVES) + " |")
    means = {h: np.mean([r["arena"][str(h)] for r in rows]) for h in HALF_LIVES}
    lines += ["", "Mean ARENA Dice: " + ", ".join(f"{heads[i]} {means[h]:.3f}" for i, h in enumerate(HALF_LIVES)),
              "", "## Where ARENA (painted slices only) loses", "",
              "Dice between the first and last painted slice (unpainted slices), and voxels beyond "
              "them (predicted / reference; Fill between slices predicts none there):", "",
              "| structure | k | interpolation, between | ARENA, between | ARENA beyond the ends: "
              "predicted / reference voxels |", "|---|---|---|---|---|"]
    lines += [f"| {r['structure']} | {r['k']} | {r['interpolation_between']:.3f} | {r['between']:.3f} | "
              f"{r['beyond_voxels'][0]} / {r['beyond_voxels'][1]} |" for r in rows]
    lines += ["", "## Reading", "",
              "- Between the painted slices, ARENA alone beats this interpolation where the "
              "structure moves across slices (the iliopsoas, the portal vein), is level with it on "
              "the bladder and below it on the IVC.",
              "- Beyond the outermost painted slices, where Fill between slices predicts nothing, "
              "ARENA predicts several times the reference volume of the bladder and the portal "
              "vein, and a fraction of the IVC's. This is where it loses to Fill between slices "
              "on the bladder at k = 5, and why more slices lower its bladder Dice: the excess "
              "beyond the ends stays while the reference there shrinks.",
              "- The pseudo-labels act only between the painted slices. They help where "
              "interpolation is better than ARENA there and hurt elsewhere; on average they lower "
              "the Dice (mean row).",
              "- Not adopted: the engine default stays `interpolate_mm = 0` (painted slices only); "
              "the setting remains in the Python API (`AdaptSettings(interpolate_mm=…)`) for this "
              "benchmark.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
