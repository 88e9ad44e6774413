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
arena          :class:`~arenaseg.adapters.ArenaLayer` A and B, started     proximal step on v
               at the first batch's gradient SVD
=============  ==========================================================  ====================

Each method is one class (:class:`Method` and its subclasses), registered by its name in
:data:`METHOD_CLASSES` (the names are :data:`arenaseg.config.METHODS`). A class owns its
injection, its trainable parameters, its hook after each optimizer step, its ranks and the
tensors an adapter file stores; :func:`prepare` builds the one a settings object names. The
training loop (:mod:`arenaseg.training`), the adapter file, the command line, the worker and the
Slicer module are the same for every method. Anchor: PEFT's one tuner package per method.

PEFT's AdaLoRA serves Linear and Conv2d only, and adds its orthogonality penalty only when the
model's output has a ``.loss``; a segmentation network returns a tensor, so :class:`AdaLoRA`
adds the same penalty (:func:`orthogonality_penalty`) to the loss itself, and a small subclass
of PEFT's ``SVDConv2d`` gives Conv3d layers the same triplets. Both are tested against PEFT on
layers PEFT supports.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import ArenaLayer, GateSteps, effective_ranks, inject_adapters
from .config import ADAPTER_METHODS, METHODS, AdaptSettings  # noqa: F401 (re-exported)
from .errors import ArenaError
from .precision import bf16_defective
from .backbones.registry import REGISTRY, BackboneSpec

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
                    inputs = self.lora_dropout[name](x)
                    exact = bf16_defective(inputs, base.kernel_size)
                    with torch.autocast("cpu", enabled=False) if exact else contextlib.nullcontext():
                        result = result + F.conv3d(inputs.float() if exact else inputs,
                                                   delta.float() if exact else delta, None,
                                                   base.stride, base.padding, base.dilation, base.groups)
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


def replace_head(model: nn.Module, spec: BackboneSpec, structure: str | None = None) -> nn.Conv3d:
    """Put a new trainable one-channel 1×1×1 head (logit of the target structure) in place of
    ``spec.head``.

    When ``structure`` is one of the backbone's pretrained classes, the head starts from that
    class's pretrained output row (the paper's protocol for base organs, so the first prediction
    is the backbone's zero-shot one): for a softmax head (``multilabel=False``) the row minus the
    background row (the sigmoid of this difference is the two-class softmax of the pretrained
    head); for a sigmoid head the row itself. Otherwise it starts with PyTorch's default
    initialisation.

    Returns:
        The new head (``in_channels`` → 1).
    """
    old = model.get_submodule(spec.head)
    head = nn.Conv3d(old.in_channels, 1, kernel_size=1).to(old.weight.device)
    c = spec.pretrained_channel(structure)
    if c is not None:
        with torch.no_grad():
            head.weight.copy_(old.weight[c:c + 1])
            head.bias.copy_(old.bias[c:c + 1])
            if not spec.multilabel:
                head.weight.sub_(old.weight[0:1])
                head.bias.sub_(old.bias[0:1])
    _set_child(model, spec.head, head)
    return head


class Method:
    """A backbone prepared for one method: its trainable parameters, the extra loss term, the
    hook after each optimizer step, its ranks and the tensors an adapter file stores. Build one
    with :func:`prepare` (or a subclass's :meth:`prepare`); the base class trains the head only
    (``linear-probe``).

    Attributes:
        name: the method's name (one of :data:`arenaseg.config.METHODS`).
        adapters: the method injects adapters with a rank (:data:`~arenaseg.config.ADAPTER_METHODS`).
        model: the backbone, modified in place (adapters injected, head replaced).
        head: the new one-channel head ``(B, C, X, Y, Z) → (B, 1, X, Y, Z)`` (a 1×1×1 Conv3d).
        layers: adapted layer name → adapter module (ArenaLayer or PEFT layer), in module order;
            empty for the methods without adapters.
    """

    name = "linear-probe"
    adapters = False

    #: learning-rate warm-up steps (:data:`WARMUP_STEPS` on a backbone whose decoder starts
    #: untrained, else 0)
    warmup = 0
    #: the backbone's decoder is untrained (``spec.trains_decoder``, not loaded from an adapter):
    #: training starts it as the frozen-feature linear probe where the network can
    #: (``model.start_decoder``)
    fresh_decoder = False

    def __init__(self, model: nn.Module, head: nn.Module, layers: dict | None = None):
        self.model, self.head, self.layers = model, head, layers or {}

    @property
    def method(self) -> str:
        """The method's name (as :attr:`name`; stored in adapter files)."""
        return self.name

    @classmethod
    def prepare(cls, model: nn.Module, spec: BackboneSpec, settings: AdaptSettings,
                structure: str | None = None, ranks: dict[str, int] | None = None) -> "Method":
        """Make ``model`` ready to train with this method: every weight frozen; adapters
        injected (adapter methods) and the new head (:func:`replace_head`), both initialised
        under ``settings.seed``; then this method's parameters made trainable
        (:meth:`set_trainable`), and the decoder with ``settings.train_decoder``.

        Args, Raises: see :func:`prepare`.
        """
        cls.check(spec, structure)
        for p in model.parameters():
            p.requires_grad_(False)
        parts = {}
        with torch.random.fork_rng():  # the same seed gives the same initialisation
            torch.manual_seed(settings.seed)
            head = replace_head(model, spec, structure)  # first: the same head for every r0
            if cls.adapters and ranks != {}:  # {}: a saved ARENA adapter at rank 0
                targets = settings.targets or spec.targets
                names = list(ranks) if ranks is not None else _matching(model, targets)
                if not names:
                    raise ArenaError(f"no Linear or Conv3d layer of backbone '{spec.id}' matches the "
                                     f"adapter targets {list(targets)}: check --targets")
                ranks = ranks if ranks is not None else {n: settings.rank for n in names}
                parts = cls.inject(model, names, ranks, settings)
                head.requires_grad_(True)  # PEFT's injection freezes all but its own layers
        method = cls(model, head, **parts)
        method.set_trainable()
        if settings.train_decoder or spec.trains_decoder:
            for name, module in model.named_modules():
                if any(re.search(p, name) for p in spec.decoder):
                    module.requires_grad_(True)
        if spec.trains_decoder and method.parameters():
            method.warmup, method.fresh_decoder = WARMUP_STEPS, True
        return method

    @classmethod
    def check(cls, spec: BackboneSpec, structure: str | None) -> None:
        """Refuse what this method cannot do on ``spec`` (before anything changes)."""

    @classmethod
    def inject(cls, model: nn.Module, names: list[str], ranks: dict[str, int],
               settings: AdaptSettings) -> dict:
        """Wrap the layers ``names`` (at ``ranks``) in this method's adapters, in place; returns
        the constructor's keyword arguments (``layers``, …). Adapter methods only."""
        raise NotImplementedError

    def set_trainable(self) -> None:
        """Switch on the parameters this method trains (the head and adapters are trainable
        as made)."""

    def parameters(self) -> list[nn.Parameter]:
        """The block the optimizer updates."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def penalty(self) -> torch.Tensor | float:
        """Extra loss term (scalar); 0 unless the method has one."""
        return 0.0

    def initialise(self, batch_loss) -> None:
        """Runs once before the first step with ``batch_loss()``, which returns the loss of one
        batch (a scalar tensor with its graph); nothing unless the method starts from data."""

    def after_step(self, step: int, lr: float, settings: AdaptSettings | None) -> None:
        """Runs after each optimizer step ``step`` (1-based) at learning rate ``lr``, while the
        gradients of the step are still there; nothing unless the method has a hook."""

    def ranks(self) -> dict[str, int]:
        """Effective rank per adapted layer; empty for the methods without adapters."""
        return {}

    def initial_ranks(self) -> dict[str, int]:
        """Allocated rank r0 per adapted layer."""
        return {n: int(layer.r["default"]) for n, layer in self.layers.items()}

    def trainable_parameters(self) -> int:
        """Number of trained values (gates included)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def active_parameters(self) -> int:
        """Trained values that still act (switched-off components not counted)."""
        return self.trainable_parameters()

    def prune(self) -> None:
        """Drop what no longer acts from the trained tensors, before :meth:`state`; the output
        does not change. Nothing to drop unless the method switches components off."""

    def state(self) -> dict[str, torch.Tensor]:
        """What an adapter file stores: every trained tensor by its name in the model (CPU)."""
        return {name: p.detach().cpu().contiguous() for name, p in self.model.named_parameters()
                if p.requires_grad}

    def stored_ranks(self) -> dict[str, int]:
        """Rank of each layer as stored by :meth:`state` (what :func:`prepare` needs back)."""
        return self.initial_ranks()

    def merge(self) -> None:
        """Fold the adapters into the backbone weights for inference."""
        for layer in self.layers.values():
            layer.merge()

    def unmerge(self) -> None:
        """Restore the backbone weights after :meth:`merge`."""
        for layer in self.layers.values():
            if layer.merged:
                layer.unmerge()


#: Steps over which η rises linearly from 5 % to its value when the backbone's decoder starts
#: untrained (``spec.trains_decoder``): at full η from step 1, a fresh decoder's ReLUs died on
#: some crop orders (bladder on the Merlin encoder, k = 3: Dice 0.14–0.21 at 2 seeds of 5,
#: 0.92 with the warm-up).
WARMUP_STEPS = 20


#: The name used before methods were classes (the type of a prepared method).
Tuning = Method


class ZeroShot(Method):
    """``zero-shot``: nothing trains; the head is the backbone's own output row of the
    structure (minus background for a softmax head), so ``structure`` must be a class the
    backbone knows.

    Raises:
        ArenaError: (:meth:`prepare`) the backbone does not know ``structure``.
    """

    name = "zero-shot"

    @classmethod
    def check(cls, spec: BackboneSpec, structure: str | None) -> None:
        known = [c for c in spec.classes if spec.pretrained_channel(c) is not None]
        if not known:
            with_classes = [b.id for b in REGISTRY.values()
                            if b.offered and any(b.pretrained_channel(c) is not None for c in b.classes)]
            raise ArenaError(f"zero-shot needs a backbone pretrained on organ labels, and "
                             f"'{spec.id}' has none (its decoder is trained from the painted "
                             f"slices): choose a method that trains (e.g. --method arena), or a "
                             f"--backbone pretrained on organ labels ({', '.join(with_classes)})")
        if spec.pretrained_channel(structure) is None:
            raise ArenaError(f"zero-shot needs a structure the backbone '{spec.id}' knows (one of "
                             f"{', '.join(known)}), not '{structure}': give --structure with one "
                             "of these names, or choose a method that trains")

    def set_trainable(self) -> None:
        self.head.requires_grad_(False)


class LinearProbe(Method):
    """``linear-probe``: the new head only (``in_channels`` + 1 values)."""

    name = "linear-probe"


class BitFit(Method):
    """``bitfit`` (Zaken et al. 2022): every bias of the backbone, and the head."""

    name = "bitfit"

    def set_trainable(self) -> None:
        for name, p in self.model.named_parameters():
            p.requires_grad_(name.endswith("bias") or p.requires_grad)


class AffineLN(Method):
    """``affine-ln``: the scale and shift of every normalisation layer, and the head; a norm
    without them (MONAI's ``InstanceNorm3d(affine=False)``) gets them, at the identity."""

    name = "affine-ln"

    def set_trainable(self) -> None:
        for p in _norm_affine(self.model):
            p.requires_grad_(True)


class Full(Method):
    """``full``: every weight of the backbone (η defaults to 5e-4, see
    :data:`arenaseg.config.FULL_FINE_TUNING_LR`)."""

    name = "full"

    def set_trainable(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(True)


class LoRA(Method):
    """``lora``: PEFT LoRA (``inject_adapter_in_model``) on the target layers, rank r0 on
    every layer, scaling α/r = 1; ranks stay fixed."""

    name = "lora"
    adapters = True

    @classmethod
    def inject(cls, model, names, ranks, settings) -> dict:
        return {"layers": _inject_lora(model, names, ranks)}

    def ranks(self) -> dict[str, int]:
        return self.initial_ranks()

    def merge(self) -> None:
        """As :meth:`Method.merge`, but a Conv3d with a 1×1×1 kernel keeps its adapter beside
        it (the same output): PEFT 0.21 merges such a kernel as a 2-D one and fails on the
        shapes (the Merlin encoder's ``conv1`` and ``conv3``)."""
        for layer in self.layers.values():
            base = layer.get_base_layer()
            if not (isinstance(base, nn.Conv3d) and tuple(base.kernel_size) == (1, 1, 1)):
                layer.merge()


class AdaLoRA(Method):
    """``adalora``: PEFT AdaLoRA triplets ``B·Diag(E)·A`` (Conv3d through ``SVDConv3d``),
    initial rank r0, target r0/2 on average, with its orthogonality penalty (weight 0.5) in the
    loss; after each step PEFT's ``RankAllocator`` updates the importance scores and masks
    singular values on the cubic budget schedule (warm-up 10 %, final 20 % of the steps).

    Args:
        allocator: PEFT's ``RankAllocator`` for the model's triplets.
        orth_weight: weight of :func:`orthogonality_penalty`.
    """

    name = "adalora"
    adapters = True

    def __init__(self, model, head, layers=None, allocator=None, orth_weight: float = 0.0):
        super().__init__(model, head, layers)
        self.allocator, self.orth_weight = allocator, orth_weight
        self.rank_pattern = None

    @classmethod
    def inject(cls, model, names, ranks, settings) -> dict:
        layers, allocator, orth = _inject_adalora(model, names, ranks, settings.steps)
        return {"layers": layers, "allocator": allocator, "orth_weight": orth}

    def penalty(self) -> torch.Tensor | float:
        """AdaLoRA's orthogonality penalty (0 without triplets)."""
        return orthogonality_penalty(self.model, self.orth_weight) if self.allocator else 0.0

    def after_step(self, step: int, lr: float, settings) -> None:
        """PEFT's importance update and budget masking (the logic of
        ``AdaLoraModel.update_and_allocate``)."""
        if self.allocator is None:
            return
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
        """Non-zero singular values per layer."""
        return {n: int(torch.count_nonzero(layer.lora_E["default"].detach()))
                for n, layer in self.layers.items()}

    def active_parameters(self) -> int:
        """Trained values minus the masked triplets."""
        return self.trainable_parameters() - sum(
            _off(layer.lora_A["default"], layer.lora_B["default"], layer.lora_E["default"])
            for layer in self.layers.values())


class Arena(Method):
    """``arena`` (the paper's method): :class:`~arenaseg.adapters.ArenaLayer` adapters
    ``ΔW = s·B·Diag(v)·A`` on the target layers.

    Before the first step, :meth:`initialise` points each layer's components at the leading
    singular directions of the loss gradient with respect to its frozen weight (gates at 0: the
    network is still the backbone). The optimizer then trains A, B and the head; after each
    step the gates take a proximal step ``v ← ξ(v − ρη·∇̂v, ηλ)`` (soft threshold ηλ, poster
    eq. 5, gradient normalised per layer: :class:`~arenaseg.adapters.GateSteps`), which switches
    components on and off, so each layer finds its own rank. :meth:`prune` then drops the
    switched-off components (explicitly, before saving).

    Examples:
        >>> from arenaseg.backbones import load_backbone
        >>> model, spec = load_backbone()
        >>> arena = prepare(model, spec, AdaptSettings(method="arena", rank=4))
        >>> sum(arena.ranks().values()), sum(arena.initial_ranks().values())  # gates start at 0
        (0, 36)
    """

    name = "arena"
    adapters = True

    def __init__(self, model, head, layers=None):
        super().__init__(model, head, layers)
        self.gates = GateSteps(self.layers.values())

    @classmethod
    def inject(cls, model, names, ranks, settings) -> dict:
        layers = inject_adapters(model, [f"^{re.escape(n)}$" for n in names], ranks)
        for layer in layers.values():
            layer.v.requires_grad_(True)
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.requires_grad_(True)
        return {"layers": layers}

    def parameters(self) -> list[nn.Parameter]:
        """A, B and the head: the gates ``v`` take proximal steps instead (eq. 4–5)."""
        gates = {id(layer.v) for layer in self.layers.values()}
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in gates]

    def initialise(self, batch_loss) -> None:
        """The SVD start: the gradient of ``batch_loss()`` with respect to every adapted
        layer's frozen weight ``W0``, and :meth:`~arenaseg.adapters.ArenaLayer.align` on it.
        Layers whose gates are not all 0 (a ``--warm-start`` adapter) are left as they are: a
        warm start continues the components it saved and adds none (layers saved at rank 0 stay
        without adapter)."""
        fresh = [layer for layer in self.layers.values() if not torch.any(layer.v)]
        if not fresh:
            return
        weights = [layer.base.weight for layer in fresh]
        trained = [w.requires_grad for w in weights]  # --train-decoder may train some
        for w in weights:
            w.requires_grad_(True)
        try:
            grads = torch.autograd.grad(batch_loss(), weights, allow_unused=True)
        finally:
            for w, flag in zip(weights, trained):
                w.requires_grad_(flag)
        for layer, grad in zip(fresh, grads):
            layer.align(grad if grad is not None else torch.zeros_like(layer.base.weight))

    @staticmethod
    def threshold(lr: float, settings: AdaptSettings) -> float:
        """The soft threshold of one proximal step, ηλ."""
        return lr * settings.lam

    def after_step(self, step: int, lr: float, settings: AdaptSettings) -> None:
        """The proximal step on every gate, using the gradient of the same backward pass
        (:class:`~arenaseg.adapters.GateSteps`, step ρη, threshold ηλ)."""
        self.gates.step(settings.rho * lr, self.threshold(lr, settings))

    def ranks(self) -> dict[str, int]:
        """Non-zero gates per layer."""
        return effective_ranks(self.layers)

    def initial_ranks(self) -> dict[str, int]:
        return {n: layer.allocated for n, layer in self.layers.items()}

    def active_parameters(self) -> int:
        """Trained values minus the switched-off components."""
        return self.trainable_parameters() - sum(
            _off(layer.lora_A.weight, layer.lora_B.weight, layer.v) for layer in self.layers.values())

    def prune(self) -> None:
        """Drop the switched-off components of every layer (A, B and v shrink to the effective
        rank; a layer at rank 0 is left as it is and :meth:`state` leaves it out)."""
        for layer in self.layers.values():
            layer.prune()

    def state(self) -> dict[str, torch.Tensor]:
        """The trained tensors, layers at rank 0 left out; call :meth:`prune` first, so that
        only the active components are stored."""
        dead = {n for n, r in self.ranks().items() if r == 0}
        return {name: p for name, p in super().state().items()
                if name.rpartition(".lora_")[0] not in dead
                and not (name.endswith(".v") and name[:-2] in dead)}

    def stored_ranks(self) -> dict[str, int]:
        return {n: r for n, r in self.ranks().items() if r > 0}


def _off(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> int:
    """Values of the switched-off components of one layer (``A`` rows, ``B`` columns, gates)."""
    return (v.numel() - int(torch.count_nonzero(v.detach()))) * (a[0].numel() + b.shape[0] + 1)


#: Method name → class (the names are :data:`arenaseg.config.METHODS`, in that order).
METHOD_CLASSES: dict[str, type[Method]] = {
    cls.name: cls for cls in (ZeroShot, LinearProbe, BitFit, AffineLN, Full, LoRA, AdaLoRA, Arena)}
assert tuple(METHOD_CLASSES) == METHODS, "every name in config.METHODS has one class"


def prepare(model: nn.Module, spec: BackboneSpec, settings: AdaptSettings,
            structure: str | None = None, ranks: dict[str, int] | None = None) -> Method:
    """Make ``model`` (a backbone from :func:`~arenaseg.backbones.load_backbone`) ready to adapt
    with ``settings.method``: new head, adapters injected, the method's parameters trainable.

    Args:
        model: the frozen backbone; modified in place.
        spec: its registry entry (head, targets, decoder, classes).
        settings: :class:`~arenaseg.config.AdaptSettings` (method, rank, seed, steps,
            train_decoder, targets).
        structure: a class name of the backbone starts the head from its pretrained row.
        ranks: rank per layer to rebuild a saved adapter (:meth:`Method.stored_ranks`);
            default ``settings.rank`` on every layer matching the targets.

    Returns:
        The :class:`Method` subclass of ``settings.method`` (:data:`METHOD_CLASSES`).

    Raises:
        ArenaError: zero-shot for a structure the backbone does not know; no layer matches the
            adapter targets.

    Examples:
        >>> from arenaseg.backbones import load_backbone
        >>> model, spec = load_backbone()
        >>> lora = prepare(model, spec, AdaptSettings(method="lora", rank=4), structure="liver")
        >>> type(lora).__name__, len(lora.layers), lora.head.out_channels
        ('LoRA', 9, 1)
    """
    return METHOD_CLASSES[settings.method].prepare(model, spec, settings, structure, ranks)


def load_state(tuning: Method, tensors: dict[str, torch.Tensor], source: str) -> None:
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
