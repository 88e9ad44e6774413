"""Merlin's decoder pretrained on base organs, or trained per task from the paint (issue 19,
item 2): leave one patient out on the two shared patients.

For each shared patient, the decoder of ``merlin-resnet152`` (the encoder frozen, its batch
norm with the stored statistics) is pretrained on the *other* patient's labels of the base
organs (``BASE_ORGANS``, those present there) with a multi-class head: started as the
multinomial linear probe on the stages' features (``linear_start``; from its random start the
decoder collapsed to background everywhere), then trained on crops of the cached frozen features,
MONAI ``DiceCELoss(softmax)``, AdamW. Then, on the held-out patient:

- **zero-shot**: Dice per base organ of the pretrained decoder's argmax over the whole scan;
- **head on the pretrained decoder**: the decoder kept, a one-logit head fitted as a logistic
  regression (``fit_logistic``) on its 32 channels at the painted voxels of a new structure, no
  further training;
- **ARENA from the pretrained decoder**: the engine's ``fit`` with its defaults, the decoder
  started as above instead of as the frozen-feature linear probe (``start_decoder``).

Beside them, from ``bench/MERLIN.jsonl`` (the same paint, ``paint_slices``): Fill between slices,
the frozen-feature linear probe and ARENA with the default start (decoder trained per task).
Dice on the unpainted slices after the engine's post-processing, as in ``bench/MERLIN.md``.

    python bench/merlin_decoder_pretraining.py --data ../shared/data --out bench/MERLIN_DECODER.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from arenaseg.backbones import load_backbone
from arenaseg.backbones.merlin import TAPS, MerlinSegmenter, fit_logistic
from arenaseg.backbones.registry import BASE_ORGANS
from arenaseg.config import AdaptSettings
from arenaseg.io.annotations import find_annotation, paint_slices
from arenaseg.io.geometry import array_ijk
from arenaseg.io.images import read_image
from arenaseg.io.labels import read_labels_on
from arenaseg.precision import autocast, guard_bf16_defects
from arenaseg.pretrain import load_training_scan
from arenaseg.preprocessing import Scan
from arenaseg.training import _crop_starts, run_steps, sample_logits

sys.path.insert(0, str(Path(__file__).parent))
from engine_benchmark import git_revision, kept_rows, machine  # noqa: E402
from merlin_benchmark import BACKBONE, SCANS, STRUCTURES, adapt_dice, segment_dice  # noqa: E402

KS = (3, 5)
STEPS, LR, SEED = 1000, 1e-3, 0
DEVICE = torch.device("cpu")


def base_organ_values(data: Path) -> dict[str, int]:
    """Base organ name → TotalSegmentator label value (``label_names.tsv``)."""
    names = dict(line.split("\t")[::-1] for line in (data / "label_names.tsv").read_text().splitlines()
                 if line and not line.startswith("#"))
    return {organ: int(names[organ]) for organ in BASE_ORGANS}


def frozen_backbone() -> MerlinSegmenter:
    """``merlin-resnet152`` with its encoder frozen (so that all of it is cached)."""
    model = load_backbone(BACKBONE)[0]
    model.encoder.requires_grad_(False)
    return model


def fit_softmax(a: torch.Tensor, y: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression of ``y`` ``(N,)`` (0 … classes − 1) on ``a`` ``(N, C)``,
    standardised, ½‖W‖² + Σ log-loss, L-BFGS (``fit_logistic`` for several classes). Returns
    ``(W (classes, C), b (classes,))`` on the raw features."""
    mean, std = a.mean(0), a.std(0) + 1e-6
    a = (a - mean) / std
    w = torch.zeros(classes, a.shape[1], requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ w.T + b, y, reduction="sum") + 0.5 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        w = w / std
        return w, b - w @ mean


def linear_start(model: MerlinSegmenter, cache, y: torch.Tensor, classes: int, rng, most: int = 60_000) -> None:
    """Make the decoder and the multi-class head the multinomial probe on the stages' features at
    ``most`` voxels (half of them in an organ), as the engine's ``start_decoder`` does for one
    class: a decoder trained from its random start collapsed to background in every voxel."""
    organ, other = np.argwhere(y[0].numpy() > 0), np.argwhere(y[0].numpy() == 0)
    coords = np.concatenate([organ[rng.choice(len(organ), most // 2)], other[rng.choice(len(other), most // 2)]])
    points = torch.as_tensor(coords, dtype=torch.float32)
    with torch.no_grad():
        state, _ = cache.crop((0, 0, 0), cache.shape, DEVICE)
        taps = model.encoder_state(None, state=state)["taps"]
        columns = [sample_logits(taps[stage].float().permute(0, 1, 3, 4, 2),
                                 points / torch.tensor([sx, sy, z]))[0].T
                   for stage in model.decoder.stages for z, sx, sy in [TAPS[stage][1]]]
    w, b = fit_softmax(torch.cat(columns, 1), y[0][tuple(coords.T)], classes)
    with torch.no_grad():
        start = 0
        for stage, lateral in zip(model.decoder.stages, model.decoder.lateral):
            n = TAPS[stage][0]
            lateral.weight[:classes] = w[:, start:start + n].view(classes, n, 1, 1, 1)
            lateral.bias[:classes] = 0.0
            start += n
        model.classifier.weight.zero_()
        model.classifier.weight[:, :classes] = torch.eye(classes).view(classes, classes, 1, 1, 1)
        model.classifier.bias.copy_(b)


def pretrain_decoder(data: Path, scan_name: str, organs: dict[str, int], steps: int) -> dict:
    """The decoder and a multi-class head trained on ``scan_name``'s base organs (encoder frozen).

    Returns ``{"state": decoder and head state dict, "classes", "values", "seconds"}``."""
    image, labels = (data / p for p in SCANS[scan_name][:2])
    lab = array_ijk(read_labels_on(read_image(image), labels, "labels"))
    classes = {n: v for n, v in organs.items() if (lab == v).any()}
    model, spec = frozen_backbone(), load_backbone(BACKBONE)[1]
    roi = spec.preprocessing.roi_size
    s = load_training_scan(image, labels, classes, spec.preprocessing)
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    model.classifier = nn.Conv3d(model.classifier.in_channels, len(classes) + 1, 1)
    model = guard_bf16_defects(model).train()
    start = time.perf_counter()
    cache = model.crops(s["x"], DEVICE, roi)
    y = F.pad(s["y"], [p for n, c in zip(reversed(s["y"].shape[1:]), reversed(cache.shape)) for p in (0, c - n)])
    foreground = np.argwhere(y[0].numpy() > 0)
    linear_start(model, cache, y, len(classes) + 1, rng)
    loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)
    params = [*model.decoder.parameters(), *model.classifier.parameters()]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

    def step_loss(step: int) -> torch.Tensor:
        centre = foreground[rng.integers(len(foreground))] if step % 2 else \
            rng.integers(0, cache.shape)
        state, a = cache.crop(_crop_starts(centre, cache.shape, roi, rng), roi, DEVICE)
        with autocast(DEVICE):
            logits = model(state)
        target = y[None, :, a[0]:a[0] + roi[0], a[1]:a[1] + roi[1], a[2]:a[2] + roi[2]]
        return loss_fn(logits.float(), target)

    run_steps(step_loss, opt, steps)
    return {"state": {k: v.detach().clone() for k, v in
                      {**{"decoder." + k: v for k, v in model.decoder.state_dict().items()},
                       **{"classifier." + k: v for k, v in model.classifier.state_dict().items()}}.items()},
            "classes": list(classes), "values": list(classes.values()),
            "seconds": time.perf_counter() - start}


def zero_shot(pre: dict, scan: Scan, lab: np.ndarray) -> dict[str, float]:
    """Dice per base organ present in ``lab`` of the pretrained decoder's argmax."""
    model = frozen_backbone()
    model.classifier = nn.Conv3d(model.classifier.in_channels, len(pre["classes"]) + 1, 1)
    model.load_state_dict(pre["state"], strict=False)
    model.eval()
    logits = model.volume_logits(scan.x, DEVICE)  # (C, X, Y, Z)
    pred = array_ijk(scan.to_input_grid(logits.argmax(0).numpy().astype(np.uint8), linear=False))
    out = {}
    for index, (name, value) in enumerate(zip(pre["classes"], pre["values"]), start=1):
        ref = lab == value
        if ref.any():
            p = pred == index
            out[name] = float(2 * (p & ref).sum() / (p.sum() + ref.sum()))
    return out


def start_from(pre: dict):
    """A ``start_decoder`` that loads the pretrained decoder and fits a one-logit head on its
    channels at the painted voxels (the decoder's output sampled trilinearly, as the engine's
    probe samples the stages)."""
    decoder = {k[len("decoder."):]: v for k, v in pre["state"].items() if k.startswith("decoder.")}

    def start(self: MerlinSegmenter, cache, coords, targets, device, most=200_000, seed=0):
        self.decoder.load_state_dict(decoder)
        with torch.no_grad():
            state, _ = cache.crop((0, 0, 0), cache.shape, device)
            with autocast(device):
                taps = self.encoder_state(None, state=state)["taps"]
                feats = self.decoder(taps).float().permute(0, 1, 3, 4, 2)  # (1, 32, X/2, Y/2, Z)
            points = torch.as_tensor(coords, dtype=torch.float32) / torch.tensor([2.0, 2.0, 1.0])
            columns = sample_logits(feats, points.to(device))[0].T.cpu()
        w, b = fit_logistic(columns, torch.as_tensor(targets, dtype=torch.float32))
        with torch.no_grad():
            self.classifier.weight.copy_(w.view(1, -1, 1, 1, 1))
            self.classifier.bias.fill_(float(b))
    return start


@contextmanager
def decoder_start(start):
    saved = MerlinSegmenter.start_decoder
    MerlinSegmenter.start_decoder = start
    try:
        yield
    finally:
        MerlinSegmenter.start_decoder = saved


def head_only(pre: dict, scan: Scan, ann, ref: np.ndarray) -> float:
    """Dice of the pretrained decoder with a head fitted on the paint, no training."""
    model = frozen_backbone().eval()
    points, targets = ann.points()
    start_from(pre)(model, model.crops(scan.x, DEVICE), scan.points_to_canonical(points), targets, DEVICE)
    prob = torch.sigmoid(model.volume_logits(scan.x, DEVICE)[0]).numpy()
    return segment_dice(scan.to_input_grid(prob), ann, scan, ref)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--out", default="bench/MERLIN_DECODER.md")
    p.add_argument("--steps", type=int, default=STEPS, help="pretraining steps (fewer: a smoke run)")
    args = p.parse_args()
    data, out = Path(args.data), Path(args.out)
    jsonl = out.with_suffix(".jsonl")
    rows, record = kept_rows(jsonl)
    done = {(r["kind"], r["scan"], r.get("label"), r.get("k")) for r in rows}

    organs = base_organ_values(data)
    names = list(SCANS)
    for held in names:
        source = names[1 - names.index(held)]
        image, labels, values, _ = SCANS[held]
        if all(("dice", held, v, k) in done for v in values for k in KS) and \
                ("pretraining", held, None, None) in done:
            continue
        pre = pretrain_decoder(data, source, organs, args.steps)
        ct = read_image(data / image)
        lab = array_ijk(read_labels_on(ct, data / labels, "labels"))
        scan = Scan.from_image(ct, load_backbone(BACKBONE)[1])
        if ("pretraining", held, None, None) not in done:
            record({"kind": "pretraining", "scan": held, "source": source, "classes": pre["classes"],
                    "steps": args.steps, "seconds": pre["seconds"],
                    "zero_shot": zero_shot(pre, scan, lab)})
        for value in values:
            for k in KS:
                if ("dice", held, value, k) in done:
                    continue
                ann = find_annotation(paint_slices(lab, value, k, axis=2), value, axis=2)
                head = head_only(pre, scan, ann, lab == value)
                with decoder_start(start_from(pre)):
                    arena = adapt_dice(ct, ann, lab == value, AdaptSettings())
                record({"kind": "dice", "scan": held, "label": value, "k": k,
                        "head_on_pretrained": head, "arena_from_pretrained": arena})
    out.write_text(report(rows, data, "python bench/merlin_decoder_pretraining.py " + " ".join(sys.argv[1:])))


def report(rows: list[dict], data: Path, command: str) -> str:
    merlin = {(r["scan"], r["label"], r["k"]): r for r in
              map(json.loads, (Path(__file__).parent / "MERLIN.jsonl").read_text().splitlines())
              if r["kind"] == "dice"}
    d = AdaptSettings()
    pre = [r for r in rows if r["kind"] == "pretraining"]
    lines = [
        "# Merlin's decoder: pretrained on the other patient's base organs, or trained per task",
        "",
        f"- Date: {time.strftime('%Y-%m-%d')}; git revision {git_revision()}; rows measured at "
        + ", ".join(sorted({r['revision'] for r in rows})) + "; the default-start, probe and Fill "
        "columns are read from `bench/MERLIN.jsonl` (see `bench/MERLIN.md` for its revision)",
        f"- Machine: {machine()}",
        f"- Command: `{command}`",
        f"- `{BACKBONE}`; the encoder (frozen) never saw either shared patient. The decoder and a "
        f"multi-class head are pretrained on the other patient's base organs (started as the "
        f"multinomial linear probe, then AdamW steps of lr {LR:g} on one 128 × 128 × 64 crop of "
        "the cached frozen features, every other one centred on an organ voxel; DiceCE). ARENA: the engine's defaults "
        f"(r0 = {d.rank}, λ = {d.lam:g}, {d.steps} steps, seed {d.seed}) but the decoder's start. "
        "Dice on the unpainted slices after the engine's post-processing.",
        "",
        "## Zero-shot, leave one patient out",
        "",
        "| held-out scan | pretrained on | steps | seconds (pretraining) | Dice per base organ |",
        "|---|---|---|---|---|",
    ]
    for r in pre:
        organs = ", ".join(f"{n} {v:.3f}" for n, v in r["zero_shot"].items())
        lines.append(f"| {r['scan']} | {r['source']} ({len(r['classes'])} organs) | "
                     f"{r['steps']} | {r['seconds']:.0f} | {organs} |")
    lines += ["", "## A new structure from k painted axial slices", "",
              "| scan | structure | k | Fill between slices | frozen-feature linear probe | head on the "
              "pretrained decoder (no training) | ARENA, decoder started as the probe (default) | "
              "ARENA, decoder pretrained | seconds (pretrained start) |",
              "|---|---|---|---|---|---|---|---|---|"]
    gains, below_fill = [], 0
    for r in (r for r in rows if r["kind"] == "dice"):
        m = merlin.get((r["scan"], r["label"], r["k"]))
        default = m["arena"]["dice"] if m else None
        a = r["arena_from_pretrained"]["dice"]
        if default is not None:
            gains.append(a - default)
            below_fill += a < m["fill"]
        cells = [f"{m['fill']:.3f}" if m else "", f"{m['probe']:.3f}" if m else "",
                 f"{r['head_on_pretrained']:.3f}", f"{default:.3f}" if m else "", f"{a:.3f}",
                 f"{r['arena_from_pretrained']['seconds']:.0f}"]
        lines.append(f"| {r['scan']} | {STRUCTURES[r['label']]} | {r['k']} | " + " | ".join(cells) + " |")
    if gains:
        lines += ["", f"ARENA from the pretrained decoder − ARENA with the default start, mean over "
                  f"{len(gains)} rows: {np.mean(gains):+.3f} (from {min(gains):+.3f} to {max(gains):+.3f}); "
                  f"below it on {sum(g < 0 for g in gains)} rows, below Fill between slices on {below_fill}.",
                  "", "Reading: pretrained on one patient, the decoder's 32 channels keep what tells that "
                  "patient's base organs apart and lose what a new structure on another patient needs "
                  "(the head fitted on them alone, without training, is far below the probe on the "
                  "stages themselves); training from there does not make it up in 120 steps. The "
                  "decoder stays trained per task, started as the frozen-feature linear probe; "
                  "`arenaseg pretrain` stays the small U-Net's."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
