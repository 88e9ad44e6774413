"""Fine-tuning methods behind one interface: which parameters of the frozen backbone train, and
what runs after each optimizer step.

=============  ==========================================================  ====================
method         trains (always with the new head)                           after each step
=============  ==========================================================  ====================
zero-shot      nothing: the head is the backbone's own output row          (no training)
linear-probe   the head only
bitfit         every bias (Zaken et al. 2022)
affine-ln      the affine scale and shift of every normalisation layer;
               a norm without one (MONAI's default ``InstanceNorm3d``)
               gets one, starting at the identity
full           every parameter
lora           PEFT LoRA (``peft.inject_adapter_in_model``) on
               ``spec.targets``, rank r0, scaling 1
adalora        PEFT AdaLoRA SVD triplets on ``spec.targets`` plus its      PEFT ``RankAllocator``
               orthogonality penalty; Conv3d through :class:`SVDConv3d`    (budget schedule)
arena          :class:`~arenaseg.adapters.ArenaLayer` A and B              proximal step on v
=============  ==========================================================  ====================

PEFT's AdaLoRA serves Linear and Conv2d only, and adds its orthogonality penalty only when the
model's output has a ``.loss``; a segmentation network returns a tensor, so :class:`Tuning` adds
the same penalty (:func:`orthogonality_penalty`) to the loss itself, and a small subclass of
PEFT's ``SVDConv2d`` gives Conv3d layers the same triplets. Both are tested against PEFT on
layers PEFT supports.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import ArenaLayer, effective_ranks, inject_adapters, proximal_step
from .backbones import BackboneSpec, replace_head
from .errors import ArenaError

METHODS = ("zero-shot", "linear-probe", "bitfit", "affine-ln", "full", "lora", "adalora", "arena")
ADAPTER_METHODS = ("lora", "adalora", "arena")
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _peft_adalora():
    from peft import AdaLoraConfig
    from peft.tuners.adalora.layer import RankAllocator, SVDConv2d, SVDLinear

    return AdaLoraConfig, RankAllocator, SVDConv2d, SVDLinear


def _svd_conv3d_class():
    _, _, SVDConv2d, _ = _peft_adalora()

    class SVDConv3d(SVDConv2d):
        """PEFT's AdaLoRA triplet ``ΔW = B·Diag(E)·A · α/r`` on a frozen ``nn.Conv3d``: ``A`` is
        ``(r, in_channels·kD·kH·kW)``, ``E`` ``(r, 1)``, ``B`` ``(out_channels, r)``; the rest
        (merge, unmerge, ``get_delta_weight``, the names PEFT's ``RankAllocator`` looks for) is
        PEFT's ``SVDConv2d``."""

        def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
            super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)
            # SVDConv2d sizes A for kH·kW taps; a 3-D kernel has kD·kH·kW
            taps = math.prod(self.get_base_layer().kernel_size)
            a = self.lora_A[adapter_name]
            self.lora_A[adapter_name] = nn.Parameter(a.new_empty(r, self.in_features * taps))
            nn.init.normal_(self.lora_A[adapter_name], mean=0.0, std=0.02)

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            result = self.base_layer(x, *args, **kwargs)
            if self.disable_adapters or self.merged:
                return result
            base = self.get_base_layer()
            for name in self.active_adapters:
                if name in self.lora_A:
                    delta = self.get_delta_weight(name).to(x.dtype)
                    result = result + F.conv3d(self.lora_dropout[name](x), delta, None, base.stride,
                                               base.padding, base.dilation, base.groups)
            return result

    return SVDConv3d


def orthogonality_penalty(model: nn.Module, weight: float) -> torch.Tensor:
    """AdaLoRA's regulariser (Zhang et al. 2023, eq. 7 as in PEFT's ``AdaLoraModel.forward``):
    ``weight`` × mean over every ``lora_A`` / ``lora_B`` of ``‖PᵀP − I‖_F`` (``AAᵀ`` for A,
    ``BᵀB`` for B). Returns a scalar tensor (0 when the model has no AdaLoRA layer)."""
    terms = []
    for name, p in model.named_parameters():
        if p.requires_grad and (".lora_A." in name or ".lora_B." in name) and p.dim() == 2:
            cov = p @ p.T if ".lora_A." in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=p.device,
                                                                  dtype=p.dtype)))
    return weight * torch.stack(terms).mean() if terms else torch.zeros(())


def _matching(model: nn.Module, patterns) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv3d)) and any(re.search(p, name) for p in patterns)]


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class Tuning:
    """A backbone prepared for one method: its trainable parameters, the extra loss term and the
    hook after each optimizer step. Build it with :func:`prepare`.

    Attributes:
        method: one of :data:`METHODS`.
        model: the backbone, modified in place (adapters injected, head replaced).
        head: the new one-channel head ``(B, C, X, Y, Z) → (B, 1, X, Y, Z)``.
        layers: adapted layer name → adapter module (ArenaLayer or PEFT layer); empty otherwise.
    """

    def __init__(self, method: str, model: nn.Module, head: nn.Module, layers: dict,
                 allocator=None, orth_weight: float = 0.0):
        self.method, self.model, self.head, self.layers = method, model, head, layers
        self.allocator, self.orth_weight = allocator, orth_weight
        self.rank_pattern = None

    def parameters(self) -> list[nn.Parameter]:
        """The block the optimizer updates (ARENA's gates ``v`` excluded: they take proximal
        steps)."""
        gates = {id(layer.v) for layer in self.layers.values() if isinstance(layer, ArenaLayer)}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in gates]

    def penalty(self) -> torch.Tensor | float:
        """Extra loss term: AdaLoRA's orthogonality penalty; 0 for the other methods."""
        return orthogonality_penalty(self.model, self.orth_weight) if self.allocator else 0.0

    def after_step(self, step: int, lr: float, settings) -> None:
        """ARENA: ``v ← ξ(v − ρ∇v L, ηλ)`` (poster eq. 5). AdaLoRA: PEFT's importance update and
        budget masking (the logic of ``AdaLoraModel.update_and_allocate``), called after the
        optimizer step while the gradients are still there."""
        if self.method == "arena":
            proximal_step(self.layers.values(), settings.rho, lr * settings.lam)
        elif self.allocator is not None:
            cfg = self.allocator.peft_config
            final = cfg.total_step - cfg.tfinal
            if step < final:
                _, pattern = self.allocator.update_and_allocate(self.model, step)
                self.rank_pattern = pattern or self.rank_pattern
            elif step == final:
                _, self.rank_pattern = self.allocator.update_and_allocate(self.model, step, force_mask=True)
                self.allocator.reset_ipt()
            elif self.rank_pattern:
                self.allocator.mask_using_rank_pattern(self.model, self.rank_pattern)

    def ranks(self) -> dict[str, int]:
        """Effective rank per adapted layer: non-zero gates (ARENA), non-zero singular values
        (AdaLoRA), the fixed rank (LoRA); empty for the other methods."""
        if self.method == "arena":
            return effective_ranks(self.layers)
        if self.method == "adalora":
            return {n: int(torch.count_nonzero(layer.lora_E["default"].detach()))
                    for n, layer in self.layers.items()}
        return {n: int(layer.r["default"]) for n, layer in self.layers.items()}

    def initial_ranks(self) -> dict[str, int]:
        """Allocated rank r0 per adapted layer."""
        if self.method == "arena":
            return {n: layer.rank for n, layer in self.layers.items()}
        return {n: int(layer.r["default"]) for n, layer in self.layers.items()}

    def trainable_parameters(self) -> int:
        """Number of trained values (gates included)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def active_parameters(self) -> int:
        """Trained values that still act: ARENA's switched-off components and AdaLoRA's masked
        triplets are not counted."""
        total = self.trainable_parameters()
        for layer in self.layers.values():
            if self.method == "arena":
                a, b, v = layer.lora_A.weight, layer.lora_B.weight, layer.v
            elif self.method == "adalora":
                a, b, v = layer.lora_A["default"], layer.lora_B["default"], layer.lora_E["default"]
            else:
                continue
            off = v.numel() - int(torch.count_nonzero(v.detach()))
            total -= off * (a[0].numel() + b.shape[0] + 1)
        return total

    def state(self) -> dict[str, torch.Tensor]:
        """What an adapter file stores: every trained tensor by its name in the model (ARENA:
        pruned to the active components, layers at rank 0 left out)."""
        if self.method == "arena":
            for layer in self.layers.values():
                layer.prune()
        dead = {n for n, r in self.ranks().items() if r == 0} if self.method == "arena" else set()
        return {name: p.detach().cpu().contiguous() for name, p in self.model.named_parameters()
                if p.requires_grad and name.rpartition(".lora_")[0] not in dead
                and not (name.endswith(".v") and name[:-2] in dead)}

    def stored_ranks(self) -> dict[str, int]:
        """Rank of each layer as stored by :meth:`state` (what :func:`prepare` needs back)."""
        if self.method == "arena":
            return {n: r for n, r in self.ranks().items() if r > 0}
        return self.initial_ranks()

    def merge(self) -> None:
        """Fold the adapters into the backbone weights for inference."""
        for layer in self.layers.values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()


def _norm_affine(model: nn.Module) -> list[nn.Parameter]:
    params = []
    for module in model.modules():
        if isinstance(module, NORMS):
            if getattr(module, "weight", None) is None:  # e.g. MONAI's InstanceNorm3d(affine=False)
                ref = next(model.parameters())
                module.weight = nn.Parameter(torch.ones(module.num_features, device=ref.device))
                module.bias = nn.Parameter(torch.zeros(module.num_features, device=ref.device))
                module.affine = True
            params += [module.weight, module.bias]
    return params


def _inject_adalora(model: nn.Module, names: list[str], ranks: dict[str, int], steps: int):
    AdaLoraConfig, RankAllocator, _, SVDLinear = _peft_adalora()
    SVDConv3d = _svd_conv3d_class()
    r0 = max(ranks.values())
    cfg = AdaLoraConfig(init_r=r0, target_r=max(1, r0 // 2), lora_alpha=r0, total_step=max(steps, 3),
                        tinit=max(1, steps // 10), tfinal=max(1, steps // 5), deltaT=1,
                        target_modules=names)
    layers = {}
    for name in names:
        base = model.get_submodule(name)
        cls = SVDLinear if isinstance(base, nn.Linear) else SVDConv3d
        layer = cls(base, "default", config=cfg, r=ranks[name], lora_alpha=cfg.lora_alpha)
        _set_child(model, name, layer)
        layers[name] = layer
    return layers, RankAllocator(model, cfg, "default"), cfg.orth_reg_weight


def _inject_lora(model: nn.Module, names: list[str], ranks: dict[str, int]) -> dict:
    from peft import LoraConfig, inject_adapter_in_model

    r0 = max(ranks.values())  # LoRA's rank is the same on every layer
    cfg = LoraConfig(r=r0, lora_alpha=r0, target_modules=names, lora_dropout=0.0)  # scaling α/r = 1
    inject_adapter_in_model(cfg, model)
    return {name: model.get_submodule(name) for name in names}


def prepare(model: nn.Module, spec: BackboneSpec, settings, structure: str | None = None,
            ranks: dict[str, int] | None = None) -> Tuning:
    """Make ``model`` (a backbone from :func:`~arenaseg.backbones.load_backbone`) ready to adapt
    with ``settings.method``: new head, adapters injected, the method's parameters trainable.

    Args:
        settings: :class:`~arenaseg.training.AdaptSettings` (method, rank, v0, seed, steps,
            train_decoder, targets).
        structure: a class name of the backbone starts the head from its pretrained row.
        ranks: rank per layer to rebuild a saved adapter (:meth:`Tuning.stored_ranks`);
            default ``settings.rank`` on every layer matching the targets.

    Raises:
        ArenaError: zero-shot for a structure the backbone does not know; no layer matches the
            adapter targets.
    """
    method = settings.method
    if method == "zero-shot" and spec.pretrained_channel(structure) is None:
        known = [c for c in spec.classes if spec.pretrained_channel(c) is not None]
        raise ArenaError(f"zero-shot needs a structure the backbone '{spec.id}' knows (one of "
                         f"{', '.join(known)}), not '{structure}': give --structure with one "
                         "of these names, or choose a method that trains")
    for p in model.parameters():
        p.requires_grad_(False)
    layers, allocator, orth = {}, None, 0.0
    with torch.random.fork_rng():  # the same seed gives the same initialisation
        torch.manual_seed(settings.seed)
        if method in ADAPTER_METHODS and ranks != {}:  # {}: a saved ARENA adapter at rank 0
            targets = settings.targets or spec.targets
            names = list(ranks) if ranks is not None else _matching(model, targets)
            if not names:
                raise ArenaError(f"no Linear or Conv3d layer of backbone '{spec.id}' matches the "
                                 f"adapter targets {list(targets)}: check --targets")
            ranks = ranks if ranks is not None else {n: settings.rank for n in names}
            if method == "arena":
                layers = inject_adapters(model, [f"^{re.escape(n)}$" for n in names], ranks, settings.v0)
                for layer in layers.values():
                    layer.v.requires_grad_(True)
                    for p in (layer.lora_A.weight, layer.lora_B.weight):
                        p.requires_grad_(True)
            elif method == "lora":
                layers = _inject_lora(model, names, ranks)
            else:
                layers, allocator, orth = _inject_adalora(model, names, ranks, settings.steps)
        head = replace_head(model, spec, structure)
    if method == "zero-shot":
        head.requires_grad_(False)
    elif method == "bitfit":
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("bias") or p.requires_grad)
    elif method == "affine-ln":
        for p in _norm_affine(model):
            p.requires_grad_(True)
    elif method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    if getattr(settings, "train_decoder", False):
        for name, module in model.named_modules():
            if any(re.search(p, name) for p in getattr(spec, "decoder", ())):
                module.requires_grad_(True)
    return Tuning(method, model, head, layers, allocator, orth)


def load_state(tuning: Tuning, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved tensors (from :meth:`Tuning.state`) into a freshly prepared ``tuning``.

    Raises:
        ArenaError: a tensor is missing, unexpected or of the wrong shape.
    """
    expected = {n: p for n, p in tuning.model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [n for n in set(expected) & set(tensors) if expected[n].shape != tensors[n].shape]
    if missing or unexpected or wrong:
        raise ArenaError(f"adapter '{source}' does not fit its method '{tuning.method}' "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape "
                         f"{wrong[:3]}): save it again with 'arenaseg adapt --adapter-out'")
    with torch.no_grad():
        for name, p in expected.items():
            p.copy_(tensors[name])
