"""Settings, method and backbone names, and jobs: the engine's vocabulary, without torch.

Everything a client needs to describe a run lives here and imports only the standard library
(and :mod:`arenaseg.backbones.registry`, itself torch-free), so the 3D Slicer module can build a job
before PyTorch is installed, and the command line, the worker and the benchmarks all spell a
method, a backbone or a job field the same way:

- :data:`METHODS`, :data:`ADAPTER_METHODS`, :data:`DEFAULT_METHOD`: the method names
  (:mod:`arenaseg.methods` registers one class per name);
- :data:`BACKBONES`, :data:`DEFAULT_BACKBONE`: the backbone ids (:mod:`arenaseg.backbones.registry`);
- :class:`AdapterSettings` (what a method builds and how its adapters step: saved with the
  adapter), :class:`LoopSettings` (how the training loop runs) and :class:`AdaptSettings`
  (both, flat: the object the engine takes);
- :class:`AdaptJob` and :class:`SegmentJob`: one run of ``python -m arenaseg.worker JOB.json``,
  with a JSON round trip (:func:`job_from_dict`, :meth:`AdaptJob.to_dict`).

Anchor: PEFT's ``LoraConfig``, a validated dataclass saved with the adapter.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields

from .errors import ArenaError
from .backbones.registry import DEFAULT_BACKBONE, EMBEDDED_BACKBONE, REGISTRY  # noqa: F401 (the GUI reads them here)

#: Every method, from no training to ARENA (:mod:`arenaseg.methods` has one class per name).
METHODS = ("zero-shot", "linear-probe", "bitfit", "affine-ln", "full", "lora", "adalora", "arena")
#: The methods that inject adapters with a rank (r0, ``--targets``).
ADAPTER_METHODS = METHODS[-3:]
DEFAULT_METHOD = METHODS[-1]
#: The baselines that come from PEFT (their own dependency).
PEFT_METHODS = tuple(m for m in ADAPTER_METHODS if m != DEFAULT_METHOD)
#: Every backbone id of the registry; :data:`DEFAULT_BACKBONE` is the one a run uses unless told.
BACKBONES = tuple(REGISTRY)
#: The backbones a GUI offers: the embedded one and those with public pretrained weights that a
#: user adapts as they are (not the untrained or decoder-less ones, see ``BackboneSpec.offered``).
OFFERED_BACKBONES = tuple(spec_id for spec_id, spec in REGISTRY.items() if spec.offered)
DEVICES = ("auto", "cpu", "cuda")

DEFAULT_LR = 5e-3
FULL_FINE_TUNING_LR = 5e-4  # all 2.5 M weights at η = 5e-3 wreck the pretrained features


@dataclass
class AdapterSettings:
    """What a method builds and how its trained parameters step (saved with the adapter).

    Attributes:
        method: one of :data:`METHODS`: ``"arena"`` (gated, proximal l1), or a baseline
            (``"lora"``, ``"adalora"``, ``"linear-probe"``, ``"bitfit"``, ``"affine-ln"``,
            ``"full"``, ``"zero-shot"``).
        rank: initial rank r0 of every adapted layer (lora, adalora, arena).
        lam: λ, weight of the l1 penalty on ``v`` (eq. 3): the soft threshold of each gate
            step is ``lr·lam``. Larger: fewer components, lower rank.
        lr: η, AdamW learning rate of the trained parameters (eq. 4); None: 5e-3, or 5e-4 for
            full fine-tuning.
        rho: ρ, the gates' step ``rho·lr`` relative to η (eq. 5, gradient normalised per layer,
            :class:`~arenaseg.adapters.GateSteps`): a gate whose gradient stays above
            ``lam/rho`` of its layer's largest turns on.
        targets: regular expressions of the adapted layers' names; None: the backbone's own.
        train_decoder: also train the backbone's decoder (``BackboneSpec.decoder``).
    """

    method: str = DEFAULT_METHOD
    rank: int = 8
    lam: float = 2.0
    lr: float | None = None
    rho: float = 10.0
    targets: tuple[str, ...] | None = None
    train_decoder: bool = False

    @property
    def learning_rate(self) -> float:
        """η actually used: ``lr``, or the method's default."""
        if self.lr is not None:
            return self.lr
        return FULL_FINE_TUNING_LR if self.method == "full" else DEFAULT_LR


@dataclass
class LoopSettings:
    """How the training loop runs (:func:`arenaseg.training.train`).

    Attributes:
        steps: optimizer steps on the paint alone; each round of self-training adds half as
            many (:func:`arenaseg.self_training.round_steps`).
        crops_per_step: random crops per step around painted voxels, half of them centred on
            the structure.
        slab: crop thickness in voxels across the painted slices (the ROI elsewhere): the loss
            lives on the painted slices only, so thin slabs save most of the compute.
        max_points: painted voxels sampled per crop for the loss (memory bound).
        seed: random seed of crops and initialisation.
        interpolate_mm: pseudo-labels interpolated between the painted slices
            (:func:`arenaseg.io.annotations.interpolate`) also train, weighted by half at each
            ``interpolate_mm`` mm from the nearest painted slice; 0: only the painted slices.
        checkpointing: gradient checkpointing inside the backbone (SwinUNETR), trading compute
            for GPU memory.
        self_training: rounds of self-training after the steps on the paint: each takes the
            structure the network then finds, and the background around it, on the unpainted
            slices as more labels (:mod:`arenaseg.self_training`); 0 (default): the paint
            only. Not a default: it helps long structures at 3 painted slices and hurts others
            (``bench/SELF_TRAINING.md``).
    """

    steps: int = 120  # one crop at a time, twice as often: same compute, higher Dice (COMPARISON.md)
    crops_per_step: int = 1
    slab: int = 32
    max_points: int = 50_000
    seed: int = 0
    interpolate_mm: float = 0.0
    checkpointing: bool = False
    self_training: int = 0


#: Field order of the flat settings (as adapters and jobs have always stored them).
_ORDER = ("method", "rank", "lam", "lr", "rho", "steps", "crops_per_step", "slab",
          "max_points", "seed", "targets", "train_decoder", "checkpointing", "interpolate_mm",
          "self_training")


#: Allowed range of every numeric setting (inclusive; ``lr`` and the lower bounds marked by
#: :data:`_ABOVE` exclusive), checked before any work by :class:`AdaptSettings`, so that the
#: command line and the worker refuse the same values with the same rule:
#:
#: - ``seed``: numpy's random generators take seeds below 2**32;
#: - ``rank``: at most 1024 components per layer, a static bound checked before the backbone is
#:   built: far above any useful r0 (8 by default; components beyond a layer's own rank,
#:   ``min(in, out)``, add nothing) and still small in memory, while r0 = 10**8 asks for 10.8 GB;
#: - ``steps``, ``crops_per_step``, ``slab``, ``max_points``: what one run can do in hours on a
#:   GPU (steps), and what fits its memory (crops per step, slab thickness, sampled voxels);
#: - ``lam``, ``rho``, ``interpolate_mm``: finite and not negative, within a bound far beyond any
#:   useful value; ``lr``: above 0 and at most 1 (AdamW diverges beyond);
#: - ``self_training``: each round runs the whole scan once more; 16 is far beyond any gain.
LIMITS = {"rank": (1, 1024), "lam": (0.0, 1e6), "lr": (0.0, 1.0), "rho": (0.0, 1e6),
          "steps": (1, 100_000), "crops_per_step": (1, 64), "slab": (16, 1024),
          "max_points": (1, 10_000_000), "seed": (0, 2**32 - 1), "interpolate_mm": (0.0, 1000.0),
          "self_training": (0, 16)}
_ABOVE = {"lr"}  # lower bound excluded
#: Settings that are whole numbers (the others in :data:`LIMITS` are numbers).
_WHOLE = {"rank", "steps", "crops_per_step", "slab", "max_points", "seed", "self_training"}
#: The command-line option of each setting (the worker names ``settings.<field>``).
OPTIONS = {"lam": "--lambda", "crops_per_step": "--crops-per-step", "max_points": "--max-points",
           "interpolate_mm": "--interpolate-mm", "train_decoder": "--train-decoder"}


def option_name(name: str) -> str:
    """``--rank``, ``--lambda``: how the command line spells setting ``name``."""
    return OPTIONS.get(name, f"--{name.replace('_', '-')}")


def _number(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _bound(value) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def settings_problems(settings) -> list[tuple[str, object, str]]:
    """Every setting of ``settings`` that cannot work, as (field, value, rule), the rule naming
    the allowed range (:data:`LIMITS`)."""
    problems = []
    if settings.method not in METHODS:
        problems.append(("method", settings.method, f"one of {', '.join(METHODS)}"))
    for name, (low, high) in LIMITS.items():
        value = getattr(settings, name)
        if value is None and name == "lr":
            continue
        whole = name in _WHOLE
        rule = f"{'>' if name in _ABOVE else '>='} {_bound(low)} and <= {_bound(high)}"
        if name == "slab":
            rule = f"a multiple of 16, {rule}"
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
            problems.append((name, value, f"{'a whole number' if whole else 'a number'} {rule}"))
        elif not whole and not math.isfinite(value):
            problems.append((name, value, "a finite number"))  # one reason at a time
        elif not (low < value if name in _ABOVE else low <= value) or value > high \
                or (name == "slab" and value % 16):
            problems.append((name, value, rule + (" (numpy's limit)" if name == "seed" else "")))
    for name in ("train_decoder", "checkpointing"):
        if not isinstance(getattr(settings, name), bool):
            problems.append((name, getattr(settings, name), "true or false"))
    for pattern in settings.targets or ():
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            problems.append(("targets", None, f"'{pattern}' is not a regular expression ({err}): "
                             "give module names or patterns such as 'encoder\\.layer2\\.7\\.conv2'"))
    if settings.self_training and settings.method == "adalora":
        problems.append(("self_training", None, "does not apply to method adalora, whose rank "
                         "budget schedule spans --steps: give 0, or another method"))
    if settings.targets and settings.method not in ADAPTER_METHODS:
        problems.append(("targets", None,
                         f"applies to the adapter methods ({', '.join(ADAPTER_METHODS)}), not to "
                         f"method {settings.method}: drop it"))
    return problems


class SettingsError(ArenaError):
    """Settings that cannot work: the message names each option (``--seed``), its value and the
    allowed range; :meth:`in_job` names them as job fields (``settings.seed``) instead."""

    def __init__(self, problems: list[tuple[str, object, str]]):
        self.problems = problems
        super().__init__(self._text(lambda name: option_name(name)))

    def _text(self, naming) -> str:
        return "; ".join(f"{naming(name)} {rule}" if value is None else
                         f"{naming(name)} {_number(value)} must be {rule}"
                         for name, value, rule in self.problems)

    def in_job(self, prefix: str = "settings.") -> ArenaError:
        """The same problems, named as the job's fields (``job field settings.seed ...``)."""
        return ArenaError("job field " + self._text(lambda name: prefix + name)
                          + "; see the job format in arenaseg/worker.py")


@dataclass
class AdaptSettings(LoopSettings, AdapterSettings):
    """Settings of one adaptation: :class:`AdapterSettings` and :class:`LoopSettings` together
    (λ and ρ chosen on the new structures, ``bench/COMPARISON.md``). Validated on creation.

    Raises:
        ArenaError: a value that cannot work (the message names the option and the rule).

    Examples:
        >>> s = AdaptSettings(method="lora", steps=20)
        >>> s.learning_rate, s.adapter.method, s.loop.steps
        (0.005, 'lora', 20)
        >>> AdaptSettings.from_dict(s.to_dict(resolve_lr=False)) == s
        True
    """

    def __post_init__(self):
        problems = settings_problems(self)
        if problems:
            raise SettingsError(problems)

    @property
    def adapter(self) -> AdapterSettings:
        """The adapter part (what a method builds and steps)."""
        return AdapterSettings(**{f.name: getattr(self, f.name) for f in fields(AdapterSettings)})

    @property
    def loop(self) -> LoopSettings:
        """The training-loop part."""
        return LoopSettings(**{f.name: getattr(self, f.name) for f in fields(LoopSettings)})

    def to_dict(self, resolve_lr: bool = True) -> dict:
        """Flat JSON-ready dict; ``lr`` resolved to the rate used (as every adapter stores it),
        or as given with ``resolve_lr=False`` (as a job carries it)."""
        values = asdict(self)
        if resolve_lr:
            values["lr"] = self.learning_rate
        return {name: values[name] for name in _ORDER}

    @classmethod
    def from_dict(cls, values: dict) -> "AdaptSettings":
        """The settings a job or an adapter stored (lists back to tuples).

        Raises:
            ArenaError: an unknown field, or a value that cannot work.
        """
        unknown = sorted(set(values) - set(_ORDER))
        if unknown:
            raise ArenaError(f"unknown settings {unknown}: known are {', '.join(_ORDER)}")
        values = dict(values)
        if "targets" in values:
            values["targets"] = tuple(values["targets"]) if values["targets"] else None
        return cls(**values)


@dataclass
class _Job:
    """Fields every job has: what to read, what to write, where to run."""

    image: str
    out: str
    device: str = "auto"
    series: str | None = None
    weights: str | None = None
    stop_on_stdin_eof: bool = False

    def to_dict(self) -> dict:
        """JSON-ready dict with ``command`` first (the worker's job file)."""
        values = asdict(self)
        if isinstance(self, AdaptJob):
            values["settings"] = self.settings.to_dict(resolve_lr=False)
        return {"command": self.command, **values}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def arguments(self) -> dict:
        """The job as keyword arguments of :func:`arenaseg.pipeline.adapt` or
        :func:`~arenaseg.pipeline.segment` (every field but ``stop_on_stdin_eof``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "stop_on_stdin_eof"}


@dataclass
class AdaptJob(_Job):
    """``adapt``: paint on a few slices of ``image`` → 3D segment ``out`` (+ adapter).

    Attributes:
        annotations: labelmap or ``.seg.nrrd`` with the painted slices.
        label: label value of the structure, or a segment name of a ``.seg.nrrd``.
        adapter_out: adapter file to write, or None.
        structure: structure name stored in the adapter.
        slice_axis: voxel axis of the painted slices, None: detected.
        warm_start: adapter to continue from.
        background_label: value of voxels known not to be the structure.
        backbone: registry id or checkpoint path.
        settings: :class:`AdaptSettings`.
    """

    command = "adapt"
    annotations: str = ""
    label: int | str = 1
    adapter_out: str | None = None
    structure: str | None = None
    slice_axis: int | None = None
    warm_start: str | None = None
    background_label: int | None = None
    backbone: str = DEFAULT_BACKBONE
    settings: AdaptSettings = field(default_factory=AdaptSettings)


@dataclass
class SegmentJob(_Job):
    """``segment``: a saved ``adapter`` → 3D segment ``out`` of ``image``."""

    command = "segment"
    adapter: str = ""


JOBS = {cls.command: cls for cls in (AdaptJob, SegmentJob)}


_KINDS = {"str": (str, "a text (a path or a name)"), "int": (int, "a whole number"),
          "float": ((int, float), "a number"), "bool": (bool, "true or false"),
          "None": (type(None), "null")}


_JSON_NAMES = {str: "string", int: "number", float: "number", bool: "boolean", list: "array",
               dict: "object"}


def _check_types(values: dict, cls, prefix: str = "") -> None:
    """Refuse a JSON value whose type does not fit its field (``"steps": "10"``), naming the
    field, the value and what it must be; fields of other types (settings, tuples) are left to
    their own checks."""
    for f in fields(cls):
        kinds = [k.strip() for k in str(f.type).split("|")]
        if f.name not in values or not set(kinds) <= set(_KINDS):
            continue
        value = values[f.name]
        if not any(isinstance(value, _KINDS[k][0]) and not (isinstance(value, bool) and k != "bool")
                   for k in kinds):
            kind = _JSON_NAMES.get(type(value), type(value).__name__)
            raise ArenaError(f"job field {prefix}{f.name} is {json.dumps(value)} (a JSON {kind}): "
                             f"give {' or '.join(_KINDS[k][1] for k in kinds)}; see the job "
                             "format in arenaseg/worker.py")


def job_from_dict(job: dict) -> AdaptJob | SegmentJob:
    """The job a JSON object describes (see :mod:`arenaseg.worker` for the format); its
    ``settings`` may be a dict or an :class:`AdaptSettings`.

    Raises:
        ArenaError: unknown command, a missing, unknown or malformed field.

    Examples:
        >>> job = AdaptJob(image="ct.nrrd", out="seg.nrrd", annotations="paint.nrrd", label=5)
        >>> job_from_dict(json.loads(job.to_json())) == job
        True
    """
    if not isinstance(job, dict):
        kind = _JSON_NAMES.get(type(job), type(job).__name__)
        raise ArenaError(f"the job is a JSON {kind}, not an object ({{\"command\": ...}}): see "
                         "the job format in arenaseg/worker.py")
    values = dict(job)
    command = values.pop("command", None)
    if command not in JOBS:
        raise ArenaError(f"job command '{command}' is not 'adapt' or 'segment'")
    cls = JOBS[command]
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ArenaError(f"job fields {unknown} are unknown for '{command}': see the job format "
                         "in arenaseg/worker.py")
    required = [f for f in ("image", "out", "annotations", "adapter") if f in names]
    missing = [f for f in required if f not in values]
    if missing or (command == "adapt" and "label" not in values):
        raise ArenaError(f"job field {(missing or ['label'])[0]!r} is missing: see the job "
                         "format in arenaseg/worker.py")
    _check_types(values, cls)
    if values.get("slice_axis") not in (None, 0, 1, 2):
        raise ArenaError(f"job field slice_axis is {json.dumps(values['slice_axis'])}: give 0, 1 "
                         "or 2 (the voxel axis of the painted slices) or null (detected); see the "
                         "job format in arenaseg/worker.py")
    if "settings" in values and not isinstance(values["settings"], AdaptSettings):
        if not isinstance(values["settings"] or {}, dict):
            raise ArenaError(f"job field settings is {json.dumps(values['settings'])}: give an "
                             "object of settings; see the job format in arenaseg/worker.py")
        _check_types(values["settings"] or {}, AdaptSettings, "settings.")
        try:
            values["settings"] = AdaptSettings.from_dict(values["settings"] or {})
        except SettingsError as err:
            raise err.in_job() from None
    if "label" in values and not isinstance(values["label"], str):
        values["label"] = int(values["label"])
    return cls(**values)
