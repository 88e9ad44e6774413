"""Tried for issue 9: Fill between slices as a prior when fusing ARENA's final mask.

Between the first and last painted slice, ARENA's probability p is blended with the
interpolated mask f (ITK's morphological contour interpolation, ``fill_between_slices.py``):
``q = w·f + (1 − w)·p`` with ``w = 0.5^(d / h)``, d the distance (mm) to the nearest painted
slice and h a half-distance; or ``q = max(p, f)`` (the union). q then goes through the engine's
own post-processing (``arenaseg.inference.predict``: threshold, objects connected to the paint).
Dice on the unpainted slices, as in ``bench/REPORT.md``; ARENA with the engine defaults, seed 0.

    python bench/interpolation_prior.py --data ../shared/data --k 3 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

import arenaseg.inference as inference
from arenaseg.io.annotations import dice, find_annotation, paint_slices
from arenaseg.backbones import EMBEDDED_BACKBONE
from arenaseg.config import AdaptSettings
from arenaseg.io.geometry import array_ijk
from arenaseg.io.images import read_image
from arenaseg.io.labels import read_labels_on
from arenaseg.pipeline import fit

sys.path.insert(0, str(Path(__file__).parent))
from engine_benchmark import git_revision  # noqa: E402
from fill_between_slices import fill_between_slices  # noqa: E402

STRUCTURES = {"urinary_bladder": 21, "iliopsoas_left": 88, "inferior_vena_cava": 63, "portal_vein": 64}
HALF = (3, 6, 12, None)  # mm; None: f alone between the painted slices


def variants(p: np.ndarray, fill: np.ndarray, distance: np.ndarray, inside: np.ndarray) -> dict:
    out = {"ARENA alone": p}
    for h in HALF:
        w = np.where(inside, 1.0 if h is None else 0.5 ** (distance / (h or 1)), 0.0)[None, None, :]
        out["Fill between the painted slices" if h is None else f"blend, h = {h} mm"] = w * fill + (1 - w) * p
    out["union max(p, f)"] = np.maximum(p, np.where(inside[None, None, :], fill, 0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "INTERPOLATION_PRIOR.md"))
    parser.add_argument("--k", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--rewrite", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    if not args.rewrite:
        ct = read_image(Path(args.data) / "abdomen_ct/ct.nii.gz")
        labels = array_ijk(read_labels_on(ct, Path(args.data) / "abdomen_ct/labels.nii.gz", "labels"))
        spacing, cpu, own = ct.GetSpacing(), torch.device("cpu"), inference.input_probability
        rows = []
        for name, value in STRUCTURES.items():
            for k in args.k:
                painted = paint_slices(labels, value, k, axis=2)
                annotation = find_annotation(painted, value, axis=2)
                result = fit(ct, annotation, AdaptSettings(seed=0), EMBEDDED_BACKBONE)
                probability = own(result.tuning, result.spec, result.scan, cpu)
                ref, unpainted = labels == value, ~annotation.known
                slices = np.asarray(annotation.slices)
                z = np.arange(ref.shape[2])
                distance = np.min(np.abs(z[:, None] - slices[None, :]), axis=1) * spacing[2]
                inside = (z >= slices.min()) & (z <= slices.max())
                fill = fill_between_slices(painted == value, spacing).astype(np.float32)
                row = {"structure": name, "k": k, "Fill between slices": dice(fill > 0.5, ref, unpainted)}
                for label, q in variants(array_ijk(probability), fill, distance, inside).items():
                    image = sitk.GetImageFromArray(np.transpose(q, (2, 1, 0)).astype(np.float32))
                    image.CopyInformation(probability)
                    inference.input_probability = lambda *a, image=image, **kw: image
                    try:
                        objects = inference.predict(result.tuning, result.spec, result.scan, cpu, 1, annotation)
                    finally:
                        inference.input_probability = own
                    row[label] = dice(array_ijk(objects.image) > 0, ref, unpainted)
                print(json.dumps(row), flush=True)
                rows.append(row)
        out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out.with_suffix(".meta.json").write_text(json.dumps({
            "command": "python bench/interpolation_prior.py " + " ".join(sys.argv[1:]),
            "revision": git_revision()}))
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    columns = [c for c in rows[0] if c not in ("structure", "k")]
    lines = ["# Fill between slices as a prior in ARENA's final mask (tried, not adopted)", "",
             f"- Command: `{meta['command']}`; revision {meta['revision']}",
             "- " + __doc__.split("\n\n")[1].replace("\n", " "), "",
             "| structure | k | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for r in rows:
        best = max(r[c] for c in columns)
        lines.append(f"| {r['structure']} | {r['k']} | " + " | ".join(
            (f"**{r[c]:.3f}**" if r[c] == best else f"{r[c]:.3f}") for c in columns) + " |")
    gain = {c: np.mean([r[c] - r["ARENA alone"] for r in rows]) for c in columns if c != "ARENA alone"}
    lines += ["", "Mean change against ARENA alone: " + "; ".join(f"{c} {v:+.3f}" for c, v in gain.items()) + ".", "",
              "Reading: no blend helps every structure. The union gains where ARENA misses parts "
              "of a thin vessel that the interpolation covers (IVC at k = 5) and loses where the "
              "interpolation cuts corners (iliopsoas, portal vein); the distance blends stay "
              "within a few hundredths of ARENA alone. Not adopted: it would also make ITK (1.5 GB "
              "of wheels) an engine dependency for a gain that does not hold across structures.", ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
