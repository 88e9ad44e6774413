"""The engine's vocabulary (``arenaseg.config``): torch-free, one place for every method name,
backbone id and job field, which the Slicer module and the benchmarks take from it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from arenaseg import config
from arenaseg.config import AdaptJob, AdaptSettings, SegmentJob, job_from_dict
from arenaseg.errors import ArenaError

from slicer_testing import MODULE_DIR, import_module

ROOT = MODULE_DIR.parent
TESTING = Path(__file__).parent
#: The engine's clients: the Slicer module and its library, and the benchmarks.
CLIENTS = [MODULE_DIR / "ARENASegmentation.py", *sorted((MODULE_DIR / "ARENASegmentationLib").glob("*.py")),
           *sorted((ROOT / "bench").glob("*.py"))]


def _without_torch(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where ``import torch`` fails."""
    prelude = (f"import sys; sys.modules['torch'] = None; "
               f"sys.path[:0] = [{str(TESTING)!r}, {str(MODULE_DIR)!r}]\n")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True,
                          timeout=120)


def test_config_and_the_slicer_module_import_without_torch():
    run = _without_torch("from arenaseg import config\n"
                         "from slicer_testing import import_module\n"
                         "m = import_module()\n"
                         "print(m.DEFAULT_BACKBONE, len(m.METHODS))")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [config.DEFAULT_BACKBONE, str(len(config.METHODS))]


def test_slicer_module_constants_are_the_config():
    module = import_module()
    defaults = AdaptSettings()
    assert module.DEFAULT_BACKBONE == config.DEFAULT_BACKBONE
    assert module.BACKBONES == list(config.OFFERED_BACKBONES) and set(module.BACKBONES) <= set(config.BACKBONES)
    assert module.METHODS[0] == config.DEFAULT_METHOD and sorted(module.METHODS) == sorted(config.METHODS)
    assert module.DEVICES == list(config.DEVICES)
    assert (module.DEFAULT_RANK, module.DEFAULT_LAMBDA, module.DEFAULT_STEPS) == (
        defaults.rank, defaults.lam, defaults.steps)


def _literals(path: Path):
    """(line, what) for each copy of the engine's vocabulary in ``path``: a tuple, list, set or
    dict keys naming three or more methods or backbones (a copy of the list, not a choice among
    them), the default backbone's id, or a dict with a ``"command"`` key (a job written by hand)."""
    names = {"method": set(config.METHODS), "backbone": set(config.BACKBONES)}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else \
            node.keys if isinstance(node, ast.Dict) else []
        values = [i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)]
        for kind, known in names.items():
            if len(set(values) & known) >= 3:
                yield node.lineno, f"{kind} names written out: {values}"
        if isinstance(node, ast.Dict) and {"command", "image", "out"} <= set(values):
            yield node.lineno, "a job dict written by hand"
        if isinstance(node, ast.Constant) and node.value == config.DEFAULT_BACKBONE:
            yield node.lineno, f"the default backbone id '{node.value}'"


@pytest.mark.parametrize("path", CLIENTS, ids=lambda p: p.name)
def test_clients_take_names_and_job_fields_from_the_config(path):
    found = [f"{path.name}:{line}: {what}" for line, what in _literals(path)]
    assert not found, "\n".join(found)


def test_method_and_backbone_names_are_written_once_in_the_engine():
    """The names live in config (methods) and the registry (backbone ids); every other engine
    file refers to them."""
    engine = MODULE_DIR / "arenaseg"
    for path in sorted(engine.rglob("*.py")):
        if path.name in ("config.py", "registry.py"):
            continue
        found = [f"{path.name}:{line}: {what}" for line, what in _literals(path)]
        assert not found, "\n".join(found)


def test_settings_split_into_adapter_and_loop_parts():
    s = AdaptSettings(method="lora", rank=4, steps=20, seed=3)
    assert s.adapter == config.AdapterSettings(method="lora", rank=4)
    assert s.loop == config.LoopSettings(steps=20, seed=3)
    assert {f for f in s.to_dict()} == set(vars(s.adapter)) | set(vars(s.loop))
    assert s.to_dict()["lr"] == 5e-3 and s.to_dict(resolve_lr=False)["lr"] is None
    assert AdaptSettings.from_dict(json.loads(json.dumps(s.to_dict(resolve_lr=False)))) == s
    assert AdaptSettings.from_dict({"targets": ["a$"], "method": "arena"}).targets == ("a$",)
    with pytest.raises(ArenaError, match="unknown settings"):
        AdaptSettings.from_dict({"rnak": 4})
    with pytest.raises(ArenaError, match="--rank 0 must be >= 1"):
        AdaptSettings(rank=0)


def test_jobs_round_trip_through_json():
    adapt = AdaptJob(image="ct.nrrd", out="seg.nrrd", annotations="paint.nrrd", label="liver",
                     adapter_out="a.safetensors", background_label=2, stop_on_stdin_eof=True,
                     settings=AdaptSettings(method="bitfit", steps=5))
    segment = SegmentJob(image="ct.nrrd", out="seg.nrrd", adapter="a.safetensors", device="cpu")
    for job in (adapt, segment):
        text = job.to_json()
        assert json.loads(text)["command"] == job.command
        assert job_from_dict(json.loads(text)) == job
    minimal = job_from_dict({"command": "adapt", "image": "i", "annotations": "a", "label": 3,
                             "out": "o"})
    assert minimal.label == 3 and minimal.settings == AdaptSettings()
    assert minimal.backbone == config.DEFAULT_BACKBONE


def test_job_fields_are_the_pipeline_arguments():
    """A job runs as ``adapt(**job.arguments())`` / ``segment(**job.arguments())``."""
    import inspect

    from arenaseg import pipeline

    for job, function in ((AdaptJob(image="i", out="o"), pipeline.adapt),
                          (SegmentJob(image="i", out="o"), pipeline.segment)):
        assert set(job.arguments()) <= set(inspect.signature(function).parameters)


@pytest.mark.parametrize("job, message", [
    ({"command": "train"}, "is not 'adapt' or 'segment'"),
    ({"command": "segment", "image": "i", "out": "o"}, "'adapter' is missing"),
    ({"command": "adapt", "image": "i", "annotations": "a", "out": "o"}, "'label' is missing"),
    ({"command": "segment", "image": "i", "out": "o", "adapter": "a", "colour": 1}, r"\['colour'\] are unknown"),
])
def test_malformed_jobs_are_refused_with_the_field(job, message):
    with pytest.raises(ArenaError, match=message):
        job_from_dict(job)
