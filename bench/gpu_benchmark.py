"""GPU benchmark: ARENA adaptation of the feature-size-48 SwinUNETR on a 512×512×300 CT.

The abdomen CT of ``../shared/data/abdomen_ct`` is resampled onto a ``--grid`` voxel grid over
the same physical extent (default 512×512×300, a typical clinical CT size), then adapted and
segmented end to end with the engine's pieces: preprocessing onto the backbone's canonical grid
(1.5 mm, HU [−175, 250]), the SwinUNETR (fixed-seed weights: the timing does not depend on the
weights' values), ARENA adapters on the attention ``qkv`` layers with a new head, ``--steps``
training steps on a batch of ``--crops`` crops of ``--crop`` voxels around the liver under bf16
autocast (CUDA) with optional gradient checkpointing, then sliding-window inference and the way
back onto the input grid.

It writes ``--report`` (Markdown) and the same figures as JSON next to it: machine, command, git
revision, seconds per step, end-to-end adapt-and-segment seconds and peak GPU memory. Targets on
one modern GPU: adapt-and-segment ≤ 60 s, peak GPU memory ≤ 8 GB.

With ``--engine BACKBONE`` it times the engine's own ``adapt`` instead (read, resample onto the
backbone's grid, cache, train with the defaults on 3 painted axial liver slices, segment, write),
e.g. on the default ``merlin-resnet152``: one call from the input file to the written
segmentation, wall seconds and peak GPU memory, in ``--report`` (default ``bench/GPU_ENGINE.md``).

    python bench/gpu_benchmark.py                      # on a CUDA machine: the real figures
    python bench/gpu_benchmark.py --engine merlin-resnet152   # the default backbone, end to end
    python bench/gpu_benchmark.py --device cpu --grid 128 128 64 --steps 2 --feature-size 12 \\
        --report /tmp/gpu_smoke.md                     # a quick end-to-end check on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ARENASegmentation"))

from arenaseg.config import AdapterSettings  # noqa: E402
from arenaseg.adapters import GateSteps, adapter_parameters, inject_adapters  # noqa: E402
from arenaseg.backbones import load_backbone  # noqa: E402
from arenaseg.methods import replace_head  # noqa: E402
from arenaseg.inference import pick_device, sliding_window_logits  # noqa: E402
from arenaseg.precision import autocast  # noqa: E402
from arenaseg.preprocessing import to_canonical, to_input_grid  # noqa: E402

DATA = Path(os.environ.get("ARENASEG_DATA", ROOT.parent / "shared" / "data"))
LIVER = 5


def resample_to_grid(image: sitk.Image, size, linear: bool) -> sitk.Image:
    """``image`` on a ``size`` voxel grid over the same physical extent and direction."""
    old_size, old_spacing = np.array(image.GetSize()), np.array(image.GetSpacing())
    spacing = old_size * old_spacing / np.array(size)
    origin = np.array(image.GetOrigin()) + np.array(image.GetDirection()).reshape(3, 3) @ \
        ((spacing - old_spacing) / 2)
    return sitk.Resample(image, [int(s) for s in size], sitk.Transform(),
                         sitk.sitkLinear if linear else sitk.sitkNearestNeighbor,
                         origin.tolist(), spacing.tolist(), image.GetDirection(),
                         -1024.0 if linear else 0, image.GetPixelID())


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    text = f"{platform.node()} ({platform.system()} {platform.release()}, {cpu}, " \
           f"{os.cpu_count()} CPUs), torch {torch.__version__}"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        text += f", {p.name} ({p.total_memory / 2**30:.1f} GiB), CUDA {torch.version.cuda}"
    return text


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"],
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> dict:
    from monai.losses import DiceCELoss

    device = pick_device(args.device)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ct = resample_to_grid(sitk.ReadImage(str(DATA / "abdomen_ct" / "ct.nii.gz")), args.grid, True)
    labels = resample_to_grid(sitk.ReadImage(str(DATA / "abdomen_ct" / "labels.nii.gz")),
                              args.grid, False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t_start = time.perf_counter()

    # adapt: canonical grid, backbone, adapters, training steps
    model, spec = load_backbone("swinunetr", feature_size=args.feature_size, out_channels=29,
                                use_checkpoint=args.checkpointing)
    prep = spec.preprocessing
    x, y, affine = to_canonical(ct, prep, labels)
    target = (y == LIVER).float()
    layers = inject_adapters(model, spec.targets, rank=args.rank)
    gates = GateSteps(layers.values())
    head = replace_head(model, spec, None)
    model.to(device)
    trainable = adapter_parameters(layers) + list(head.parameters())
    if args.train_decoder:
        import re

        trainable += [p for n, p in model.named_parameters()
                      if any(re.search(r, n) for r in spec.decoder)]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    loss_fn = DiceCELoss(sigmoid=True)
    crop = np.array(args.crop)
    shape = np.array(x.shape[1:])
    liver = np.argwhere(target[0].numpy() > 0)
    step_times = []
    model.train()
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        centres = liver[rng.integers(len(liver), size=args.crops)]
        starts = np.clip(centres - crop // 2, 0, np.maximum(shape - crop, 0))
        xb = torch.stack([x[:, s[0]:s[0] + crop[0], s[1]:s[1] + crop[1], s[2]:s[2] + crop[2]]
                          for s in starts]).to(device)
        yb = torch.stack([target[:, s[0]:s[0] + crop[0], s[1]:s[1] + crop[1], s[2]:s[2] + crop[2]]
                          for s in starts]).to(device)
        with autocast(device):
            loss = loss_fn(model(xb).float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        gates.step(args.rho * args.lr, args.lr * args.lam)
        sync(device)
        step_times.append(time.perf_counter() - t0)
    sync(device)
    t_adapted = time.perf_counter()

    # segment: sliding window on the canonical grid, back onto the 512×512×300 input grid
    for layer in layers.values():
        layer.merge()
    prob = torch.sigmoid(sliding_window_logits(model, x, prep.roi_size, device)[0]).numpy()
    seg = to_input_grid((prob > 0.5).astype(np.uint8), affine, ct, linear=False)
    sync(device)
    t_end = time.perf_counter()
    assert seg.GetSize() == ct.GetSize()
    steady = step_times[1:] or step_times
    return {
        "machine": machine(device), "device": str(device),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
        "git_revision": git_revision(),
        "grid": list(args.grid), "canonical_grid": [int(s) for s in x.shape[1:]],
        "feature_size": args.feature_size, "steps": args.steps, "crops_per_step": args.crops,
        "crop": list(args.crop), "gradient_checkpointing": args.checkpointing,
        "train_decoder": args.train_decoder, "bf16_autocast": device.type == "cuda",
        "seconds_per_step": float(np.median(steady)), "first_step_seconds": step_times[0],
        "adapt_seconds": t_adapted - t_start, "segment_seconds": t_end - t_adapted,
        "adapt_and_segment_seconds": t_end - t_start,
        "peak_gpu_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                if device.type == "cuda" else None),
        "adapter_layers": len(layers),
    }


def run_engine(args) -> dict:
    """``arenaseg.pipeline.adapt`` on ``args.engine`` with the engine's defaults (see the module
    text); returns the figures for :func:`engine_report`."""
    import tempfile

    from arenaseg.io.annotations import paint_slices
    from arenaseg.config import AdaptSettings
    from arenaseg.io.geometry import array_ijk, image_like
    from arenaseg.pipeline import adapt

    device = pick_device(args.device)
    ct = resample_to_grid(sitk.ReadImage(str(DATA / "abdomen_ct" / "ct.nii.gz")), args.grid, True)
    labels = resample_to_grid(sitk.ReadImage(str(DATA / "abdomen_ct" / "labels.nii.gz")),
                              args.grid, False)
    settings = AdaptSettings(**({"steps": args.steps} if args.steps else {}))
    with tempfile.TemporaryDirectory() as tmp:
        image, paint, seg = (Path(tmp) / n for n in ("ct.nii.gz", "paint.nii.gz", "seg.nii.gz"))
        sitk.WriteImage(ct, str(image))
        sitk.WriteImage(image_like(paint_slices(array_ijk(labels), LIVER, 3, axis=2), ct), str(paint))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        result = adapt(str(image), str(paint), LIVER, str(seg), settings=settings,
                       backbone=args.engine, device=str(device))
        seconds = time.perf_counter() - start
    return {"machine": machine(device), "device": str(device), "backbone": args.engine,
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
            "git_revision": git_revision(), "grid": list(args.grid), "steps": settings.steps,
            "adapt_and_segment_seconds": seconds, "effective_rank": sum(result.ranks.values()),
            "training_parts": result.training_parts,
            "peak_gpu_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                    if device.type == "cuda" else None)}


def engine_report(r: dict) -> str:
    gpu = r["peak_gpu_memory_gib"]
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in r["training_parts"].items())
    return "\n".join([
        f"# GPU benchmark: the engine's `adapt` on `{r['backbone']}`", "",
        "Written by `bench/gpu_benchmark.py --engine` (see its docstring): one `adapt` call from "
        "the input file to the written segmentation, engine defaults, 3 painted axial liver slices.",
        "", f"- Machine: {r['machine']}", f"- Command: `{r['command']}`",
        f"- Git revision: {r['git_revision']}", f"- Input grid {r['grid']}; {r['steps']} steps; "
        f"effective rank found {r['effective_rank']}; training: {parts}.", "",
        "| Device | Adapt and segment (s) | Peak GPU memory (GiB) |", "|---|---|---|",
        f"| {r['device']} | {r['adapt_and_segment_seconds']:.1f} | "
        f"{'n/a (CPU)' if gpu is None else f'{gpu:.2f}'} |", ""])


def report(r: dict) -> str:
    gpu = r["peak_gpu_memory_gib"]
    lines = [
        "# GPU benchmark: ARENA on the feature-size-48 SwinUNETR",
        "",
        "Written by `bench/gpu_benchmark.py` (see its docstring for what is timed). "
        "Targets on one modern GPU: adapt-and-segment of a 512×512×300 CT ≤ 60 s, "
        "peak GPU memory ≤ 8 GB.",
        "",
        f"- Machine: {r['machine']}",
        f"- Command: `{r['command']}`",
        f"- Git revision: {r['git_revision']}",
        f"- Input grid {r['grid']} → canonical grid {r['canonical_grid']} (1.5 mm); feature size "
        f"{r['feature_size']}; {r['adapter_layers']} adapted layers; {r['steps']} steps of "
        f"{r['crops_per_step']} crops of {r['crop']} voxels; gradient checkpointing "
        f"{'on' if r['gradient_checkpointing'] else 'off'}; decoder "
        f"{'trained' if r['train_decoder'] else 'frozen'}; bf16 autocast "
        f"{'on' if r['bf16_autocast'] else 'off'}.",
        "",
        "| Device | Seconds per step | Adapt (s) | Segment (s) | Adapt and segment (s) | Peak GPU memory (GiB) |",
        "|---|---|---|---|---|---|",
        f"| {r['device']} | {r['seconds_per_step']:.2f} | {r['adapt_seconds']:.1f} | "
        f"{r['segment_seconds']:.1f} | {r['adapt_and_segment_seconds']:.1f} | "
        f"{'n/a (CPU)' if gpu is None else f'{gpu:.2f}'} |",
        "",
    ]
    if r["device"] == "cpu":
        lines += ["This run was on the CPU: it checks the script end to end; the GPU figures are "
                  "not measured by it.", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--grid", type=int, nargs=3, default=(512, 512, 300))
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: 60; with --engine the engine's default)")
    p.add_argument("--feature-size", type=int, default=48)
    p.add_argument("--crops", type=int, default=2, help="crops per step (batch)")
    p.add_argument("--crop", type=int, nargs=3, default=(96, 96, 96))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--lam", type=float, default=AdapterSettings.lam)
    p.add_argument("--rho", type=float, default=AdapterSettings.rho)
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="turn gradient checkpointing off")
    p.add_argument("--train-decoder", action="store_true")
    p.add_argument("--engine", metavar="BACKBONE",
                   help="time the engine's own adapt on this backbone (e.g. merlin-resnet152)")
    p.add_argument("--report", type=Path, default=None,
                   help="default bench/GPU.md, with --engine bench/GPU_ENGINE.md")
    args = p.parse_args(argv)
    if args.engine:
        result, write = run_engine(args), engine_report
    else:
        args.steps = args.steps or 60
        result, write = run(args), report
    out = args.report or ROOT / "bench" / ("GPU_ENGINE.md" if args.engine else "GPU.md")
    out.write_text(write(result))
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(write(result))


if __name__ == "__main__":
    main()
