"""Paper comparison on real scans: every method, k slices, cross-scan, rank robustness → report.

Every fine-tuning method, few-slice protocols (k = 1, 3, 5), cross-scan transfer and rank
robustness, with a Markdown report and PNG plots.

Each job adapts the embedded backbone in memory (``arenaseg.pipeline.fit`` and ``predict``, the
functions behind ``arenaseg adapt``) with one method, structure, number of painted axial slices
k, initial rank r0 and seed, and records Dice on the unpainted slices, discovered ranks (per
layer and per step), parameters and seconds. Jobs run in parallel worker processes (one thread
each). Peak memory per method is that of one real ``arenaseg adapt`` process.

    python bench/paper_comparison.py            # full run → bench/COMPARISON.md (+ .jsonl, PNGs)
    python bench/paper_comparison.py --quick --out /tmp/quick.md   # smoke test, a few minutes
    python bench/paper_comparison.py --rewrite  # report again from the saved results
    python bench/paper_comparison.py --lambda-ablation 8 16  # ARENA's rank sweep at other λ, added
    python bench/paper_comparison.py --add-method fill      # one method's jobs again, added
    python bench/paper_comparison.py --rank-sweep --out bench/RANK_SWEEP.md  # r0 sweep, defaults
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from engine_benchmark import git_revision, machine, run_adapt  # noqa: E402

from arenaseg.config import METHODS, AdaptSettings  # noqa: E402,F401 (every method, from the engine's config)
#: The engine's methods and Slicer's *Fill between slices* (in-scan protocols of the full run
#: only: it needs the paint on the scan it fills, has nothing to transfer or rank, and needs ITK,
#: the bench extra, which the quick run in the test suite does without).
COMPARED = METHODS + ("fill",)
SCANS = {"abdomen_ct": ("abdomen_ct/ct.nii.gz", "abdomen_ct/labels.nii.gz"),
         "abdomen_ct_dicom": ("abdomen_ct_dicom/dicom", "abdomen_ct_dicom/labels.nii.gz")}
# name → TotalSegmentator label value (the same in both scans), and whether the backbone knows it
STRUCTURES = {"liver": (5, True), "spleen": (1, True), "aorta": (52, True), "stomach": (6, True),
              "urinary_bladder": (21, False), "iliopsoas_left": (88, False),
              "inferior_vena_cava": (63, False)}
CROSS = ("liver", "spleen", "aorta", "stomach")

# The rank sweep runs on the three structures the backbone never learnt; "steps" repeats their
# r0 = 8 runs with twice the steps (does the rank settle?).
NEW = ("urinary_bladder", "iliopsoas_left", "inferior_vena_cava")
FULL = dict(structures=tuple(STRUCTURES), ks=(1, 3, 5), k_structures=("liver", "urinary_bladder"),
            seeds=(0, 1, 2), ranks=(2, 4, 8, 16, 32), rank_seeds=(0, 1, 2),
            rank_structures=NEW, cross=CROSS, long_structures=NEW, baselines=("fill",))
QUICK = dict(structures=("liver", "urinary_bladder"), ks=(3,), k_structures=(), seeds=(0,),
             ranks=(2, 8), rank_seeds=(0,), rank_structures=("urinary_bladder",), cross=("liver",),
             long_structures=("urinary_bladder",))
# Rank robustness alone, ARENA against LoRA on the new structures, at the engine's own step
# budget (the full run's 60 steps would not fit in 90 minutes at 120).
RANK_SWEEP = dict(structures=NEW, ks=(3,), k_structures=(), seeds=(0, 1, 2), ranks=(2, 4, 8, 16, 32),
                  rank_seeds=(0, 1, 2), rank_structures=NEW, cross=(), long_structures=NEW,
                  methods=("lora", "arena"))
# The engine's defaults (AdaptSettings: λ, ρ, η, r0 = 8, one crop per step) with 60 steps instead
# of 120 (the "steps" protocol runs the defaults' 120), so that the full run fits in 90 minutes on
# 2 cores.
BUDGET = dict(steps=60, crops_per_step=1)
MEMORY_STEPS = 3
QUICK_BUDGET = dict(steps=6, crops_per_step=1)


def plan(p: dict) -> list[dict]:
    """Every job of a protocol set ``p`` (FULL or QUICK), each a dict of its settings."""
    jobs = []

    methods = tuple(p.get("methods", METHODS)) + p.get("baselines", ())

    def add(protocol, scan, name, method, k, seed, rank=8, cross_to=None):
        if method == "zero-shot" and not STRUCTURES[name][1]:
            return
        if method in ("zero-shot", "fill") and seed != p["seeds"][0]:
            return  # nothing random in it
        jobs.append(dict(protocol=protocol, scan=scan, structure=name, method=method, k=k,
                         seed=seed, rank=rank, cross_to=cross_to))
    for seed in sorted(set(p["seeds"]) | set(p["rank_seeds"])):  # a run cut short has every protocol
        main = seed in p["seeds"]
        for name in p["structures"] if main else ():
            for method in methods:
                add("in-scan", "abdomen_ct", name, method, 3, seed,
                    cross_to="abdomen_ct_dicom" if name in p["cross"] and method != "fill" else None)
        for name in p["rank_structures"] if seed in p["rank_seeds"] else ():
            for method in ("lora", "arena"):
                for r0 in p["ranks"]:
                    if r0 != 8 or name not in p["structures"] or not main:
                        add("rank", "abdomen_ct", name, method, 3, seed, rank=r0)
        if not main:
            continue
        for name in p.get("long_structures", ()):  # is the rank settled? the same run, 2× steps
            jobs.append(dict(protocol="steps", scan="abdomen_ct", structure=name, method="arena",
                             k=3, seed=seed, rank=8, cross_to=None, steps_factor=2))
        for k in p["ks"]:
            for name in p["k_structures"]:
                for method in methods:
                    if k != 3:
                        add("in-scan", "abdomen_ct", name, method, k, seed)
        for name in p["cross"]:
            for method in METHODS:
                add("cross", "abdomen_ct_dicom", name, method, 3, seed, cross_to="abdomen_ct")
    return jobs


def lambda_plan(p: dict, lams) -> list[dict]:
    """ARENA's rank sweep of protocol set ``p`` again at each λ in ``lams`` (the λ ablation)."""
    return [dict(protocol="lambda", scan="abdomen_ct", structure=name, method="arena", k=3,
                 seed=seed, rank=r0, cross_to=None, lam=lam)
            for seed in p["rank_seeds"] for lam in lams for name in p["rank_structures"]
            for r0 in p["ranks"]]


_SCANS: dict = {}


def _scan(data: Path, name: str):
    """(Scan on the default backbone's grid, reference labels on the image grid), cached."""
    if name not in _SCANS:
        from arenaseg.backbones import EMBEDDED_BACKBONE, load_backbone
        from arenaseg.io.geometry import array_ijk
        from arenaseg.io.images import read_image
        from arenaseg.io.labels import read_labels_on
        from arenaseg.pipeline import Scan

        image_path, labels_path = SCANS[name]
        ct = read_image(data / image_path)
        _, spec = load_backbone(EMBEDDED_BACKBONE)
        _SCANS[name] = (Scan.from_image(ct, spec), array_ijk(read_labels_on(ct, data / labels_path, "labels")))
    return _SCANS[name]


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_job(args: tuple) -> dict:
    """Adapt, segment, measure; for cross jobs also apply the saved adapter to the other scan."""
    job, data, budget = args
    import torch

    from arenaseg.adapter_file import apply_adapter, read_adapter, save_adapter
    from arenaseg.io.annotations import dice, find_annotation, paint_slices
    from arenaseg.backbones import EMBEDDED_BACKBONE, load_backbone
    from arenaseg.io.geometry import array_ijk
    from arenaseg.pipeline import fit, predict
    from arenaseg.training import AdaptSettings

    data, cpu = Path(data), torch.device("cpu")
    scan, ref = _scan(data, job["scan"])
    value = STRUCTURES[job["structure"]][0]
    annotation = find_annotation(paint_slices(ref, value, job["k"], axis=2), value, axis=2)
    started = time.perf_counter()
    if job["method"] == "fill":
        from fill_between_slices import fill_between_slices

        painted = paint_slices(ref, value, job["k"], axis=2) == value
        seg = fill_between_slices(painted, scan.image.GetSpacing())
        return dict(job, dice=dice(seg, ref == value, ~annotation.known), train_s=0.0,
                    predict_s=time.perf_counter() - started, ranks={}, initial_ranks={},
                    total_rank=[], trainable=0, active=0, slices=list(annotation.slices))
    loop = dict(budget, steps=budget["steps"] * job.get("steps_factor", 1))
    settings = AdaptSettings(method=job["method"], rank=job["rank"], seed=job["seed"], **loop,
                             **({"lam": job["lam"]} if "lam" in job else {}))
    start = time.perf_counter()
    result = fit(scan, annotation, settings, EMBEDDED_BACKBONE, structure=job["structure"], device="cpu")
    trained = time.perf_counter()
    seg = array_ijk(predict(result.tuning, result.spec, scan, cpu, value, annotation).image) == value
    row = dict(job, dice=dice(seg, ref == value, ~annotation.known),
               train_s=trained - start, predict_s=time.perf_counter() - trained,
               ranks=result.tuning.ranks(), initial_ranks=result.tuning.initial_ranks(),
               total_rank=result.log.total_rank,
               trainable=result.tuning.trainable_parameters(),
               active=result.tuning.active_parameters(), slices=list(annotation.slices))
    if job["cross_to"]:  # through a real adapter file, as a user would move it to a new patient
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "adapter.safetensors"
            save_adapter(path, result.tuning, {"backbone": result.spec.id,
                                               "backbone_checksum": result.checksum,
                                               "settings": settings.to_dict(),
                                               "structure": job["structure"], "label": value})
            model, spec = load_backbone(EMBEDDED_BACKBONE)
            tuning = apply_adapter(model, spec, *read_adapter(path), source=str(path))
        other, other_ref = _scan(data, job["cross_to"])
        pred = array_ijk(predict(tuning, spec, other, cpu, value).image) == value
        row["cross_dice"] = dice(pred, other_ref == value)
    return row


def peak_memory(data: Path, methods, workers: int) -> dict:
    """Peak resident memory of one ``arenaseg adapt`` process per method (liver, k = 3, engine
    defaults but ``MEMORY_STEPS`` steps: every step holds the same tensors, so the peak is
    reached at the first step or at the segmentation), as a user runs it."""
    from arenaseg.io.annotations import paint_slices
    from arenaseg.io.geometry import image_like
    from arenaseg.io.images import read_image

    import SimpleITK as sitk

    exe = shutil.which("arenaseg")
    base = [exe] if exe else [sys.executable, "-m", "arenaseg"]
    ct_path = data / SCANS["abdomen_ct"][0]
    ct = read_image(ct_path)
    _, ref = _scan(data, "abdomen_ct")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        ann = Path(tmp) / "painted.nii.gz"
        sitk.WriteImage(image_like(paint_slices(ref, 5, 3, axis=2), ct), str(ann))
        cmds = {m: base + ["adapt", "--image", str(ct_path), "--annotations", str(ann), "--label", "5",
                           "--structure", "liver", "--method", m, "--device", "cpu",
                           "--out", str(Path(tmp) / f"{m}.nii.gz"), "--steps", str(MEMORY_STEPS)]
                for m in methods}
        with mp.get_context("spawn").Pool(workers) as pool:
            for m, (wall, peak_mb, _) in zip(cmds, pool.map(run_adapt, cmds.values())):
                out[m] = {"peak_mb": peak_mb}
    return out


def run_jobs(jobs, data: Path, budget: dict, workers: int, log, start: float) -> list[dict]:
    """Run ``jobs`` on ``workers`` processes; each result row is also appended to ``log`` (an
    open file, or None) at once, so a run cut short keeps what it did."""
    rows = []
    with mp.get_context("spawn").Pool(workers, _init_worker) as pool:
        for i, row in enumerate(pool.imap_unordered(run_job, [(j, str(data), budget) for j in jobs]), 1):
            rows.append(row)
            if log is not None:
                log.write(json.dumps(row) + "\n")
                log.flush()
            print(f"[{i}/{len(jobs)} {time.perf_counter() - start:.0f} s] {row['protocol']} "
                  f"{row['structure']} {row['method']} k={row['k']} r0={row['rank']} "
                  f"λ={row.get('lam', '')} seed={row['seed']}: Dice {row['dice']:.3f}", flush=True)
    return rows


def lambda_ablation(data: Path, results: Path, lams, workers: int) -> tuple[dict, list[dict]]:
    """Run ARENA's rank sweep at each λ in ``lams`` with the saved run's budget and seeds, and
    add the rows to ``results`` (replacing earlier rows at the same λ)."""
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    header, rows = lines[0], [r for r in lines[1:] if r.get("lam") not in lams]
    jobs = lambda_plan(header["protocol"], lams)
    start = time.perf_counter()
    rows += run_jobs(jobs, data, header["budget"], workers, None, start)
    header["lambda_ablation"] = {"command": "python bench/paper_comparison.py " + " ".join(sys.argv[1:]),
                                 "revision": git_revision(), "jobs": len(jobs),
                                 "wall_s": time.perf_counter() - start}
    results.write_text("\n".join(json.dumps(x) for x in [header] + rows) + "\n")
    return header, rows


def add_methods(data: Path, results: Path, methods, workers: int) -> tuple[dict, list[dict]]:
    """Run the saved run's jobs of ``methods`` only (e.g. a baseline added later) and put their
    rows in ``results`` in place of earlier rows of those methods."""
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    header, rows = lines[0], [r for r in lines[1:] if r["method"] not in methods]
    extra = tuple(m for m in methods if m not in METHODS)  # a baseline the saved run did not plan
    header["protocol"]["baselines"] = tuple(dict.fromkeys(header["protocol"].get("baselines", ()) + extra))
    jobs = [j for j in plan(header["protocol"]) if j["method"] in methods]
    rows += run_jobs(jobs, data, header["budget"], workers, None, time.perf_counter())
    header["jobs"] = len(plan(header["protocol"]))
    header.setdefault("added", []).append({"methods": list(methods), "revision": git_revision(),
                                           "jobs": len(jobs)})
    results.write_text("\n".join(json.dumps(x) for x in [header] + rows) + "\n")
    return header, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", help="the shared CT data folder (abdomen_ct, abdomen_ct_dicom)",
                        default=os.environ.get("ARENASEG_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    parser.add_argument("--out", default=str(Path(__file__).parent / "COMPARISON.md"),
                        help="Markdown report; results go to the same name with .jsonl, plots .png")
    parser.add_argument("--quick", action="store_true", help="smoke test: few jobs, few steps")
    parser.add_argument("--rank-sweep", action="store_true",
                        help="only ARENA and LoRA across r0 on the new structures, at the engine's "
                             "default steps")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel worker processes (one thread each)")
    parser.add_argument("--rewrite", action="store_true",
                        help="write the report again from the saved results (.jsonl)")
    parser.add_argument("--measure-memory", action="store_true",
                        help="with --rewrite: measure peak memory per method again (e.g. after "
                             "a run cut short)")
    parser.add_argument("--lambda-ablation", type=float, nargs="+", metavar="LAMBDA",
                        help="after a run: ARENA's rank sweep again at each λ, added to the saved "
                             "results and the report")
    parser.add_argument("--add-method", nargs="+", choices=COMPARED, metavar="METHOD",
                        help="after a run: run the jobs of these methods only and put them in "
                             "the saved results and the report")
    args = parser.parse_args()
    out = Path(args.out)
    results = out.with_suffix(".jsonl")
    if args.add_method:
        from comparison_report import write_report
        write_report(out, *add_methods(Path(args.data), results, args.add_method, args.workers))
        return
    if args.lambda_ablation:
        from comparison_report import write_report
        write_report(out, *lambda_ablation(Path(args.data), results, args.lambda_ablation, args.workers))
        return
    if args.rewrite:
        lines = [json.loads(line) for line in results.read_text().splitlines()]
        header, rows = lines[0], lines[1:]
        if args.measure_memory:
            started = time.perf_counter()
            header["memory"] = peak_memory(Path(args.data), METHODS[1:], args.workers)
            header["memory_wall_s"], header["memory_steps"] = time.perf_counter() - started, MEMORY_STEPS
            results.write_text("\n".join(json.dumps(x) for x in [header] + rows) + "\n")
        from comparison_report import write_report
        write_report(out, header, rows)
        return
    data = Path(args.data)
    if not out.parent.is_dir():
        parser.error(f"folder of --out '{out}' does not exist: create it first")
    defaults = AdaptSettings()
    protocol, budget = ((QUICK, QUICK_BUDGET) if args.quick else
                        (RANK_SWEEP, dict(steps=defaults.steps, crops_per_step=defaults.crops_per_step))
                        if args.rank_sweep else (FULL, BUDGET))
    jobs = plan(protocol)
    start = time.perf_counter()
    header = {"command": "python bench/paper_comparison.py " + " ".join(sys.argv[1:]),
              "revision": git_revision(), "machine": machine(), "quick": args.quick,
              "budget": budget, "settings": AdaptSettings(**budget).to_dict(),
              "protocol": protocol, "workers": args.workers,
              "jobs": len(jobs)}
    print(f"{len(jobs)} jobs on {args.workers} workers", flush=True)
    with results.open("w") as f:
        f.write(json.dumps(header) + "\n")
        rows = run_jobs(jobs, data, budget, args.workers, f, start)
    started = time.perf_counter()
    header["memory"] = peak_memory(data, ("linear-probe", "arena") if args.quick else
                                   protocol.get("methods", METHODS[1:]), args.workers)
    header["memory_wall_s"], header["memory_steps"] = time.perf_counter() - started, MEMORY_STEPS
    header["wall_s"] = time.perf_counter() - start
    results.write_text("\n".join(json.dumps(x) for x in [header] + rows) + "\n")
    from comparison_report import write_report
    write_report(out, header, rows)
    print(f"wrote {out} in {header['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
