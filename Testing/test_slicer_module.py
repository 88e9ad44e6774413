"""The Slicer module's files without running the engine: the .ui matches the Widget and the
parameter node, files on the volume's exact geometry, CMake lists, catalog entry."""

from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import SimpleITK as sitk

from slicer_testing import MODULE_DIR, UI_FILE, import_module, slicer_app  # noqa: F401 (fixture)

ROOT = MODULE_DIR.parent
SOURCE = (MODULE_DIR / "ARENASegmentation.py").read_text()


def ui_widgets() -> dict:
    """{widget name: class} of every widget in the .ui file (which must parse as XML)."""
    tree = ET.parse(UI_FILE)
    assert tree.getroot().tag == "ui"
    return {w.get("name"): w.get("class") for w in tree.iter("widget")}


def parameter_names() -> set:
    """Fields of the @parameterNodeWrapper class, read from the source (the wrapper itself only
    exists inside the Slicer application)."""
    for node in ast.walk(ast.parse(SOURCE)):
        if isinstance(node, ast.ClassDef) and node.name == "ARENASegmentationParameterNode":
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no ARENASegmentationParameterNode class")


def test_every_widget_the_widget_uses_exists_in_the_ui_file():
    widgets = ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", SOURCE))
    module = import_module()
    assert used, "the Widget uses no .ui widget?"
    assert used <= set(widgets), f"missing in .ui: {sorted(used - set(widgets))}"
    assert set(module.ARENASegmentationWidget.UI_WIDGETS) <= set(widgets)
    assert widgets["ARENASegmentation"] == "qMRMLWidget"


def test_ui_parameter_bindings_name_parameter_node_fields():
    tree = ET.parse(UI_FILE)
    bound = {p.find("string").text for p in tree.iter("property") if p.get("name") == "SlicerParameterName"}
    fields = parameter_names()
    assert bound <= fields, f"bound in .ui but not parameters: {sorted(bound - fields)}"
    assert {"inputVolume", "segmentationNode", "method", "initialRank", "lam", "steps", "device",
            "warmStart", "backbone"} <= bound


def test_panel_defaults_are_the_engine_defaults():
    from arenaseg.backbones import DEFAULT_BACKBONE, REGISTRY
    from arenaseg.training import AdaptSettings

    module = import_module()
    defaults = AdaptSettings()
    assert (module.DEFAULT_RANK, module.DEFAULT_LAMBDA, module.DEFAULT_STEPS) == (
        defaults.rank, defaults.lam, defaults.steps)
    assert module.DEFAULT_BACKBONE == DEFAULT_BACKBONE and set(module.BACKBONES) <= set(REGISTRY)
    from arenaseg.methods import METHODS

    assert module.METHODS[0] == "arena" and sorted(module.METHODS) == sorted(METHODS)


def test_logic_imports_without_qt_and_the_engine_is_found_next_to_the_module():
    from ARENASegmentationLib import dependencies

    module = import_module()
    assert module.ENGINE_DIR == MODULE_DIR and (module.ENGINE_DIR / "arenaseg" / "worker.py").is_file()
    assert not dependencies.unmet(dependencies.requirementsFor("lora"), dependencies.installedVersions())


def test_module_file_holds_the_template_classes_and_the_library_the_rest():
    """Module, parameter node, Widget, Logic, Test in the module file; no test stand-ins there;
    the worker process, installer, MRML I/O and result display in ARENASegmentationLib."""
    tree = ast.parse(SOURCE)
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    assert classes == ["ARENASegmentation", "ARENASegmentationParameterNode", "ARENASegmentationWidget",
                       "ARENASegmentationLogic", "ARENASegmentationTest"]
    assert "except ImportError" not in SOURCE and "Popen" not in SOURCE and "pip_install" not in SOURCE
    library = {p.stem for p in (MODULE_DIR / "ARENASegmentationLib").glob("*.py")}
    assert {"process", "dependencies", "mrmlio", "results", "panel"} <= library
    for path in (MODULE_DIR / "ARENASegmentationLib").glob("*.py"):
        # Qt-free at import (slicer-core has no Qt); the wait cursor imports qt inside Slicer only
        assert not re.search(r"^(import qt|from qt)\b", path.read_text(), re.M), path


def test_files_for_the_worker_keep_an_oblique_volume_geometry_exactly(slicer_app, tmp_path):  # noqa: F811
    """LPS/RAS, axis permutation and flips: the NRRD the worker reads maps every voxel to the
    same world point as the volume node, and a labelmap on that grid reads back voxel for voxel."""
    import slicer

    module = import_module()
    logic = module.ARENASegmentationLogic
    kji = (np.arange(7 * 9 * 11).reshape(7, 9, 11) % 251).astype(np.int16)
    ijk_to_ras = np.array([[0, -2.0, 0, 10], [1.5, 0, 0, -5], [0, 0, 3, 7], [0, 0, 0, 1]])
    volume = slicer.util.addVolumeFromArray(kji, ijk_to_ras, "oblique")
    nodes = slicer.mrmlScene.GetNumberOfNodes()

    logic.writeVolume(volume, tmp_path / "image.nrrd")
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes and volume.GetStorageNode() is None
    image = sitk.ReadImage(str(tmp_path / "image.nrrd"))
    assert np.array_equal(sitk.GetArrayFromImage(image), kji)
    for ijk in ([0, 0, 0], [10, 8, 6], [3, 5, 1]):
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        ras = ijk_to_ras @ np.array(ijk + [1.0])
        assert np.allclose(lps * [-1, -1, 1], ras[:3])

    mask = (kji > 100).astype(np.uint8)
    logic.writeLabelmap(mask, volume, tmp_path / "mask.nrrd")
    assert np.array_equal(logic.readLabelmap(str(tmp_path / "mask.nrrd"), volume), mask)

    moved = ijk_to_ras.copy()
    moved[0, 3] += 3.0  # one voxel step elsewhere: another grid
    shifted = slicer.util.addVolumeFromArray(kji, moved, "shifted")
    try:
        logic.readLabelmap(str(tmp_path / "mask.nrrd"), shifted)
    except RuntimeError as err:
        assert "not on the grid" in str(err)
    else:
        raise AssertionError("a labelmap on another grid was accepted")
    for node in (volume, shifted):
        slicer.mrmlScene.RemoveNode(node)


def test_cmake_lists_every_script_and_resource_of_the_module():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    listed = set(re.findall(r"^\s+([\w/.${}-]+\.(?:py|ui|png|safetensors|md))\s*$", text, re.M))
    listed = {p.replace("${MODULE_NAME}", "ARENASegmentation") for p in listed}
    assert "ARENASegmentationLib/process.py" in listed
    optional = set(re.findall(r"APPEND MODULE_PYTHON_RESOURCES ([\w/.-]+)", text))  # if(EXISTS ...)
    listed |= optional
    package = {str(p.relative_to(MODULE_DIR)) for folder in ("arenaseg", "ARENASegmentationLib", "SegmentEditorARENALib")
               for p in (MODULE_DIR / folder).rglob("*")
               if p.suffix in (".py", ".safetensors", ".md") and "__pycache__" not in p.parts}
    assert package <= listed, f"not listed: {sorted(package - listed)}"
    for path in ("ARENASegmentation.py", "Resources/UI/ARENASegmentation.ui",
                 "Resources/Icons/ARENASegmentation.png"):
        assert path in listed
    absent = [p for p in listed - optional if not (MODULE_DIR / p).is_file()]
    assert not absent, absent
    top = (ROOT / "CMakeLists.txt").read_text()
    assert "add_subdirectory(ARENASegmentation)" in top and 'EXTENSION_DEPENDS "PyTorch"' in top


def test_icon_is_a_128_pixel_png():
    data = (MODULE_DIR / "Resources" / "Icons" / "ARENASegmentation.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == int.from_bytes(data[20:24], "big") == 128


def cmake_set(name: str) -> str:
    match = re.search(rf'^set\({name} "([^"]*)"\)', (ROOT / "CMakeLists.txt").read_text(), re.M)
    assert match, name
    return match.group(1)


def test_extension_catalog_entry_follows_the_index_schema():
    """Validated against the index's schema (a copy of Slicer's Schemas/ file, v1.0.2)."""
    import jsonschema

    entry = json.loads((ROOT / "ARENASegmentation.json").read_text())
    schema = json.loads((ROOT / "Testing" / "schemas" / "slicer-extension-catalog-entry-schema-v1.0.2.json").read_text())
    assert entry["$schema"] == schema["$id"]
    jsonschema.validate(entry, schema)
    assert entry["category"] == cmake_set("EXTENSION_CATEGORY") == "Segmentation"
    assert entry["build_dependencies"] == cmake_set("EXTENSION_DEPENDS").split()


def test_every_address_is_the_one_homepage_whose_repository_name_starts_with_slicer():
    """README, CMake metadata, catalog entry and help link agree; the index wants 'Slicer...'."""
    homepage = cmake_set("EXTENSION_HOMEPAGE")
    owner, name = re.fullmatch(r"https://github\.com/([\w.-]+)/([\w.-]+)", homepage).groups()
    assert name.startswith("Slicer")
    entry = json.loads((ROOT / "ARENASegmentation.json").read_text())
    assert entry["scm_url"] == homepage + ".git"
    raw = f"https://raw.githubusercontent.com/{owner}/{name}/{entry['scm_revision']}/"
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in cmake_set(key).split():
            assert url.startswith(raw) and (ROOT / url[len(raw):]).is_file(), url
    module = import_module()
    assert module.HELP_URL.startswith(homepage + "#")
    readme = (ROOT / "README.md").read_text()
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", readme, re.M)}
    assert module.HELP_URL.split("#", 1)[1] in anchors
    assert 'href="{url}"' in SOURCE and ".format(url=HELP_URL)" in SOURCE
    mentioned = set(re.findall(r"github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?\b", readme))
    ours = {m for m in mentioned if "ARENASegmentation" in m}
    assert ours <= {f"{owner}/{name}"}, ours
    assert "git clone https://github.com" not in readme  # no promise of a published repository


def test_license_and_screenshot_are_there():
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    shot = (ROOT / "Resources" / "Screenshots" / "ARENASegmentation-1.png").read_bytes()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(shot[16:20], "big") >= 800


def test_self_test_never_installs_downloads_or_trains_on_a_test_factory(monkeypatch, slicer_app):  # noqa: F811
    """*Reload and Test* with ``--testing`` (a test factory) and without the engine's packages:
    the editor loop runs on real MRML, nothing is installed (a pip failure used to escape as
    ``CalledProcessError``), nothing downloaded, no training; outside testing mode, missing
    packages are named, not installed. The packages' absence is simulated (this environment has
    them all), and so is ``slicer.app`` (no Slicer application here)."""
    import types

    import slicer

    from ARENASegmentationLib import dependencies

    module = import_module()
    calls = []
    monkeypatch.setattr(dependencies, "installedVersions", lambda: {})
    monkeypatch.setattr(dependencies, "install", lambda *a, **k: calls.append("install"))
    monkeypatch.setattr(dependencies, "ensure", lambda *a, **k: calls.append("ensure"))
    monkeypatch.setattr(module.ARENASegmentationLogic, "startAdapt", lambda *a, **k: calls.append("train"))
    for testing in (True, False):
        monkeypatch.setattr(slicer, "app", types.SimpleNamespace(testingEnabled=lambda: testing,
                                                                processEvents=lambda: None), raising=False)
        shown = []
        test = module.ARENASegmentationTest()
        monkeypatch.setattr(test, "setUp", lambda: None)  # the shared test scene is not cleared
        monkeypatch.setattr(test, "delayDisplay", lambda message, msec=0: shown.append(message))
        monkeypatch.setattr(test, "test_AdaptSegmentCancelExport", lambda: calls.append("download"))
        test.runTest()
        assert shown[0] == "Editor loop test passed"
        if testing:
            assert shown[1].startswith("Testing mode") and len(shown) == 2
        else:
            assert "missing" in shown[1] and "monai>=1.4" in shown[1] and "torch>=2.4" in shown[1]
    assert calls == []


def test_every_mrml_widget_of_the_ui_gets_the_scene():
    """Slicer's template: each MRML widget's setMRMLScene slot is connected to the top-level
    qMRMLWidget's mrmlSceneChanged signal. A qMRMLPlotWidget without a scene draws nothing
    (qMRMLPlotViewPrivate::updateWidgetFromMRML returns at once when MRMLScene is null)."""
    tree = ET.parse(UI_FILE)
    root = tree.getroot().find("widget").get("name")
    mrml = {name for name, cls in ui_widgets().items() if cls.startswith("qMRML") and name != root}
    assert {"trainingPlotWidget", "rankPlotWidget", "rankTableView"} <= mrml
    connected = {c.findtext("receiver") for c in tree.iter("connection")
                 if c.findtext("sender") == root and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert mrml <= connected, f"no scene: {sorted(mrml - connected)}"


def test_the_panel_and_the_effect_install_through_one_entry_point(monkeypatch):
    """The panel's button and the effect both call ``dependencies.ensure``; a declined or
    failed install returns False from the slot (never raises) and the panel is refreshed."""
    import types

    module = import_module()
    from ARENASegmentationLib import dependencies

    asked = []

    def declined(method, backbone, onStatus=None, server=False):
        asked.append((method, backbone, server))
        onStatus and onStatus("The Python packages were not installed.")
        return False

    monkeypatch.setattr(dependencies, "ensure", declined)
    widget = module.ARENASegmentationWidget()
    widget.ui = types.SimpleNamespace(applyButton=types.SimpleNamespace(enabled=True),
                                      statusLabel=types.SimpleNamespace(text=""))
    refreshed = []
    monkeypatch.setattr(widget, "updateGUIFromParameterNode", lambda *args: refreshed.append(1))
    assert widget.ensureDependencies("arena", "merlin-resnet152") is False
    assert "not installed" in widget.ui.statusLabel.text and refreshed
    assert module.ensureDependencies("lora", "arena-small-ct-unet") is False
    # no server URL in the settings (none outside the Slicer application): the local packages
    assert asked == [("arena", "merlin-resnet152", False), ("lora", "arena-small-ct-unet", False)]


def test_training_curve_uses_the_step_column_and_two_colours(slicer_app):  # noqa: F811
    """A PlotTypeLine series ignores its X column (qMRMLPlotView: index for X unless
    IsXColumnRequired); a new series is black, so two curves must get their own colours."""
    import slicer

    from ARENASegmentationLib import results

    table, chart = results.updateTrainingNodes([(1, 0.9, 40), (2, 0.7, 35), (3, 0.5, 30)])
    try:
        series = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
        assert len(series) == 2
        for s in series:
            assert s.GetPlotType() == slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter and s.IsXColumnRequired()
            assert s.GetXColumnName() == "step"
        assert len({tuple(s.GetColor()) for s in series}) == 2 and (0, 0, 0) not in {tuple(s.GetColor()) for s in series}
    finally:
        for node in [table, chart] + series:
            slicer.mrmlScene.RemoveNode(node)


def test_extension_cmake_minimum_is_slicer_510s():
    """Slicer 5.10's SlicerConfig.cmake and extension template require CMake 3.20.6...3.22.6."""
    top = (ROOT / "CMakeLists.txt").read_text()
    assert "cmake_minimum_required(VERSION 3.20.6...3.22.6 FATAL_ERROR)" in top
