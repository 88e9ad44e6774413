"""Real Slicer MRML for the module's tests, without the Slicer application.

``slicer-core`` (PyPI) brings Slicer's Qt-free MRML, module logics and ``slicer.util``;
``trame-slicer``'s ``SlicerApp`` builds a scene and registers the Volumes, Segmentations,
Terminologies, SubjectHierarchy ... logics. The fixture below points ``slicer.mrmlScene`` and
``slicer.modules.<name>.logic()`` at them, as the Slicer application does, so that
``slicer.util.arrayFromSegmentBinaryLabelmap`` and friends run for real.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[1] / "ARENASegmentation"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "ARENASegmentation.ui"


def import_module():
    """``ARENASegmentation.py`` imported the way Slicer does: from its own folder (which also
    makes ``ARENASegmentationLib`` importable), with stand-ins for the application-only parts."""
    import slicer_stand_ins

    slicer_stand_ins.install()
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    import ARENASegmentation

    return ARENASegmentation


@pytest.fixture(scope="session")
def slicer_app(tmp_path_factory):
    """A trame-slicer ``SlicerApp``; ``slicer.mrmlScene`` and ``slicer.modules`` resolve to it.
    The Logic's run folders (temporary files, kept adapters) go to pytest's temporary folder."""
    import tempfile

    import slicer
    from trame_slicer.core import SlicerApp

    saved_tempdir = tempfile.tempdir
    tempfile.tempdir = str(tmp_path_factory.mktemp("arena-runs"))

    app = SlicerApp()
    logics = {"segmentations": app.segmentations_logic, "volumes": app.volumes_logic,
              "terminologies": app.terminologies_logic, "subjecthierarchy": app.subject_hierarchy_logic,
              "data": app.data_logic, "colors": app.color_logic}
    saved = {name: getattr(slicer, name, None) for name in ("mrmlScene", "modules")}
    slicer.mrmlScene = app.scene
    slicer.modules = types.SimpleNamespace(**{
        name: types.SimpleNamespace(logic=(lambda logic=logic: logic)) for name, logic in logics.items()})
    yield app
    tempfile.tempdir = saved_tempdir
    for name, value in saved.items():
        if value is None:
            delattr(slicer, name)
        else:
            setattr(slicer, name, value)


def load_volume(app, path: Path):
    """The CT as a scalar volume node (Slicer's archetype volume reader, as "Add data" does)."""
    node = app.volumes_logic.AddArchetypeVolume(str(path), path.name.split(".")[0])
    assert node is not None and node.GetImageData() is not None, path
    return node
