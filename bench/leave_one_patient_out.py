"""Leave one patient out: pretrain the small backbone on one shared patient, test on the other.

The embedded backbone saw both shared patients in pretraining, so every other figure in `bench/`
is measured on a scan it was trained on. Here, in both directions:

1. ``arenaseg pretrain`` on one patient only (same classes, preprocessing and recipe as the
   embedded backbone, fewer steps: see ``--steps``), into ``--work`` (not the repository), once
   as it is and once with ``--augment`` (random rotation, scaling, intensity, gamma, noise,
   smoothing, bias field);
2. the held-out patient: the backbone's own Dice on the organs it was trained on (zero-shot,
   no paint), then ARENA (engine defaults, seed 0) from k painted axial slices of each new
   structure, next to Fill between slices from the same slices, Dice on the unpainted slices;
   the embedded backbone (both patients seen) is run the same way for comparison.

    python bench/leave_one_patient_out.py --data ../shared/data --out bench/LOPO.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from arenaseg.io.annotations import dice, find_annotation, paint_slices
from arenaseg.backbones import load_backbone
from arenaseg.config import AdaptSettings
from arenaseg.io.geometry import array_ijk
from arenaseg.io.images import read_image
from arenaseg.io.labels import read_labels_on
from arenaseg.inference import predict, sliding_window_logits
from arenaseg.pipeline import Scan, fit
from arenaseg.preprocessing import to_canonical, to_input_grid
from arenaseg.backbones import EMBEDDED_BACKBONE

sys.path.insert(0, str(Path(__file__).parent))
from engine_benchmark import BASE_VALUES, git_revision, machine  # noqa: E402
from fill_between_slices import fill_between_slices  # noqa: E402

PATIENTS = {"abdomen_ct": ("abdomen_ct/ct.nii.gz", "abdomen_ct/labels.nii.gz"),
            "abdomen_ct_dicom": ("abdomen_ct_dicom/dicom", "abdomen_ct_dicom/labels.nii.gz")}
#: New structures (never a pretraining class) per held-out patient: issue 9's targets.
NEW = {"abdomen_ct": {"urinary_bladder": 21, "iliopsoas_left": 88, "inferior_vena_cava": 63,
                      "portal_vein": 64},
       "abdomen_ct_dicom": {"inferior_vena_cava": 63, "portal_vein": 64}}
KS = (3, 5)
#: Pretraining recipes compared: key in the JSON → extra ``arenaseg pretrain`` options.
RECIPES = {"": [], "_augmented": ["--augment"]}


def zero_shot(weights: Path | None, ct, ref: np.ndarray) -> dict:
    """Dice of the backbone's own classes (argmax over the whole scan) per organ present."""
    model, spec = load_backbone(EMBEDDED_BACKBONE, weights)
    x, affine = to_canonical(ct, spec.preprocessing)
    pred = sliding_window_logits(model, x, spec.preprocessing.roi_size, torch.device("cpu")).argmax(0)
    pred = array_ijk(to_input_grid(pred.numpy(), affine, ct, linear=False))
    return {organ: dice(pred == spec.classes.index(organ), ref == value)
            for organ, value in BASE_VALUES.items() if (ref == value).any()}


def adapt_dice(weights: Path | None, ct, scan: Scan, ref: np.ndarray, value: int, k: int) -> float:
    painted = paint_slices(ref, value, k, axis=2)
    annotation = find_annotation(painted, value, axis=2)
    result = fit(scan, annotation, AdaptSettings(seed=0), EMBEDDED_BACKBONE,
                 weights=str(weights) if weights else None)
    seg = array_ijk(predict(result.tuning, result.spec, scan, torch.device("cpu"), value, annotation).image)
    return dice(seg == value, ref == value, ~annotation.known)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "LOPO.md"))
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "arenaseg" / "lopo"),
                        help="folder for the two pretrained backbones (kept: a rerun reuses them)")
    parser.add_argument("--steps", type=int, default=600, help="pretraining steps per backbone")
    parser.add_argument("--rewrite", action="store_true", help="only rewrite the report from the JSON")
    args = parser.parse_args()
    data, out, work = Path(args.data), Path(args.out), Path(args.work)
    if not args.rewrite:
        work.mkdir(parents=True, exist_ok=True)
        results = {"command": "python bench/leave_one_patient_out.py " + " ".join(sys.argv[1:]),
                   "revision": git_revision(), "machine": machine(), "steps": args.steps, "held_out": {}}
        earlier = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
        for held_out in PATIENTS:
            (train,) = [p for p in PATIENTS if p != held_out]
            ct = read_image(data / PATIENTS[held_out][0])
            ref = array_ijk(read_labels_on(ct, data / PATIENTS[held_out][1], "labels"))
            scan = Scan.from_image(ct, load_backbone(EMBEDDED_BACKBONE)[1])
            row = {"trained_on": train, "zero_shot_embedded": zero_shot(None, ct, ref), "new": []}
            old = earlier.get("held_out", {}).get(held_out, {})
            weights = {}
            for recipe, options in RECIPES.items():
                weights[recipe] = work / f"trained_on_{train}_{args.steps}{recipe}.safetensors"
                row[f"pretrain_s{recipe}"] = old.get(f"pretrain_s{recipe}")  # when cached
                if not weights[recipe].exists():
                    started = time.perf_counter()
                    subprocess.run([sys.executable, "-m", "arenaseg", "pretrain", "--scan",
                                    *(str(data / f) for f in PATIENTS[train]), "--steps", str(args.steps),
                                    *options, "--device", "cpu", "--out", str(weights[recipe])], check=True)
                    row[f"pretrain_s{recipe}"] = time.perf_counter() - started
                row[f"zero_shot{recipe}"] = zero_shot(weights[recipe], ct, ref)
            for name, value in NEW[held_out].items():
                for k in KS:
                    painted = paint_slices(ref, value, k, axis=2)
                    unpainted = ~find_annotation(painted, value, axis=2).known
                    entry = {"structure": name, "k": k,
                             "fill": dice(fill_between_slices(painted == value, ct.GetSpacing()), ref == value, unpainted),
                             "arena_embedded": adapt_dice(None, ct, scan, ref, value, k)}
                    for recipe in RECIPES:
                        entry[f"arena_held_out{recipe}"] = adapt_dice(weights[recipe], ct, scan, ref, value, k)
                    print(held_out, json.dumps(entry), flush=True)
                    row["new"].append(entry)
            results["held_out"][held_out] = row
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    results = json.loads(out.with_suffix(".json").read_text())
    for row in results["held_out"].values():  # which organs the training patient's labels hold
        if "trained_organs" not in row:
            image, labels = PATIENTS[row["trained_on"]]
            values = np.unique(array_ijk(read_labels_on(read_image(data / image), data / labels, "labels")))
            row["trained_organs"] = [o for o, v in BASE_VALUES.items() if v in values]
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.write_text(report(results))
    update_model_card(results, out)
    print(f"wrote {out} and the section '{CARD_SECTION}' of {CARD}")


CARD = Path(__file__).resolve().parents[1] / "ARENASegmentation/arenaseg/weights/arena-small-ct-unet.md"
CARD_SECTION = "## Dice on a patient it was not trained on"


def update_model_card(results: dict, report_path: Path) -> None:
    """Put the leave-one-patient-out zero-shot Dice in the embedded backbone's model card (the
    card's own Dice is on its training scans), replacing the section of an earlier run."""
    text = CARD.read_text(encoding="utf-8")
    if CARD_SECTION in text:
        start = text.index(CARD_SECTION)
        end = text.find("\n## ", start + len(CARD_SECTION))
        text = text[:start] + text[end + 1:] if end != -1 else text[:start]
    organs = sorted({o for row in results["held_out"].values() for o in row["zero_shot"]})
    lines = [CARD_SECTION, "",
             "The embedded backbone saw both shared patients. A backbone pretrained the same way "
             f"on one patient only ({results['steps']} steps) gets this Dice on the other, with "
             f"no paint (`bench/{report_path.name}`, revision {results['revision']}):", "",
             "| held-out patient (trained on) | " + " | ".join(organs) + " |",
             "|---|" + "---|" * len(organs)]
    for held_out, row in results["held_out"].items():
        lines.append(f"| `{held_out}` (`{row['trained_on']}`) | " + " | ".join(
            f"{row['zero_shot'][o]:.3f}" if o in row["zero_shot"] and o in row.get("trained_organs", [o])
            else "—" for o in organs) + " |")
    lines += ["", "—: the organ is not in the held-out scan, or not labelled on the training patient."]
    section = "\n".join(lines) + "\n\n"
    anchor = text.find("\n## Earlier training")
    text = text[:anchor + 1] + section + text[anchor + 1:] if anchor != -1 else text.rstrip() + "\n\n" + section
    CARD.write_text(text, encoding="utf-8")


def merlin_rows() -> dict:
    """(scan, structure, k) → ARENA's Dice on the default backbone, ``merlin-resnet152``
    (``bench/MERLIN.jsonl``, written by ``merlin_benchmark.py``; same painted slices)."""
    path = Path(__file__).parent / "MERLIN.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {(r["scan"], r["structure"], r["k"]): r["arena"]["dice"] for r in rows if r["kind"] == "dice"}


def report(results: dict) -> str:
    merlin = merlin_rows()
    lines = ["# Leave one patient out: backbones on a patient they never saw", "",
             f"- Command: `{results['command']}`", f"- Revision: {results['revision']}",
             f"- Machine: {results['machine']}",
             f"- Each backbone: `arenaseg pretrain` on one patient, {results['steps']} steps of 2 "
             "crops, without and with `--augment` (random rotation ±15°, scaling ±15 %, "
             "intensity scale and shift, gamma, noise, smoothing, bias field; "
             "`arenaseg.pretrain.augmentation`). The embedded backbone: both patients, "
             "1200 + 150 steps. ARENA: engine "
             "defaults, seed 0. Dice on the unpainted slices; k axial slices spread evenly inside "
             "the structure, as in `bench/REPORT.md`.",
             "- Read with care: one patient per backbone and fewer steps than the embedded one, so "
             "a held-out figure mixes 'never saw this patient' with 'trained less, on less'. The "
             "DICOM patient is 20 slices (40 mm) of upper abdomen: a backbone trained on it alone "
             "never saw the pelvis (bladder, iliopsoas) nor kidneys, gallbladder or duodenum labels.",
             "- The default backbone, `merlin-resnet152` (Merlin's encoder, pretrained on about "
             "15,000 Stanford abdominal CT exams), **never saw either shared patient**, and its "
             "decoder is trained per task from the painted slices only: it needs no held-out "
             "pretraining. Its column is ARENA with the engine defaults on the same painted "
             "slices, from `bench/MERLIN.jsonl` (`python bench/merlin_benchmark.py`; details in "
             "`bench/MERLIN.md`).", ""]
    for held_out, row in results["held_out"].items():
        lines += [f"## Held out: `{held_out}` (backbone pretrained on `{row['trained_on']}` only)", "",
                  "Zero-shot Dice of the pretrained organs (no paint, no adaptation):", "",
                  "| organ | never saw this patient | never saw it, augmented pretraining | "
                  "embedded backbone (saw it) |", "|---|---|---|---|"]
        for organ, value in row["zero_shot"].items():
            absent = organ not in row.get("trained_organs", row["zero_shot"])
            lines.append(f"| {organ} | {value:.3f}{' (not labelled on the training patient)' if absent else ''} | "
                         f"{row['zero_shot_augmented'][organ]:.3f} | {row['zero_shot_embedded'][organ]:.3f} |")
        lines += ["", "New structures, from k painted slices (in brackets: ARENA − Fill):", "",
                  "| structure | k | Fill between slices | ARENA, never saw this patient | "
                  "ARENA, never saw it, augmented pretraining | ARENA, embedded backbone (saw it) | "
                  "ARENA, default backbone (Merlin, never saw it) |",
                  "|---|---|---|---|---|---|---|"]
        columns = ("fill", "arena_held_out", "arena_held_out_augmented", "arena_embedded")
        for e in row["new"]:
            m = merlin.get((held_out, e["structure"], e["k"]))
            lines.append(f"| {e['structure']} | {e['k']} | {e['fill']:.3f} | " + " | ".join(
                f"{e[c]:.3f} ({e[c] - e['fill']:+.3f})" for c in columns[1:]) + " | "
                + ("—" if m is None else f"{m:.3f} ({m - e['fill']:+.3f})") + " |")
        means = {c: np.mean([e[c] for e in row["new"]]) for c in columns}
        found = [merlin[(held_out, e["structure"], e["k"])] for e in row["new"]
                 if (held_out, e["structure"], e["k"]) in merlin]
        lines.append("| mean | | " + " | ".join(f"{means[c]:.3f}" for c in columns) + " | "
                     + (f"{np.mean(found):.3f}" if len(found) == len(row["new"]) else "—") + " |")
        lines.append("")
    new = [e for row in results["held_out"].values() for e in row["new"]]
    plain, augmented = (np.mean([e[c] for e in new]) for c in ("arena_held_out", "arena_held_out_augmented"))
    lines += ["## Augmented pretraining", "",
              f"Over both held-out patients, ARENA's mean Dice from the backbone that never saw the "
              f"patient is {plain:.3f} with the plain recipe and {augmented:.3f} with `--augment` "
              f"(Fill between slices: {np.mean([e['fill'] for e in new]):.3f}). Random rotation, "
              "scaling, intensity, gamma, noise, smoothing and bias field on one patient do not "
              "make the backbone read the other: its best zero-shot Dice on an organ is "
              f"{max(v for row in results['held_out'].values() for v in row['zero_shot_augmented'].values()):.3f}. The embedded "
              "backbone keeps the plain recipe.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
