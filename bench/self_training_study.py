"""Self-training on ``merlin-resnet152`` (``--self-training``, ``arenaseg/self_training.py``):
where it helps and where it hurts, against ARENA on the paint alone (the default), Fill between
slices and the frozen-feature linear probe.

For each structure and k painted axial slices (``paint_slices``), Dice on the unpainted slices
after the engine's own post-processing, seed 0: ARENA with 0 (the default), 1 and 2 rounds of
self-training (each round: half the steps again, on the paint and on the structure found so far
with as much confident background near it). Rows are kept in ``SELF_TRAINING.jsonl`` with the
revision they were measured at, and only the missing cells run (1 round: only where listed).

    python bench/self_training_study.py --data ../shared/data --out bench/SELF_TRAINING.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from arenaseg.backbones import EMBEDDED_BACKBONE, load_backbone
from arenaseg.config import AdaptSettings
from arenaseg.io.annotations import dice, find_annotation, paint_slices
from arenaseg.io.geometry import array_ijk
from arenaseg.io.images import read_image
from arenaseg.io.labels import read_labels_on
from arenaseg.inference import predict
from arenaseg.pipeline import fit
from arenaseg.preprocessing import Scan

sys.path.insert(0, str(Path(__file__).parent))
from engine_benchmark import git_revision, machine  # noqa: E402
from fill_between_slices import fill_between_slices  # noqa: E402
from merlin_benchmark import BACKBONE, SCANS, STRUCTURES, adapt_dice, frozen_probe, segment_dice  # noqa: E402

MEASURED = ("rounds 0", "rounds 2")
#: The small U-Net (pretrained on abdomen_ct itself, with liver among its classes: a sanity
#: check of what the rounds do to a backbone that is confident far from the paint).
SMALL_UNET, SMALL_STRUCTURES = EMBEDDED_BACKBONE, {5: "liver", 21: "urinary_bladder"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--out", default="bench/SELF_TRAINING.md")
    p.add_argument("--where", action="store_true",
                   help="also where the voxels went, on the rows at k = 3 that 2 rounds moved by > 0.02")
    args = p.parse_args()
    data, out = Path(args.data), Path(args.out)
    jsonl = out.with_suffix(".jsonl")
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    model = None
    for scan_name, (image, labels, values, ks) in SCANS.items():
        ct = lab = scan = None
        for value in values:
            for k in ks:
                row = next((r for r in rows if (r["scan"], r["label"], r["k"]) == (scan_name, value, k)
                            and r.get("backbone") is None), None)
                if row is not None and all(m in row for m in MEASURED):
                    continue
                if ct is None:
                    model = model or load_backbone(BACKBONE)[0]
                    ct = read_image(data / image)
                    lab = array_ijk(read_labels_on(ct, data / labels, "labels"))
                    scan = Scan.from_image(ct, load_backbone(BACKBONE)[1])
                painted = paint_slices(lab, value, k, axis=2)
                ann = find_annotation(painted, value, axis=2)
                ref = lab == value
                if row is None:
                    row = {"scan": scan_name, "label": value, "structure": STRUCTURES[value], "k": k,
                           "fill": dice(fill_between_slices(painted == value, ct.GetSpacing()), ref, ~ann.known),
                           "probe": segment_dice(frozen_probe(scan, ann, model), ann, scan, ref)}
                    rows.append(row)
                for name in MEASURED:
                    if name not in row:
                        rounds = int(name.split()[1])
                        row[name] = adapt_dice(ct, ann, ref, AdaptSettings(self_training=rounds))
                        row[name]["revision"] = git_revision()
                        del row[name]["ranks"]
                jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
                print(json.dumps(row), flush=True)
    ct = read_image(data / "abdomen_ct/ct.nii.gz")
    lab = array_ijk(read_labels_on(ct, data / "abdomen_ct/labels.nii.gz", "labels"))
    for value, structure in SMALL_STRUCTURES.items():
        key = ("abdomen_ct", value, 3, SMALL_UNET)
        row = next((r for r in rows if (r["scan"], r["label"], r["k"], r.get("backbone")) == key), None)
        if row is not None and all(m in row for m in MEASURED):
            continue
        ann = find_annotation(paint_slices(lab, value, 3, axis=2), value, axis=2)
        row = {"scan": "abdomen_ct", "label": value, "structure": structure, "k": 3, "backbone": SMALL_UNET}
        for name in MEASURED:
            row[name] = adapt_dice(ct, ann, lab == value,
                                   AdaptSettings(self_training=int(name.split()[1])), SMALL_UNET)
            row[name]["revision"] = git_revision()
            del row[name]["ranks"]
        rows.append(row)
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(json.dumps(row), flush=True)
    if args.where:
        where(rows, data, jsonl)
    command = "python bench/self_training_study.py " + " ".join(sys.argv[1:])
    out.write_text(report(rows, command))


def split(seg: np.ndarray, ref: np.ndarray, ann) -> dict:
    """Voxels predicted and in the reference, between the outermost painted slices and beyond
    them, and false positives and negatives in each part (unpainted slices only)."""
    k = np.arange(ref.shape[2])
    between = (k > min(ann.slices)) & (k < max(ann.slices))
    out = {}
    for part, mask in (("between", between), ("beyond", ~between)):
        unpainted = ~ann.known & mask[None, None, :]
        p, r = seg & unpainted, ref & unpainted
        out[part] = {"predicted": int(p.sum()), "reference": int(r.sum()),
                     "false_positive": int((p & ~r).sum()), "false_negative": int((r & ~p).sum())}
    return out


def where(rows: list[dict], data: Path, jsonl: Path) -> None:
    """For the rows at k = 3 where 2 rounds moved the Dice by more than 0.02: where the voxels
    went."""
    for r in rows:
        if r.get("backbone") or "where" in r or not all(m in r for m in MEASURED):
            continue
        if r["k"] != 3 or abs(r["rounds 2"]["dice"] - r["rounds 0"]["dice"]) <= 0.02:
            continue
        image, labels = SCANS[r["scan"]][:2]
        ct = read_image(data / image)
        lab = array_ijk(read_labels_on(ct, data / labels, "labels"))
        ann = find_annotation(paint_slices(lab, r["label"], r["k"], axis=2), r["label"], axis=2)
        r["where"] = {}
        for name in MEASURED:
            res = fit(ct, ann, AdaptSettings(self_training=int(name.split()[1])), BACKBONE)
            seg = array_ijk(predict(res.tuning, res.spec, res.scan, torch.device("cpu"), 1, ann).image) > 0
            r["where"][name] = split(seg, lab == r["label"], ann)
        jsonl.write_text("".join(json.dumps(x) + "\n" for x in rows))
        print(json.dumps(r["where"]), flush=True)


def _row_name(r: dict) -> str:
    return f"{r['scan']} {r['structure']} k={r['k']}"


def report(rows: list[dict], command: str) -> str:
    d = AdaptSettings()
    cols = ("rounds 0", "rounds 1", "rounds 2")
    lines = [
        "# Self-training on the default backbone: where it helps, where it hurts (not a default)",
        "",
        f"- Date: {time.strftime('%Y-%m-%d')}; report written at git revision {git_revision()}; "
        "each cell's revision is in `SELF_TRAINING.jsonl` (the rows of 9ec9078 ran while "
        "self-training was briefly the default, through the same code path as "
        "`--self-training 2` now)",
        f"- Machine: {machine()}",
        f"- Command: `{command}`",
        f"- `{BACKBONE}`, which never saw these patients; ARENA with the engine defaults (r0 = "
        f"{d.rank}, λ = {d.lam:g}, {d.steps} steps on the paint, seed {d.seed}) and 0, 1 or 2 "
        f"rounds of self-training of {d.steps // 2} steps; Dice on the unpainted slices after the "
        "engine's post-processing. One seed: `MERLIN_SEEDS.md` puts the seed-to-seed spread of "
        "one structure at up to 0.05.",
        "",
        "| scan | structure | k | Fill between slices | frozen-feature linear probe | ARENA, paint only (default) | 1 round | 2 rounds | 2 rounds − paint only |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    small = [r for r in rows if r.get("backbone") == SMALL_UNET]
    rows = [r for r in rows if r.get("backbone") is None]
    for r in rows:
        cells = [f"{r[c]['dice']:.3f}" if c in r else "" for c in cols]
        gap = f"{r['rounds 2']['dice'] - r['rounds 0']['dice']:+.3f}" if all(c in r for c in MEASURED) else ""
        lines.append(f"| {r['scan']} | {r['structure']} | {r['k']} | {r['fill']:.3f} | "
                     f"{r['probe']:.3f} | " + " | ".join(cells) + f" | {gap} |")
    full = [r for r in rows if all(c in r for c in MEASURED)]
    for scan, k in sorted({(r["scan"], r["k"]) for r in full}):
        sel = [r for r in full if (r["scan"], r["k"]) == (scan, k)]
        m0, m2 = (np.mean([r[c]["dice"] for r in sel]) for c in MEASURED)
        mp = np.mean([r["probe"] for r in sel])
        lines.append("")
        lines.append(f"`{scan}`, k = {k}, mean over {len(sel)} structures: paint only {m0:.3f}, "
                     f"2 rounds {m2:.3f} ({m2 - m0:+.3f}); probe {mp:.3f}.")
    worse = [r for r in full if r["rounds 2"]["dice"] < r["rounds 0"]["dice"] - 0.02]
    better = [r for r in full if r["rounds 2"]["dice"] > r["rounds 0"]["dice"] + 0.02]
    lines += ["", f"Reading: 2 rounds gain more than 0.02 on {len(better)} of {len(full)} rows "
              f"({', '.join(map(_row_name, better))}) and "
              f"lose more than 0.02 on {len(worse)} "
              f"({', '.join(map(_row_name, worse))}). "
              "Each round trains on what the previous one found, so it reaches further along "
              "whatever the network takes for the structure: where that is the structure (the "
              "IVC and the iliopsoas at k = 3) it gains, where it is not it loses (the table "
              "below: where the voxels went). No setting of it gains everywhere, so it is not a "
              "default; `--self-training` stays as an option."]
    moved = [r for r in rows if "where" in r]
    if moved:
        lines += ["", "## Where the voxels went", "",
                  "Rows at k = 3 that 2 rounds moved by more than 0.02: voxels on the unpainted slices "
                  "between the outermost painted slices and beyond them (predicted / reference; "
                  "false positives, false negatives), paint only → 2 rounds.", "",
                  "| scan | structure | between: predicted / reference | between: FP, FN | "
                  "beyond: predicted / reference | beyond: FP, FN |", "|---|---|---|---|---|---|"]
        for r in moved:
            w0, w2 = r["where"]["rounds 0"], r["where"]["rounds 2"]
            cells = []
            for part in ("between", "beyond"):
                a, b = w0[part], w2[part]
                cells.append(f"{a['predicted']} → {b['predicted']} / {a['reference']}")
                cells.append(f"{a['false_positive']}, {a['false_negative']} → "
                             f"{b['false_positive']}, {b['false_negative']}")
            lines.append(f"| {r['scan']} | {r['structure']} | " + " | ".join(cells) + " |")
        change = {_row_name(r): [sum(r["where"][m][part][kind] for part in ("between", "beyond"))
                                 for m in MEASURED for kind in ("false_positive", "false_negative")]
                  for r in moved}
        lines += ["", "False positives added and false negatives removed by the rounds, both parts: "
                  + "; ".join(f"{name} +{fp2 - fp0}, −{fn0 - fn2}"
                              for name, (fp0, fn0, fp2, fn2) in change.items()) + "."]
    if small:
        lines += ["", f"## The small U-Net (`{SMALL_UNET}`): a sanity check", "",
                  "`abdomen_ct`, which it was pretrained on (liver is one of its classes; the "
                  "structure's head starts from it only with `--structure`, not here); k = 3.", "",
                  "| structure | paint only | 2 rounds |", "|---|---|---|"]
        for r in small:
            lines.append(f"| {r['structure']} | {r['rounds 0']['dice']:.3f} | {r['rounds 2']['dice']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
