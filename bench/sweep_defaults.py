"""Sweep of the adaptation settings behind the defaults of ``AdaptSettings``.

Runs ``arenaseg.pipeline.adapt`` in-process on ``abdomen_ct`` (k = 3 painted axial slices) for
each configuration and structure, and appends one JSON line per run (Dice on the unpainted slices,
effective rank, seconds) to the output file; ``--summary`` turns that file into a Markdown table.

    python bench/sweep_defaults.py --config '{"lam": 1.0}' --config '{"lam": 2.0}' --out bench/sweep.jsonl
    python bench/sweep_defaults.py --summary bench/sweep.jsonl > bench/SWEEP.md
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from arenaseg import pipeline
from arenaseg.io.annotations import dice, find_annotation, paint_slices
from arenaseg.io.geometry import array_ijk, image_like
from arenaseg.io.images import read_image
from arenaseg.io.labels import read_labels_on
from arenaseg.training import AdaptSettings

STRUCTURES = {"liver": 5, "spleen": 1, "aorta": 52, "urinary_bladder": 21, "iliopsoas_left": 88,
              "inferior_vena_cava": 63}
NEW = ("urinary_bladder", "iliopsoas_left", "inferior_vena_cava")


def run(data: Path, configs: list[dict], structures: list[str], out: Path) -> None:
    ct_path = data / "abdomen_ct/ct.nii.gz"
    ct = read_image(ct_path)
    ref = array_ijk(read_labels_on(ct, data / "abdomen_ct/labels.nii.gz", "labels"))
    with tempfile.TemporaryDirectory() as tmp, open(out, "a") as log:
        for config in configs:
            settings = AdaptSettings(**config)
            for name in structures:
                value = STRUCTURES[name]
                painted = paint_slices(ref, value, 3, axis=2)
                ann = Path(tmp) / "painted.nii.gz"
                sitk.WriteImage(image_like(painted, ct), str(ann))
                start = time.perf_counter()
                result = pipeline.adapt(str(ct_path), str(ann), value, str(Path(tmp) / "seg.nii.gz"),
                                        settings=settings, structure=name, device="cpu")
                seconds = time.perf_counter() - start
                seg = array_ijk(sitk.ReadImage(result.segmentation)) == value
                unpainted = ~find_annotation(painted, value, axis=2).known
                row = {"config": config, "settings": settings.to_dict(), "structure": name,
                       "dice": round(dice(seg, ref == value, unpainted), 4),
                       "rank": result.effective_rank, "initial_rank": result.initial_rank,
                       "seconds": round(seconds, 1)}
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(json.dumps(row), flush=True)


def summary(path: Path) -> str:
    rows = [json.loads(line) for line in open(path)]
    groups = defaultdict(dict)
    for r in rows:
        s = r["settings"]
        key = f"{s['method']}, λ {s['lam']:g}, ρ {s['rho']:g}, η {s['lr']:g}, r0 {s['rank']}, {s['steps']} steps"
        groups[key][r["structure"]] = r
    names = [n for n in STRUCTURES if any(n in g for g in groups.values())]
    lines = ["| settings | " + " | ".join(names) +
             " | mean new | mean all | mean rank | mean s |", "|---|" + "---|" * (len(names) + 4)]
    for key, g in groups.items():
        cells = [f"{g[n]['dice']:.3f} (r {g[n]['rank']})" if n in g else "—" for n in names]
        new = [g[n]["dice"] for n in NEW if n in g]
        every = [r["dice"] for r in g.values()]
        lines.append(f"| {key} | " + " | ".join(cells) +
                     f" | {np.mean(new) if new else float('nan'):.3f} | {np.mean(every):.3f} | "
                     f"{np.mean([r['rank'] for r in g.values()]):.0f} | "
                     f"{np.mean([r['seconds'] for r in g.values()]):.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--config", action="append", default=[], help="JSON of AdaptSettings changes")
    parser.add_argument("--structures", nargs="+", default=list(STRUCTURES))
    parser.add_argument("--out", default=str(Path(__file__).parent / "sweep.jsonl"))
    parser.add_argument("--summary", help="print the Markdown table of a sweep file and exit")
    args = parser.parse_args()
    if args.summary:
        print(summary(Path(args.summary)), end="")
        return
    torch.set_num_threads(2)
    run(Path(args.data), [json.loads(c) for c in args.config] or [{}], args.structures, Path(args.out))


if __name__ == "__main__":
    main()
