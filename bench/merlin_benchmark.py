"""Merlin benchmark: ARENA on the Merlin-derived encoder against what a user already has, on
scans that encoder never saw.

For each structure and k painted axial slices (picked by ``paint_slices`` from the reference
labels), Dice on the unpainted slices of:

- *Fill between slices* (ITK morphological contour interpolation, ``fill_between_slices.py``);
- the frozen-feature linear probe: a logistic regression (L2, LBFGS) on the frozen encoder's
  ``stem``, ``layer1`` and ``layer2`` features and the windowed intensity, trained on the painted
  voxels, its logit upsampled onto the canonical grid (a linear map commutes with the trilinear
  upsampling, so each stage is mapped at its own resolution);
- ``merlin-resnet152`` with the engine's defaults: ARENA (adapters on the last blocks, decoder
  trained) and, at k = 3, the same with no adapter (decoder and head only, ``linear-probe``);
- the small U-Net held out from that patient, from ``LOPO.json`` (read, not re-run).

At k = 3 on ``abdomen_ct``, which stages the decoder should read (the probe with ``layer3``
too) and what the decoder's linear start gives (ARENA with a decoder started at random).

All three trained ones go through the engine's own post-processing (threshold 0.5, objects
connected to the paint). Then ARENA's rank at r0 = 8 and 32 and at twice the steps, and one
``arenaseg adapt`` process with the defaults (wall time, peak resident memory) on
``abdomen_ct`` and on ``abdomen_ct`` resampled onto a 233 × 167 × 191 grid of 1.5 mm.

    python bench/merlin_benchmark.py --data ../shared/data --out bench/MERLIN.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from arenaseg.io.annotations import dice, find_annotation, paint_slices
from contextlib import contextmanager

from arenaseg.backbones import REGISTRY, get_spec, load_backbone
from arenaseg.backbones.merlin import TAPS, MerlinSegmenter, fit_logistic, upsample_exact
from arenaseg.config import AdaptSettings
from arenaseg.io.geometry import array_ijk, image_like
from arenaseg.io.images import read_image
from arenaseg.io.labels import read_labels_on
from arenaseg.inference import predict
from arenaseg.pipeline import fit
from arenaseg.postprocessing import select_objects, threshold
from arenaseg.preprocessing import Scan
from arenaseg.training import sample_logits

sys.path.insert(0, str(Path(__file__).parent))
from engine_benchmark import git_revision, kept_rows, machine, run_adapt  # noqa: E402
from fill_between_slices import fill_between_slices  # noqa: E402

BACKBONE = "merlin-resnet152"
STRUCTURES = {21: "urinary_bladder", 88: "iliopsoas_left", 63: "inferior_vena_cava", 64: "portal_vein"}
SCANS = {  # scan: (image, labels, structures, k)
    "abdomen_ct": ("abdomen_ct/ct.nii.gz", "abdomen_ct/labels.nii.gz", (21, 88, 63, 64), (3, 5, 8)),
    "abdomen_ct_dicom": ("abdomen_ct_dicom/dicom", "abdomen_ct_dicom/labels.nii.gz", (63, 64), (3, 5)),
}
PROBE_STAGES = ("stem", "layer1", "layer2")


def deep_encoder() -> MerlinSegmenter:
    """The encoder kept down to ``layer3`` (for the stage table)."""
    spec = get_spec(BACKBONE)
    deep = dataclasses.replace(spec, id=BACKBONE + "-to-layer3",
                               network_args=(("stages", PROBE_STAGES + ("layer3",)),))
    REGISTRY[deep.id] = deep
    return load_backbone(deep.id)[0]


@contextmanager
def random_decoder_start():
    """ARENA with the decoder started at random, not as the linear probe."""
    saved = MerlinSegmenter.start_decoder
    MerlinSegmenter.start_decoder = None
    try:
        yield
    finally:
        MerlinSegmenter.start_decoder = saved


def frozen_probe(scan: Scan, ann, model, stages=PROBE_STAGES) -> sitk.Image:
    """The frozen-feature linear probe's probability on the input grid (see the module text)."""
    with torch.no_grad():
        x = scan.x
        pad = [-n % a for n, a in zip(x.shape[1:], model.align)]
        xp = torch.nn.functional.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        state = model.encoder_state(xp[None])
        feats = [state["taps"][s].float() for s in stages]
        points, targets = ann.points()
        coords = torch.as_tensor(scan.points_to_canonical(points), dtype=torch.float32)
        columns = []
        for stage, f in zip(stages, feats):
            z, sx, sy = TAPS[stage][1]
            tap_xyz = f.permute(0, 1, 3, 4, 2)  # (1, C, X, Y, Z)
            columns.append(sample_logits(tap_xyz, coords / torch.tensor([sx, sy, z]))[0].T)
        columns.append(sample_logits(xp[None], coords)[0].T)
    w, b = fit_logistic(torch.cat(columns, 1), torch.as_tensor(targets, dtype=torch.float32))
    with torch.no_grad():
        logit = b + w[-1] * xp[0]
        start = 0
        for stage, f in zip(stages, feats):
            c = f.shape[1]
            part = torch.einsum("c,bczxy->bzxy", w[start:start + c], f)[:, None]
            z, sx, sy = TAPS[stage][1]
            logit = logit + upsample_exact(part, (z, sx, sy))[0, 0].permute(1, 2, 0)
            start += c
        sxyz = x.shape[1:]
        prob = torch.sigmoid(logit[:sxyz[0], :sxyz[1], :sxyz[2]])
    return scan.to_input_grid(prob.numpy())


def segment_dice(probability: sitk.Image, ann, scan: Scan, ref: np.ndarray) -> float:
    mask, core = threshold(probability, ann, scan.outside)
    seg = array_ijk(select_objects(mask, core, 1, ann.target).image) > 0
    return dice(seg, ref, ~ann.known)


def adapt_dice(ct, ann, ref, settings: AdaptSettings, backbone: str = BACKBONE) -> dict:
    start = time.perf_counter()
    res = fit(ct, ann, settings, backbone)
    seg = array_ijk(predict(res.tuning, res.spec, res.scan, torch.device("cpu"), 1, ann).image) > 0
    return {"dice": dice(seg, ref, ~ann.known), "rank": sum(res.log.ranks.values()),
            "ranks": res.log.ranks, "seconds": time.perf_counter() - start}


def lopo_small_unet(path: Path) -> dict:
    """(scan, structure, k) → Dice of ARENA on the small U-Net pretrained without that patient."""
    held = json.loads(path.read_text())["held_out"]
    return {(scan, r["structure"], r["k"]): r["arena_held_out"]
            for scan, v in held.items() for r in v["new"]}


def cli_runs(data: Path, tmp: Path) -> list[dict]:
    """``arenaseg adapt`` with the defaults, as a user runs it: abdomen_ct, then abdomen_ct on a
    233 × 167 × 191 grid of 1.5 mm (centred; linear HU, nearest labels)."""
    ct = read_image(data / "abdomen_ct/ct.nii.gz")
    labels = read_labels_on(ct, data / "abdomen_ct/labels.nii.gz", "labels")
    size, spacing = (233, 167, 191), (1.5, 1.5, 1.5)
    centre = ct.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ct.GetSize()])
    half = np.array(ct.GetDirection()).reshape(3, 3) @ ((np.array(size) - 1) / 2 * np.array(spacing))
    origin = list(np.array(centre) - half)
    big = sitk.Resample(ct, size, sitk.Transform(), sitk.sitkLinear, origin, spacing,
                        ct.GetDirection(), -1024.0, sitk.sitkInt16)
    big_labels = sitk.Resample(labels, big, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    rows = []
    for name, image, lab in (("abdomen_ct", ct, labels), ("abdomen_ct at 233×167×191, 1.5 mm", big, big_labels)):
        ref = array_ijk(lab)
        paths = {k: tmp / f"{len(rows)}_{k}.nii.gz" for k in ("ct", "paint", "seg")}
        sitk.WriteImage(image, str(paths["ct"]))
        sitk.WriteImage(image_like(paint_slices(ref, 21, 3, axis=2), image), str(paths["paint"]))
        cmd = [sys.executable, "-m", "arenaseg", "adapt", "--image", str(paths["ct"]),
               "--annotations", str(paths["paint"]), "--label", "21", "--out", str(paths["seg"]),
               "--backbone", BACKBONE, "--device", "cpu"]
        wall, peak, out = run_adapt(cmd)
        ann = find_annotation(paint_slices(ref, 21, 3, axis=2), 21, axis=2)
        pred = array_ijk(sitk.ReadImage(str(paths["seg"]))) == 21 if paths["seg"].exists() else None
        rows.append({"scan": name, "size": list(image.GetSize()), "wall_s": wall, "peak_mb": peak,
                     "dice": dice(pred, ref == 21, ~ann.known) if pred is not None else None,
                     "tail": out.strip().splitlines()[-3:]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--out", default="bench/MERLIN.md")
    args = p.parse_args()
    data, out = Path(args.data), Path(args.out)
    jsonl = out.with_suffix(".jsonl")
    rows, record = kept_rows(jsonl)
    done = {(r["kind"], r.get("scan"), r.get("label"), r.get("k"), r.get("variant")) for r in rows}

    model, _ = load_backbone(BACKBONE)
    deep = deep_encoder()
    for scan_name, (image, labels, values, ks) in SCANS.items():
        ct = read_image(data / image)
        lab = array_ijk(read_labels_on(ct, data / labels, "labels"))
        scan = Scan.from_image(ct, load_backbone(BACKBONE)[1])
        for value in values:
            ref = lab == value
            for k in ks:
                if ("dice", scan_name, value, k, None) in done:
                    continue
                painted = paint_slices(lab, value, k, axis=2)
                ann = find_annotation(painted, value, axis=2)
                row = {"kind": "dice", "scan": scan_name, "label": value,
                       "structure": STRUCTURES[value], "k": k,
                       "fill": dice(fill_between_slices(painted == value, ct.GetSpacing()), ref, ~ann.known),
                       "probe": segment_dice(frozen_probe(scan, ann, model), ann, scan, ref)}
                row["arena"] = adapt_dice(ct, ann, ref, AdaptSettings())
                if k == 3:
                    row["decoder_only"] = adapt_dice(ct, ann, ref, AdaptSettings(method="linear-probe"))
                if k == 3 and scan_name == "abdomen_ct":
                    row["probe_with_layer3"] = segment_dice(
                        frozen_probe(scan, ann, deep, PROBE_STAGES + ("layer3",)), ann, scan, ref)
                    with random_decoder_start():
                        row["arena_random_start"] = adapt_dice(ct, ann, ref, AdaptSettings())
                record(row)
    ct = read_image(data / "abdomen_ct/ct.nii.gz")
    lab = array_ijk(read_labels_on(ct, data / "abdomen_ct/labels.nii.gz", "labels"))
    ann = find_annotation(paint_slices(lab, 21, 3, axis=2), 21, axis=2)
    for variant, settings in (("r0=8", AdaptSettings(rank=8)), ("r0=32", AdaptSettings(rank=32)),
                              ("r0=32, 240 steps", AdaptSettings(rank=32, steps=240))):
        if ("rank", "abdomen_ct", 21, 3, variant) not in done:
            record({"kind": "rank", "scan": "abdomen_ct", "label": 21, "k": 3, "variant": variant,
                    **adapt_dice(ct, ann, lab == 21, settings)})
    if not any(r["kind"] == "cli" for r in rows):
        with tempfile.TemporaryDirectory() as tmp:
            for row in cli_runs(data, Path(tmp)):
                record({"kind": "cli", **row})
    command = "python bench/merlin_benchmark.py " + " ".join(sys.argv[1:])
    out.write_text(report(rows, lopo_small_unet(Path(__file__).parent / "LOPO.json"), command))


def report(rows: list[dict], lopo: dict, command: str) -> str:
    from arenaseg.config import AdaptSettings as S
    d = S()
    load = os.getloadavg()
    lines = [
        "# ARENA on the Merlin-derived encoder: scans it never saw",
        "",
        f"- Date: {time.strftime('%Y-%m-%d')}; git revision {git_revision()}",
        f"- Machine: {machine()}; load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        f"- Command: `{command}`",
        f"- Backbone `{BACKBONE}`, engine defaults: ARENA r0 = {d.rank}, λ = {d.lam}, ρ = {d.rho}, "
        f"{d.steps} steps; Dice on the unpainted slices. Merlin and Astra never saw these patients "
        "(Merlin: Stanford abdominal CT; the shared scans are TotalSegmentator test cases). The "
        "small U-Net column is that network pretrained on the *other* shared patient only "
        "(`LOPO.json`).",
        "",
        "| scan | structure | k | Fill between slices | frozen-feature linear probe | decoder only (no adapter) | ARENA (Merlin) | ARENA − Fill | rank | seconds (in process) | small U-Net held out |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    dice_rows = [r for r in rows if r["kind"] == "dice"]
    for r in dice_rows:
        dec = f"{r['decoder_only']['dice']:.3f}" if "decoder_only" in r else ""
        small = lopo.get((r["scan"], r["structure"], r["k"]))
        lines.append(f"| {r['scan']} | {r['structure']} | {r['k']} | {r['fill']:.3f} | {r['probe']:.3f} | "
                     f"{dec} | **{r['arena']['dice']:.3f}** | {r['arena']['dice'] - r['fill']:+.3f} | "
                     f"{r['arena']['rank']} | {r['arena']['seconds']:.0f} | "
                     f"{'' if small is None else f'{small:.3f}'} |")
    k3 = [r for r in dice_rows if r["scan"] == "abdomen_ct" and r["k"] == 3]
    if k3:
        ma, mp = np.mean([r["arena"]["dice"] for r in k3]), np.mean([r["probe"] for r in k3])
        md = np.mean([r["decoder_only"]["dice"] for r in k3])
        lines += ["", f"`abdomen_ct`, k = 3, mean over the {len(k3)} structures: ARENA {ma:.3f}, "
                      f"decoder only {md:.3f}, frozen-feature linear probe {mp:.3f} (ARENA − probe "
                      f"{ma - mp:+.3f}); ARENA − Fill per structure: "
                  + ", ".join(f"{r['structure']} {r['arena']['dice'] - r['fill']:+.3f}" for r in k3) + "."]
    if k3 and all("probe_with_layer3" in r for r in k3):
        lines += ["", "## What the decoder reads and how it starts", "",
                  "`abdomen_ct`, k = 3. The frozen-feature linear probe on stem to `layer2` (the "
                  "decoder's stages) and with `layer3` (24 mm) added; ARENA with its decoder "
                  "started as that probe (the default) and started at random.", "",
                  "| structure | probe, stem to layer2 | probe, + layer3 | ARENA, linear start | ARENA, random start |",
                  "|---|---|---|---|---|"]
        for r in k3:
            lines.append(f"| {r['structure']} | {r['probe']:.3f} | {r['probe_with_layer3']:.3f} | "
                         f"{r['arena']['dice']:.3f} | {r['arena_random_start']['dice']:.3f} |")
    ranks = [r for r in rows if r["kind"] == "rank"]
    if ranks:
        lines += ["", "## Rank: a property of the task, not of r0 or the step count",
                  "", "Urinary bladder, `abdomen_ct`, k = 3.", "",
                  "| variant | total rank | Dice | ranks per layer (non-zero) |", "|---|---|---|---|"]
        for r in ranks:
            per = ", ".join(f"{n.replace('encoder.', '')} {v}" for n, v in r["ranks"].items() if v)
            lines.append(f"| {r['variant']} | {r['rank']} | {r['dice']:.3f} | {per} |")
    cli = [r for r in rows if r["kind"] == "cli"]
    if cli:
        lines += ["", "## One `arenaseg adapt` with the defaults (its own process)", "",
                  "Urinary bladder, 3 painted axial slices; wall time from start to exit (backbone "
                  "loading, resampling, training, inference, writing), peak resident memory "
                  "(`os.wait4`).", "",
                  "| scan | size | wall s | peak MB | Dice |", "|---|---|---|---|---|"]
        for r in cli:
            dsc = "" if r["dice"] is None else f"{r['dice']:.3f}"
            lines.append(f"| {r['scan']} | {'×'.join(map(str, r['size']))} | {r['wall_s']:.1f} | "
                         f"{r['peak_mb']:.0f} | {dsc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
