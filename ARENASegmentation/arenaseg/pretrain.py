"""Pretrain the embedded backbone on labelled CT scans (``arenaseg pretrain``).

Users with their own labelled scans can train their own base model the same way. The command
writes the weights (safetensors) and a model card (Markdown) with the data checksums, the exact
command, the training time and the per-organ Dice on the training scans.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandBiasFieldd,
                              RandCropByPosNegLabeld, RandGaussianNoised, RandGaussianSmoothd,
                              RandScaleIntensityd, RandShiftIntensityd, SpatialPad)
from tqdm import tqdm

from .backbones import EMBEDDED_BACKBONE, get_spec, state_checksum
from .download import path_checksum
from .errors import ArenaError
from .io.geometry import array_ijk, image_like
from .io.images import read_image
from .io.labels import read_labels_on
from .inference import sliding_window_logits
from .precision import autocast, guard_bf16_defects
from .io.outputs import Outputs, check_writable, write_safetensors, write_text
from .preprocessing import to_canonical, to_input_grid
from .training import run_steps

ATTRIBUTION = ("Training data: the TotalSegmentator test scans (Wasserthal et al., "
               "TotalSegmentator, Radiology: AI 2023; Apache-2.0), whose labels are that model's "
               "own predictions; and dcmqi (QIICR, BSD-3-Clause, (c) 2017 Brigham and Women's "
               "Hospital) where used.")


def load_training_scan(image_path, labels_path, class_values: dict[str, int], prep):
    """Read a scan and its labels, map label values to class indices 1..C, go canonical."""
    image = read_image(image_path)
    labels = array_ijk(read_labels_on(image, labels_path, "labels"))
    classes = np.zeros(labels.shape, np.int64)
    for index, value in enumerate(class_values.values(), start=1):
        classes[labels == value] = index
    x, y, affine = to_canonical(image, prep, image_like(classes.astype(np.uint8), image))
    pad = SpatialPad(spatial_size=prep.roi_size)  # crops need at least the ROI
    return {"image": image, "labels": classes, "x": pad(x).as_tensor(), "y": pad(y).as_tensor(),
            "x_eval": x, "affine": affine}


def augmentation(augment: bool) -> list:
    """MONAI transforms applied to each training crop (dictionary keys ``x``, ``y``). Without
    ``augment``: an intensity shift only. With it, also what differs between patients, scanners
    and contrast phases: rotation (±15° about each axis) and scaling (±15 %), intensity scale,
    gamma (contrast), Gaussian noise, smoothing (reconstruction kernel) and a smooth bias field."""
    shift = [RandShiftIntensityd(keys="x", offsets=0.1, prob=0.5)]
    if not augment:
        return shift
    return [RandAffined(keys=("x", "y"), prob=0.5, rotate_range=(0.26, 0.26, 0.26),
                        scale_range=(0.15, 0.15, 0.15), mode=("bilinear", "nearest"),
                        padding_mode="border"),
            RandScaleIntensityd(keys="x", factors=0.1, prob=0.5), *shift,
            RandAdjustContrastd(keys="x", gamma=(0.7, 1.5), prob=0.5),
            RandGaussianNoised(keys="x", std=0.03, prob=0.3),
            RandGaussianSmoothd(keys="x", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0),
                                sigma_z=(0.5, 1.0), prob=0.2),
            RandBiasFieldd(keys="x", coeff_range=(0.0, 0.1), prob=0.3)]


def _check_request(out: Path, steps: int, lr: float, class_values: dict[str, int], init) -> None:
    """Refuse, before any work, what cannot give a usable backbone."""
    problems = []
    if out.suffix != ".safetensors":
        problems.append(f"--out '{out}' must end in .safetensors (the model card is written "
                        "beside it, with .md)")
    if steps < 1:
        problems.append(f"--steps {steps} must be >= 1")
    if not (math.isfinite(lr) and lr > 0):
        problems.append(f"--lr {lr} must be a finite number > 0")
    if len(set(class_values.values())) < len(class_values):
        problems.append(f"--classes gives one label value to two classes ({class_values}): give "
                        "each class its own value")
    if init and not Path(init).is_file():
        problems.append(f"--init '{init}' is not a file: give a weights file (.safetensors)")
    if problems:
        raise ArenaError("; ".join(problems))


def per_class_dice(pred: np.ndarray, ref: np.ndarray, n_classes: int) -> list[float | None]:
    """Dice per foreground class (MONAI ``compute_dice``); None where the class is absent."""
    p = torch.nn.functional.one_hot(torch.from_numpy(pred.astype(np.int64)), n_classes)
    r = torch.nn.functional.one_hot(torch.from_numpy(ref.astype(np.int64)), n_classes)
    p, r = p.permute(3, 0, 1, 2)[None], r.permute(3, 0, 1, 2)[None]
    dice = compute_dice(p, r, include_background=False, ignore_empty=True)[0]
    return [None if torch.isnan(d) else float(d) for d in dice]


def pretrain(scans: list[tuple[str, str]], class_values: dict[str, int], out: Path,
             steps: int = 1500, lr: float = 2e-3, crops_per_step: int = 2, seed: int = 0,
             augment: bool = False, device: torch.device = torch.device("cpu"),
             init: Path | None = None,
             command: str = "") -> dict:
    """Train the embedded backbone from scratch on ``scans`` (image, labels) pairs.

    Args:
        scans: (image path, label path) pairs; any grid, labels resampled onto each image.
        class_values: output class name → label value in the label files, in output order
            (channel 0 is background).
        out: weights file to write (``.safetensors``); the model card goes to ``out`` with
            suffix ``.md``.
        steps: optimizer steps, each on ``crops_per_step`` random crops (positive:negative 1:1,
            MONAI ``RandCropByPosNegLabel``) of one scan.
        augment: random spatial and intensity transforms on each crop (:func:`augmentation`),
            for a backbone that reads patients, scanners and contrast phases it never saw.
        init: start from these weights instead of from scratch (e.g. to go on training the
            embedded backbone on your own scans); the training and data sections of their model
            card, when there is one, are carried into the new card.
        command: the command line, recorded in the model card.

    Returns:
        A report: per-scan per-class Dice, seconds, checksums.
    """
    out = Path(out)
    card_path = out.with_suffix(".md")
    _check_request(out, steps, lr, class_values, init)
    # Before hours of training: both files must be writable (read-only folder, full disk).
    check_writable(out, "weights", "--out")
    check_writable(card_path, "model card", "--out")
    spec = get_spec(EMBEDDED_BACKBONE)
    prep = spec.preprocessing
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = [load_training_scan(i, l, class_values, prep) for i, l in scans]
    absent = [f"{name} ({value})" for index, (name, value) in enumerate(class_values.items(), 1)
              if not any((scan["labels"] == index).any() for scan in data)]
    where = f"on its scan's grid in any labels file ({', '.join(str(l) for _, l in scans)})"
    if len(absent) == len(class_values):
        raise ArenaError(f"no class of --classes is {where}: check the label values, and that "
                         "each labels file belongs to its scan (it is resampled onto the scan in "
                         "world space)")
    if absent:  # still trained, as background everywhere (e.g. a scan that does not reach it)
        print(f"warning: classes {', '.join(absent)} are not {where}; they learn background only",
              file=sys.stderr)
    model = guard_bf16_defects(spec.build(out_channels=len(class_values) + 1).to(device))
    earlier = None
    if init:
        from safetensors.torch import load_file

        try:
            model.load_state_dict(load_file(str(init)), strict=True)
        except Exception as err:  # not safetensors, an adapter, other classes or network
            raise ArenaError(f"--init '{init}' is not {spec.id} weights with "
                             f"{len(class_values)} classes ({str(err).splitlines()[0][:200]}): "
                             "give weights written by arenaseg pretrain with the same --classes"
                             ) from None
        card = Path(init).with_suffix(".md")
        earlier = {"path": str(init), "sha256": path_checksum(Path(init)),
                   "card": card.read_text(encoding="utf-8") if card.is_file() else None}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    transforms = Compose([
        RandCropByPosNegLabeld(keys=("x", "y"), label_key="y", spatial_size=prep.roi_size,
                               pos=1, neg=1, num_samples=crops_per_step),
        *augmentation(augment)]).set_random_state(seed)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc="pretrain", unit="step")

    def step_loss(step: int) -> torch.Tensor:
        scan = data[rng.integers(len(data))]
        crops = transforms({"x": scan["x"], "y": scan["y"]})
        x = torch.stack([c["x"].as_tensor() for c in crops]).to(device)
        y = torch.stack([c["y"].as_tensor() for c in crops]).to(device)
        with autocast(device):
            return loss_fn(model(x), y)

    def after_step(step: int, loss: torch.Tensor) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")

    run_steps(step_loss, opt, steps, scheduler=sched, after_step=after_step)
    bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    names = list(class_values)
    evaluation = []
    for (image_path, labels_path), scan in zip(scans, data):
        logits = sliding_window_logits(model, scan["x_eval"], prep.roi_size, device)
        pred = logits.argmax(0).numpy()
        pred = array_ijk(to_input_grid(pred, scan["affine"], scan["image"], linear=False))
        dice = per_class_dice(pred, scan["labels"], len(names) + 1)
        evaluation.append({"image": str(image_path), "labels": str(labels_path),
                           "dice": dict(zip(names, dice))})
    model.cpu()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    # Weights and card together or neither: both are verified before either is published.
    with Outputs() as outputs:
        write_safetensors(out, state, {"backbone": spec.id,
                                       "classes": json.dumps(["background"] + names)},
                          what="weights", option="--out", outputs=outputs)
        report = {"backbone": spec.id, "classes": names, "class_values": class_values,
                  "command": command, "init": earlier, "steps": steps, "lr": lr,
                  "crops_per_step": crops_per_step, "seed": seed, "augment": augment,
                  "seconds": round(seconds, 1), "device": str(device), "evaluation": evaluation,
                  "weights_sha256": path_checksum(outputs.temporary(out)),
                  "state_checksum": state_checksum(model),
                  "data": [{"path": str(p), "sha256": path_checksum(Path(p))}
                           for pair in scans for p in pair]}
        write_text(card_path, model_card(report, prep), what="model card", option="--out",
                   outputs=outputs)
        outputs.publish()
    return report


def model_card(report: dict, prep) -> str:
    """The Markdown model card written next to pretrained weights."""
    names = report["classes"]
    lines = [f"# Model card: {report['backbone']}", "",
             "A small MONAI UNet (2.5 M parameters), the network of ARENASegmentation's "
             "embedded backbone, pretrained by `arenaseg pretrain`. It is a CPU-friendly "
             "starting point for few-slice adaptation, not a clinical segmentation model: it saw "
             "very few scans.",
             "", "## Training", "",
             f"- Command: `{report['command']}`",
             f"- Steps: {report['steps']} × {report['crops_per_step']} crops of "
             f"{'×'.join(map(str, prep.roi_size))} voxels, AdamW, one-cycle lr {report['lr']}, "
             f"seed {report['seed']}, Dice + cross-entropy (MONAI `DiceCELoss`)",
             "- Augmentation: " + ("rotation, scaling, intensity scale and shift, gamma, noise, "
                                   "smoothing, bias field (`arenaseg.pretrain.augmentation`)"
                                   if report.get("augment") else "intensity shift"),
             f"- Preprocessing: orientation {prep.orientation}, spacing "
             f"{'×'.join(map(str, prep.spacing_mm))} mm, HU window {list(prep.hu_window)} → [0, 1]",
             f"- Training time: {report['seconds']:.0f} s on {report['device']} "
             f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__})",
             f"- Weights SHA-256: `{report['weights_sha256']}`",
             "", "## Data (SHA-256; a folder's is the hash of its sorted file hashes)", ""]
    lines += [f"- `{d['path']}`: `{d['sha256']}`" for d in report["data"]]
    lines += ["", "Classes (label values): " + ", ".join(
        f"{n} ({v})" for n, v in report["class_values"].items()), "",
              "## Dice on the training scans (not a generalisation estimate)", "",
              "| scan | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for ev in report["evaluation"]:
        cells = ["—" if ev["dice"][n] is None else f"{ev['dice'][n]:.3f}" for n in names]
        lines.append(f"| `{ev['image']}` | " + " | ".join(cells) + " |")
    if report["init"]:
        init = report["init"]
        lines += ["", "## Earlier training", "",
                  f"This run started from `{init['path']}` (SHA-256 `{init['sha256']}`)."]
        if init["card"]:
            sections = init["card"].split("\n## ")
            carried = [sec for sec in sections if sec.startswith(("Training", "Earlier training",
                                                                  "Data"))]
            lines += ["Its model card said:", ""] + [
                "> " + line if line else ">" for sec in carried
                for line in ("#### " + sec.strip()).splitlines()]
    lines += ["", "## Attribution", "", ATTRIBUTION, ""]
    return "\n".join(lines)
