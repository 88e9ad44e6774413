"""ARENASegmentation: paint a structure on a few slices, press one button, get it in 3D.

The module adapts a frozen, pretrained 3D CT backbone to the painted structure with ARENA
(sparsity-regularised low-rank adapters that find their own rank per layer) and segments the
whole volume. The work runs in a separate process (``python -m arenaseg.worker JOB.json``) that
the Logic reads without blocking, so Slicer stays responsive and the run can be cancelled.

Layout (Slicer's scripted-module conventions):

- ``ARENASegmentation``: module description.
- ``ARENASegmentationParameterNode``: every setting of the panel (saved with the scene).
- ``ARENASegmentationWidget``: GUI wiring only.
- ``ARENASegmentationLogic``: MRML <-> files <-> engine worker. It does not use Qt, so it also runs
  with the Qt-free ``slicer-core`` wheel (batch scripts, the pytest suite in ``Testing/``).
- ``ARENASegmentationTest``: self-test on a Slicer sample CT.
"""

import atexit
import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path
from typing import Annotated, Callable, Optional

import numpy as np
import vtk

import slicer

try:  # Inside the Slicer application.
    import qt
    from slicer.i18n import tr as _
    from slicer.i18n import translate
    from slicer.ScriptedLoadableModule import *  # noqa: F403
    from slicer.util import VTKObservationMixin
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
    from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

    SLICER_APPLICATION = True
except ImportError:
    # Qt-free Slicer core (the slicer-core wheel): only the Logic is usable. These stand-ins keep
    # the class definitions below importable; they are never used inside the application.
    SLICER_APPLICATION = False
    qt = None

    def _(text):
        return text

    def translate(context, text):
        return text

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class VTKObservationMixin:
        def __init__(self):
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

        def moduleName(self):
            return type(self).__name__.removesuffix("Logic")

        def getParameterNode(self):
            """The module's singleton vtkMRMLScriptedModuleNode in slicer.mrmlScene."""
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName(), "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag(self.moduleName())
                node.SetName(self.moduleName())
                node.SetAttribute("ModuleName", self.moduleName())
                node = slicer.mrmlScene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=0):
            logging.info(message)

    parameterNodeWrapper = None


#: Engine package (shipped next to this file) and the Python packages it needs besides torch.
#: SimpleITK and numpy are deliberately absent: Slicer ships them and they must not be replaced.
ENGINE_DIR = Path(__file__).resolve().parent
ENGINE_REQUIREMENTS = ["monai>=1.4", "nibabel>=5", "safetensors>=0.4", "tqdm>=4.66", "einops>=0.7",
                       "peft>=0.21"]
TORCH_REQUIREMENT = ">=2.4"

#: Defaults of ``arenaseg.training.AdaptSettings`` (rank r0, λ, steps), repeated here because
#: this file must import without torch (first start, before the dependencies are installed).
#: ``Testing/test_slicer_module.py`` checks that they stay equal.
DEFAULT_BACKBONE = "arena-small-ct-unet"
BACKBONES = [DEFAULT_BACKBONE, "fseft-swinunetr", "swinunetr-btcv", "suprem-swinunetr", "suprem-unet",
             "monai-bundle-swin-unetr-btcv", "monai-bundle-wholebody-ct"]
METHODS = ["arena", "lora", "adalora", "linear-probe", "bitfit", "affine-ln", "full", "zero-shot"]
DEVICES = ["auto", "cpu", "cuda"]
DEFAULT_RANK = 8
DEFAULT_LAMBDA = 4.0
DEFAULT_STEPS = 60

RESULT_SUFFIX = " (ARENA)"
BACKGROUND_LABEL = 2  # value of the "known background" voxels in the annotation file sent to the worker
TAG = "ARENASegmentation."  # prefix of the segment tags that record a result


#
# ARENASegmentation
#


class ARENASegmentation(ScriptedLoadableModule):
    """Module description (Slicer's ScriptedLoadableModule)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("ARENA Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []  # PyTorch is an extension dependency (PyTorchUtils)
        self.parent.contributors = ["ARENASegmentation developers"]
        self.parent.helpText = _("""
Segment a structure in a CT from a few painted slices. Paint the structure on 2-5 slices with the
Segment Editor, choose the segment here and press <b>Adapt and segment</b>: a pretrained backbone
is adapted with sparse low-rank adapters (ARENA) in a background process and the 3D result is
added to the same segmentation. Correct it with any Segment Editor effect and press the button
again: the next run starts from the previous adapter.
See <a href="https://github.com/arenaseg/ARENASegmentation#3d-slicer-module">the documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Method: Baklouti et al., Regularized Low-Rank Adaptation for Few-Shot Organ Segmentation (ARENA).
The default backbone was trained on the TotalSegmentator test scans (Wasserthal et al., Apache-2.0).
""")


#
# ARENASegmentationParameterNode
#

if parameterNodeWrapper is not None:

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
        fillTarget - write the prediction into the target segment (outside the painted slices)
            instead of a new "<name> (ARENA)" segment.
        warmStart - start from the adapter of the previous run on this segment.
        adapterPath - adapter of the last run (used by warm start and "Save adapter").
        applyAdapterPath - saved adapter to apply to the current volume.
        result - JSON summary of the last run (ranks, parameter counts).
        """

        inputVolume: vtkMRMLScalarVolumeNode
        segmentationNode: vtkMRMLSegmentationNode
        targetSegmentID: str = ""
        backgroundSegmentID: str = ""
        backbone: Annotated[str, Choice(BACKBONES)] = DEFAULT_BACKBONE
        method: Annotated[str, Choice(METHODS)] = "arena"
        initialRank: Annotated[int, WithinRange(1, 128)] = DEFAULT_RANK
        lam: Annotated[float, WithinRange(0.0, 100.0)] = DEFAULT_LAMBDA
        steps: Annotated[int, WithinRange(1, 100000)] = DEFAULT_STEPS
        device: Annotated[str, Choice(DEVICES)] = "auto"
        fillTarget: bool = False
        warmStart: bool = True
        adapterPath: str = ""
        applyAdapterPath: Path
        result: str = ""

else:
    ARENASegmentationParameterNode = None


#
# ARENASegmentationWidget
#


class ARENASegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI wiring only: every computation is in :class:`ARENASegmentationLogic`."""

    #: Names of the .ui widgets this class uses (checked against the .ui file by the tests).
    UI_WIDGETS = (
        "inputVolumeSelector", "segmentationSelector", "targetSegmentSelector",
        "backgroundSegmentSelector", "backboneComboBox", "methodComboBox", "fillTargetCheckBox",
        "warmStartCheckBox", "advancedCollapsibleButton", "initialRankSpinBox", "lambdaSpinBox",
        "stepsSpinBox", "deviceComboBox", "applyButton", "progressBar", "statusLabel",
        "resultsCollapsibleButton", "rankSummaryLabel", "rankTableView", "rankPlotWidget",
        "saveAdapterButton", "applyAdapterPathLineEdit", "applyAdapterButton",
        "exportSegmentButton",
    )
    POLL_INTERVAL_MS = 100

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = None
        self._dependenciesChecked = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ARENASegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = ARENASegmentationLogic()
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollWorker)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Segment selectors are not handled by parameter-node GUI connectors: wired by hand.
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.targetSegmentSelector.connect("currentSegmentChanged(QString)", self.onTargetSegmentChanged)
        self.ui.backgroundSegmentSelector.connect("currentSegmentChanged(QString)", self.onBackgroundSegmentChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.saveAdapterButton.connect("clicked(bool)", self.onSaveAdapter)
        self.ui.applyAdapterButton.connect("clicked(bool)", self.onApplyAdapter)
        self.ui.exportSegmentButton.connect("clicked(bool)", self.onExportSegment)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Application closing: stop a running worker, it would otherwise outlive Slicer."""
        if self.logic:
            self.logic.cancel()
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

    def onSceneStartClose(self, caller, event) -> None:
        if self.logic:
            self.logic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
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
        for selector, segmentId in ((self.ui.targetSegmentSelector, p.targetSegmentID),
                                    (self.ui.backgroundSegmentSelector, p.backgroundSegmentID)):
            wasBlocked = selector.blockSignals(True)
            selector.setCurrentNode(segmentationNode)
            selector.setCurrentSegmentID(segmentId)
            selector.blockSignals(wasBlocked)
        running = self.logic.isRunning
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the background process; the segmentation stays as it is")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = _("Adapt and segment")
            ready = bool(p.inputVolume and segmentationNode and p.targetSegmentID)
            self.ui.applyButton.enabled = ready
            self.ui.applyButton.toolTip = (
                _("Adapt the backbone to the painted slices and segment the whole volume") if ready
                else _("Select the CT volume, the segmentation and the painted target segment"))
        self.ui.saveAdapterButton.enabled = not running and bool(p.adapterPath) and os.path.isfile(p.adapterPath)
        self.ui.applyAdapterButton.enabled = not running and bool(p.inputVolume) and os.path.isfile(
            str(p.applyAdapterPath or ""))
        self.ui.exportSegmentButton.enabled = bool(segmentationNode and p.targetSegmentID and p.inputVolume)
        self.showResult(p.result)

    def onSegmentationChanged(self, node) -> None:
        """Forget segment IDs that the newly selected segmentation does not have."""
        p = self._parameterNode
        if not p:
            return
        segmentation = node.GetSegmentation() if node else None
        if not segmentation or not segmentation.GetSegment(p.targetSegmentID):
            p.targetSegmentID = ""
        if not segmentation or not segmentation.GetSegment(p.backgroundSegmentID):
            p.backgroundSegmentID = ""

    def onTargetSegmentChanged(self, segmentId) -> None:
        if self._parameterNode:
            self._parameterNode.targetSegmentID = segmentId or ""

    def onBackgroundSegmentChanged(self, segmentId) -> None:
        if self._parameterNode:
            self._parameterNode.backgroundSegmentID = segmentId or ""

    def ensureDependencies(self) -> bool:
        """First use: torch through the PyTorch extension, the rest with pip, after asking."""
        if self._dependenciesChecked:
            return True
        # No wait cursor: the installers ask questions in dialogs.
        with slicer.util.tryWithErrorDisplay(_("Installing the Python packages ARENA needs failed.")):
            ARENASegmentationLogic.installDependencies(askConfirmation=True)
            self._dependenciesChecked = True
            message = ARENASegmentationLogic.cudaMessage()
            if message:
                self.ui.statusLabel.text = message
        return self._dependenciesChecked

    def onApplyButton(self) -> None:
        if self.logic.isRunning:
            self.logic.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        if not self.ensureDependencies():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("ARENA could not start."), waitCursor=True):
            self.logic.startAdapt(
                p.inputVolume, p.segmentationNode, p.targetSegmentID,
                backgroundSegmentId=p.backgroundSegmentID, backbone=p.backbone, method=p.method,
                initialRank=p.initialRank, lam=p.lam, steps=p.steps, device=p.device,
                fillTarget=p.fillTarget, warmStart=p.warmStart,
                onProgress=self.onWorkerProgress, onFinished=self.onWorkerFinished)
            self.ui.progressBar.maximum = max(1, p.steps)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting the background process...")
            self._pollTimer.start()
            self.updateGUIFromParameterNode()

    def onApplyAdapter(self) -> None:
        if not self.ensureDependencies():
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("The adapter could not be applied."), waitCursor=True):
            if not p.segmentationNode:
                p.segmentationNode = self.logic.createSegmentationNode(p.inputVolume)
            self.logic.startApplyAdapter(p.inputVolume, str(p.applyAdapterPath), p.segmentationNode,
                                         device=p.device, onFinished=self.onWorkerFinished)
            self.ui.progressBar.maximum = 0  # busy indicator: segmenting has no steps
            self.ui.statusLabel.text = _("Segmenting with the saved adapter...")
            self._pollTimer.start()
            self.updateGUIFromParameterNode()

    def onPollWorker(self) -> None:
        """Timer slot: hands the worker's pending events to the Logic; never blocks."""
        if not self.logic.processEvents():
            self._pollTimer.stop()
            self.updateGUIFromParameterNode()

    def onWorkerProgress(self, event: dict) -> None:
        self.ui.progressBar.maximum = max(1, event["steps"])
        self.ui.progressBar.value = event["step"]
        device = (self.logic.job or {}).get("device") or "?"
        self.ui.statusLabel.text = _("Step {step}/{steps} on {device}: loss {loss:.3f}, effective rank {rank}").format(
            step=event["step"], steps=event["steps"], device=device, loss=event["loss"], rank=event["total_rank"])

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
            self.ui.statusLabel.text = _("Done in {seconds:.0f} s: segment '{name}'").format(
                seconds=summary.get("seconds", 0), name=outcome["segmentName"])
            self.ui.resultsCollapsibleButton.collapsed = False
        elif status == "cancelled":
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Cancelled: the segmentation is unchanged")
        else:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Failed: {message}").format(message=outcome["message"])
            slicer.util.errorDisplay(outcome["message"], windowTitle=_("ARENA Segmentation"))
        self.updateGUIFromParameterNode()

    def showResult(self, resultJson: str) -> None:
        """Rank summary, per-layer table and chart of the last result."""
        if not resultJson:
            self.ui.rankSummaryLabel.text = _("No result yet")
            return
        summary = json.loads(resultJson)
        self.ui.rankSummaryLabel.text = ARENASegmentationLogic.summaryText(summary)
        tableNode, chartNode = self.logic.rankNodes()
        self.ui.rankTableView.setMRMLTableNode(tableNode)
        if chartNode:
            viewNode = self._plotViewNode()
            viewNode.SetPlotChartNodeID(chartNode.GetID())
            self.ui.rankPlotWidget.setMRMLPlotViewNode(viewNode)

    def _plotViewNode(self):
        """A plot view node of this panel's own (not in the view layout), showing the rank chart."""
        viewNode = slicer.mrmlScene.GetSingletonNode("ARENASegmentation", "vtkMRMLPlotViewNode")
        if viewNode is None:
            viewNode = slicer.vtkMRMLPlotViewNode()
            viewNode.SetSingletonTag("ARENASegmentation")
            viewNode.SetName("ARENA rank plot view")
            viewNode = slicer.mrmlScene.AddNode(viewNode)
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
        segmentId = self.logic.resultSegmentId(p.segmentationNode, p.targetSegmentID) or p.targetSegmentID
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


def segmentTag(segment, key: str) -> str:
    """Value of the ARENA tag ``key`` of a vtkSegment ("" when absent)."""
    value = vtk.reference("")
    return str(value) if segment.GetTag(TAG + key, value) else ""


_RUNNING = set()  # workers of this process, stopped when Python exits (no orphan process)


@atexit.register
def _stopWorkers() -> None:
    for worker in list(_RUNNING):
        if worker.process.poll() is None:
            worker.process.terminate()


class WorkerProcess:
    """One ``python -m arenaseg.worker JOB.json`` process, read without blocking.

    A daemon thread reads the JSON lines of the child's stdout into a queue (the same design as
    ``slicer.util.launchConsoleProcess(blocking=False)``); :meth:`events` drains that queue and
    never waits, so the caller (a Qt timer in the application, a loop in tests) stays in control.
    stderr goes to a log file, whose tail explains a crash.
    """

    def __init__(self, args: list, env: dict, logPath: Path):
        self.logPath = logPath
        self._log = open(logPath, "wb")
        popenArgs = {}
        if os.name == "nt":  # hide the console window
            info = subprocess.STARTUPINFO()
            info.dwFlags = subprocess.STARTF_USESHOWWINDOW
            popenArgs["startupinfo"] = info
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._log, env=env,
                                        text=True, bufsize=1, **popenArgs)
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self.cancelRequested = None  # time.monotonic() of the cancel request
        _RUNNING.add(self)

    def _read(self) -> None:
        for line in self.process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                self._queue.put(json.loads(line))
            except ValueError:  # a stray print in the child: logged by the reading (main) thread
                self._queue.put({"event": "log", "line": line})
        self.process.wait()
        self._queue.put({"event": "exit", "returncode": self.process.returncode})

    def events(self) -> list:
        """Every event received since the last call (possibly none); ends with ``exit``."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if self.cancelRequested and self.process.poll() is None and time.monotonic() - self.cancelRequested > 5:
            self.process.kill()  # SIGTERM is honoured within a step; this is the safety net
        return out

    def cancel(self) -> None:
        if self.process.poll() is None and self.cancelRequested is None:
            self.cancelRequested = time.monotonic()
            self.process.terminate()  # SIGTERM on POSIX: the worker stops after the current step

    def logTail(self, lines: int = 15) -> str:
        self._log.flush()
        try:
            return "\n".join(self.logPath.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        _RUNNING.discard(self)
        self._log.close()
        if self.process.stdout:
            self.process.stdout.close()


class ARENASegmentationLogic(ScriptedLoadableModuleLogic):
    """MRML <-> files <-> ARENA engine worker, without Qt.

    Usage (also from the Python console or a test)::

        logic = ARENASegmentationLogic()
        logic.startAdapt(volumeNode, segmentationNode, segmentId)
        outcome = logic.waitForCompletion()  # or call logic.processEvents() from a timer
        outcome["status"], outcome["segmentId"], outcome["summary"]["effective_rank"]

    One job runs at a time. A job only changes the scene when it succeeds: the CT and the painted
    segment are exported to temporary files on the volume's exact geometry, the worker writes its
    labelmap on the same grid, and the labelmap is imported into the segmentation. Painted voxels
    are always kept.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.job = None  # dict describing the running job, or None
        self.lastOutcome = None
        self.lastProgress = None

    if SLICER_APPLICATION:

        def getParameterNode(self):
            return ARENASegmentationParameterNode(super().getParameterNode())

    # --- dependencies ---------------------------------------------------------------------

    @staticmethod
    def missingPythonPackages() -> list:
        """Importable names the engine needs and that are absent (``torch`` first)."""
        import importlib.util

        names = ["torch", "monai", "nibabel", "safetensors", "tqdm", "einops", "SimpleITK", "numpy"]
        return [name for name in names if importlib.util.find_spec(name) is None]

    @staticmethod
    def installDependencies(askConfirmation: bool = True) -> None:
        """Install what the engine needs into Slicer's Python, after the user confirms.

        torch comes from the PyTorch extension (``PyTorchUtils`` picks the CUDA build that fits
        the GPU driver, or the CPU build); the other packages from pip with a constraints file
        that pins the numpy, SimpleITK and torch already present, so that nothing Slicer ships
        is replaced.

        Raises:
            RuntimeError: the PyTorch extension is missing, or the user declined.
        """
        missing = ARENASegmentationLogic.missingPythonPackages()
        if not missing:
            return
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("ARENA needs PyTorch: install the 'PyTorch' extension from the "
                                     "Extensions Manager, restart Slicer and try again.")) from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                torch = torchLogic.installTorch(askConfirmation=askConfirmation,
                                                torchVersionRequirement=TORCH_REQUIREMENT)
                if torch is None:
                    raise RuntimeError(_("PyTorch was not installed: ARENA cannot run without it."))
        missing = [name for name in ARENASegmentationLogic.missingPythonPackages() if name != "torch"]
        if not missing:
            return
        constraints = ARENASegmentationLogic._writeConstraints()
        try:
            import slicer.packaging as packaging  # Slicer >= 5.12
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(ENGINE_REQUIREMENTS, constraints=constraints, prompt_install=askConfirmation,
                                 requester="ARENASegmentation")
            return
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("ARENA needs these Python packages: {packages}. Install them now (a few minutes)?").format(
                    packages=", ".join(ENGINE_REQUIREMENTS)), windowTitle=_("ARENA Segmentation")):
            raise RuntimeError(_("The Python packages were not installed: ARENA cannot run without them."))
        slicer.util.pip_install(["-c", str(constraints)] + ENGINE_REQUIREMENTS)

    @staticmethod
    def _writeConstraints() -> Path:
        """A pip constraints file pinning the installed numpy, SimpleITK and torch."""
        from importlib.metadata import PackageNotFoundError, version

        pins = []
        for name in ("numpy", "SimpleITK", "torch"):
            try:
                pins.append(f"{name}=={version(name)}")
            except PackageNotFoundError:
                pass
        path = Path(tempfile.gettempdir()) / "ARENASegmentation-constraints.txt"
        path.write_text("\n".join(pins) + "\n")
        return path

    @staticmethod
    def cudaMessage() -> str:
        """A sentence for the panel when no CUDA GPU is usable; empty when one is."""
        try:
            import torch
        except ImportError:
            return ""
        if torch.cuda.is_available():
            return ""
        if "+cpu" in torch.__version__ or torch.version.cuda is None:
            return _("PyTorch is the CPU build: ARENA runs on the CPU (slower). For a GPU, reinstall "
                     "PyTorch from the PyTorch Utils module.")
        return _("No CUDA GPU is usable (driver or device missing): ARENA runs on the CPU (slower).")

    # --- jobs -----------------------------------------------------------------------------

    @property
    def isRunning(self) -> bool:
        return self.job is not None

    @staticmethod
    def pythonExecutable() -> str:
        """The Python that runs the worker: PythonSlicer inside Slicer, else this Python."""
        if SLICER_APPLICATION:
            found = shutil.which("PythonSlicer")
            if not found:
                raise RuntimeError(_("PythonSlicer was not found: reinstall Slicer."))
            return found
        return sys.executable

    @staticmethod
    def workerEnvironment() -> dict:
        """Environment of the worker: Slicer's startup environment inside the application (the
        PythonSlicer launcher sets up the rest), this process's environment otherwise; the engine
        folder is put first on PYTHONPATH."""
        env = slicer.util.startupEnvironment() if SLICER_APPLICATION else os.environ.copy()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ENGINE_DIR), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        return env

    @staticmethod
    def _newRunDirectory() -> Path:
        base = None
        if SLICER_APPLICATION:
            base = Path(slicer.app.temporaryPath) / "ARENASegmentation"
            base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="ARENASegmentation-run-", dir=base))

    def startAdapt(self, volumeNode, segmentationNode, targetSegmentId: str, backgroundSegmentId: str = "",
                   backbone: str = DEFAULT_BACKBONE, method: str = "arena", initialRank: int = DEFAULT_RANK,
                   lam: float = DEFAULT_LAMBDA, steps: int = DEFAULT_STEPS, device: str = "auto",
                   fillTarget: bool = False, warmStart: bool = True, warmStartAdapter: Optional[str] = None,
                   structure: Optional[str] = None,
                   settings: Optional[dict] = None, onProgress: Optional[Callable] = None,
                   onFinished: Optional[Callable] = None) -> None:
        """Start adapting to the painted segment in a background process; returns at once.

        Args:
            volumeNode: CT scalar volume (HU).
            segmentationNode: holds the painted target segment; receives the result.
            targetSegmentId: segment painted on a few slices (all its voxels lie on those slices;
                other voxels of those slices count as background).
            backgroundSegmentId: optional segment of voxels known not to be the structure: the
                result is cleared there (painted voxels excepted).
            method, initialRank, lam, steps: ARENA settings (``arenaseg.training.AdaptSettings``
                fields method, rank, lam, steps); ``settings`` adds or overrides any other field.
            device: "auto", "cpu" or "cuda".
            fillTarget: write the result into the target segment instead of a new segment
                "<target name> (ARENA)".
            warmStart: start from the adapter that the previous run on this target segment
                recorded (segment tag), when its file still exists; otherwise start fresh.
            warmStartAdapter: an adapter file to start from instead (overrides ``warmStart``).
            structure: structure name stored in the adapter; the target segment's name by
                default (a name the backbone knows, e.g. "liver", starts its head pretrained).
            onProgress: called with each ``progress`` event (step, steps, loss, total_rank, ranks).
            onFinished: called once with the outcome dict (see :meth:`processEvents`).

        Raises:
            RuntimeError: a job is running, or an input is missing or empty.
        """
        if self.job is not None:
            raise RuntimeError(_("An ARENA job is already running: cancel it or wait for it to end."))
        if not volumeNode or not volumeNode.GetImageData():
            raise RuntimeError(_("Select a CT volume that holds an image."))
        if not segmentationNode:
            raise RuntimeError(_("Select the segmentation that holds the painted slices."))
        segment = segmentationNode.GetSegmentation().GetSegment(targetSegmentId) if targetSegmentId else None
        if segment is None:
            raise RuntimeError(_("Select the painted target segment."))
        painted = self.segmentArray(segmentationNode, targetSegmentId, volumeNode)
        if not painted.any():
            raise RuntimeError(_("Segment '{name}' has no voxel inside volume '{volume}': paint the structure "
                                 "on a few slices first.").format(name=segment.GetName(), volume=volumeNode.GetName()))
        background = None
        if backgroundSegmentId and segmentationNode.GetSegmentation().GetSegment(backgroundSegmentId):
            background = self.segmentArray(segmentationNode, backgroundSegmentId, volumeNode) > 0
            background = background if background.any() else None  # an empty segment says nothing

        if warmStartAdapter is None and warmStart and \
                segmentTag(segment, "Method") in ("", method) and segmentTag(segment, "Backbone") in ("", backbone):
            warmStartAdapter = segmentTag(segment, "Adapter") or None  # only for the same method and backbone
        if warmStartAdapter and not os.path.isfile(warmStartAdapter):
            logging.warning(f"ARENA: warm-start adapter '{warmStartAdapter}' is gone; starting fresh")
            warmStartAdapter = None

        runDir = self._newRunDirectory()
        try:
            self.writeVolume(volumeNode, runDir / "image.nrrd")
            annotations = (painted > 0).astype(np.uint8)
            if background is not None:  # known "not the structure" voxels enter the loss
                annotations[background & (annotations == 0)] = BACKGROUND_LABEL
            self.writeLabelmap(annotations, volumeNode, runDir / "painted.nrrd")
            jobSettings = dict(method=method, rank=int(initialRank), lam=float(lam), steps=int(steps))
            jobSettings.update(settings or {})
            name = segment.GetName()
            job = {
                "command": "adapt", "image": str(runDir / "image.nrrd"),
                "annotations": str(runDir / "painted.nrrd"), "label": 1,
                "out": str(runDir / "result.nrrd"), "adapter_out": str(runDir / "adapter.safetensors"),
                "structure": structure or name.strip().lower().replace(" ", "_"),
                "backbone": backbone, "device": device, "warm_start": warmStartAdapter,
                "background_label": BACKGROUND_LABEL if background is not None else None,
                "settings": jobSettings,
            }
            self._launch(job, runDir, onProgress, onFinished, dict(
                volumeNode=volumeNode, segmentationNode=segmentationNode, targetSegmentId=targetSegmentId,
                painted=painted, background=background, fillTarget=fillTarget, targetName=name,
                warmStart=warmStartAdapter))
        except BaseException:
            shutil.rmtree(runDir, ignore_errors=True)
            raise

    def startApplyAdapter(self, volumeNode, adapterPath: str, segmentationNode, segmentName: Optional[str] = None,
                          device: str = "auto", onFinished: Optional[Callable] = None) -> None:
        """Segment ``volumeNode`` (e.g. a new patient) with a saved adapter, in the background.

        The result goes into a new segment of ``segmentationNode`` named ``segmentName``, by
        default "<structure stored in the adapter> (ARENA)".
        """
        if self.job is not None:
            raise RuntimeError(_("An ARENA job is already running: cancel it or wait for it to end."))
        if not volumeNode or not volumeNode.GetImageData():
            raise RuntimeError(_("Select a CT volume that holds an image."))
        if not adapterPath or not os.path.isfile(adapterPath):
            raise RuntimeError(_("Adapter file '{path}' does not exist.").format(path=adapterPath))
        runDir = self._newRunDirectory()
        try:
            self.writeVolume(volumeNode, runDir / "image.nrrd")
            job = {"command": "segment", "image": str(runDir / "image.nrrd"), "adapter": str(adapterPath),
                   "out": str(runDir / "result.nrrd"), "device": device}
            self._launch(job, runDir, None, onFinished, dict(
                volumeNode=volumeNode, segmentationNode=segmentationNode, segmentName=segmentName,
                adapterPath=str(adapterPath)))
        except BaseException:
            shutil.rmtree(runDir, ignore_errors=True)
            raise

    def _launch(self, job: dict, runDir: Path, onProgress, onFinished, context: dict) -> None:
        jobPath = runDir / "job.json"
        jobPath.write_text(json.dumps(job, indent=1))
        worker = WorkerProcess([self.pythonExecutable(), "-m", "arenaseg.worker", str(jobPath)],
                               self.workerEnvironment(), runDir / "worker.log")
        self.job = dict(job=job, runDir=runDir, worker=worker, onProgress=onProgress, onFinished=onFinished,
                        context=context, final=None, history=[])
        self.lastProgress = None
        logging.info(f"ARENA: {job['command']} started (process {worker.process.pid}, folder {runDir})")

    def cancel(self) -> None:
        """Ask the running job to stop (SIGTERM: the worker stops within about one step and
        writes nothing); :meth:`processEvents` then reports ``cancelled``. No-op when idle."""
        if self.job is not None:
            self.job["worker"].cancel()

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
                self.lastProgress = event
                job["history"].append((event["step"], event["loss"], event["total_rank"]))
                if job["onProgress"]:
                    job["onProgress"](event)
            elif kind in ("done", "error", "cancelled"):
                job["final"] = event
            elif kind == "started":
                job["device"] = event.get("device")  # where the worker really runs
            elif kind == "log":
                logging.info(f"ARENA worker: {event['line']}")
            elif kind == "exit":
                self._finish(event["returncode"])
                return False
        return True

    def waitForCompletion(self, timeout: Optional[float] = None, pollInterval: float = 0.1) -> dict:
        """Block until the running job ends (for scripts and tests; the GUI uses a timer).

        Returns:
            The outcome dict (see :meth:`processEvents`).

        Raises:
            TimeoutError: still running after ``timeout`` seconds (the job is left running).
        """
        start = time.monotonic()
        while self.processEvents():
            if timeout is not None and time.monotonic() - start > timeout:
                raise TimeoutError(f"ARENA job still running after {timeout} s")
            time.sleep(pollInterval)
        return self.lastOutcome

    def _finish(self, returnCode: int) -> None:
        job, self.job = self.job, None
        worker = job["worker"]
        final = job["final"] or {}
        outcome = {"status": "error", "message": "", "segmentId": None, "segmentName": None, "summary": None}
        try:
            if final.get("event") == "done" and returnCode == 0:
                if job["job"]["command"] == "adapt":
                    outcome.update(self._importAdaptResult(job, final))
                else:
                    outcome.update(self._importSegmentResult(job, final))
                outcome["status"] = "done"
            elif final.get("event") == "cancelled" or (worker.cancelRequested and not final):
                outcome.update(status="cancelled", message=_("Cancelled"))
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
            self._cleanRunDirectory(job["runDir"], keepAdapter=outcome["status"] == "done")
        self.lastOutcome = outcome
        if job["onFinished"]:
            job["onFinished"](outcome)

    @staticmethod
    def _cleanRunDirectory(runDir: Path, keepAdapter: bool) -> None:
        """Remove the run's files; keep the adapter of a successful run (warm start, saving)."""
        if not keepAdapter or not (runDir / "adapter.safetensors").is_file():
            shutil.rmtree(runDir, ignore_errors=True)
            return
        for path in runDir.iterdir():
            if path.name != "adapter.safetensors":
                path.unlink(missing_ok=True) if path.is_file() else shutil.rmtree(path, ignore_errors=True)

    def _importAdaptResult(self, job: dict, done: dict) -> dict:
        ctx = job["context"]
        volumeNode, segmentationNode = ctx["volumeNode"], ctx["segmentationNode"]
        result = self.readLabelmap(done["segmentation"], volumeNode) > 0
        painted = ctx["painted"] > 0
        if ctx["background"] is not None:
            result &= ~ctx["background"]
        result |= painted  # what the user painted is never erased
        segmentation = segmentationNode.GetSegmentation()
        target = segmentation.GetSegment(ctx["targetSegmentId"])
        if target is None:
            raise RuntimeError(_("The target segment was deleted while ARENA was running."))
        created = None
        if ctx["fillTarget"]:
            segmentId = ctx["targetSegmentId"]
        else:
            segmentId = self.resultSegmentId(segmentationNode, ctx["targetSegmentId"])
            if segmentId is None:
                name = ctx["targetName"] + RESULT_SUFFIX
                color = [0.5 + 0.5 * c for c in target.GetColor()]  # lighter shade of the target
                segmentId = created = segmentation.AddEmptySegment(
                    segmentation.GenerateUniqueSegmentID(name), name, color)
        adapter = str(job["runDir"] / "adapter.safetensors")
        summary = {key: done.get(key) for key in (
            "ranks", "effective_rank", "initial_rank", "trainable_parameters", "active_parameters",
            "seconds", "device")}
        settings = job["job"]["settings"]
        summary.update(adapter=adapter, method=settings.get("method"), backbone=job["job"].get("backbone"),
                       steps=settings.get("steps"),
                       lam=settings.get("lam"), rank=settings.get("rank"), warm_start=ctx["warmStart"],
                       structure=job["job"]["structure"], loss=(done.get("loss") or [None])[-1])
        segment = segmentation.GetSegment(segmentId)
        try:
            self.updateRankNodes(summary, segment.GetName(), job["history"])
            slicer.util.updateSegmentBinaryLabelmapFromArray(result.astype(np.uint8), segmentationNode, segmentId,
                                                             volumeNode)
        except Exception:
            if created:  # leave the segmentation as it was
                segmentation.RemoveSegment(created)
            raise
        segment = segmentation.GetSegment(segmentId)
        self.setResultTags(segment, summary, ctx["targetSegmentId"])
        for key, value in (("Adapter", adapter), ("Method", summary["method"]), ("Backbone", summary["backbone"])):
            target.SetTag(TAG + key, str(value))  # the next run on this segment can warm-start
        return {"segmentId": segmentId, "segmentName": segment.GetName(), "summary": summary}

    def _importSegmentResult(self, job: dict, done: dict) -> dict:
        ctx = job["context"]
        volumeNode, segmentationNode = ctx["volumeNode"], ctx["segmentationNode"]
        if segmentationNode is None:
            segmentationNode = self.createSegmentationNode(volumeNode)
        result = self.readLabelmap(done["segmentation"], volumeNode) > 0
        structure = done.get("structure") or Path(ctx["adapterPath"]).stem
        name = ctx["segmentName"] or structure + RESULT_SUFFIX
        segmentation = segmentationNode.GetSegmentation()
        segmentId = segmentation.GetSegmentIdBySegmentName(name)
        if not segmentId:
            segmentId = segmentation.AddEmptySegment(segmentation.GenerateUniqueSegmentID(name), name)
        ranks = done.get("ranks") or {}
        summary = {"ranks": ranks, "effective_rank": sum(ranks.values()), "adapter": ctx["adapterPath"],
                   "seconds": done.get("seconds"), "structure": structure}
        self.updateRankNodes(summary, name, [])
        slicer.util.updateSegmentBinaryLabelmapFromArray(result.astype(np.uint8), segmentationNode, segmentId,
                                                         volumeNode)
        self.setResultTags(segmentation.GetSegment(segmentId), summary, "")
        return {"segmentId": segmentId, "segmentName": name, "summary": summary}

    # --- results --------------------------------------------------------------------------

    @staticmethod
    def resultSegmentId(segmentationNode, targetSegmentId: str) -> Optional[str]:
        """ID of the segment that holds ARENA's result for ``targetSegmentId``, or None."""
        if not segmentationNode or not targetSegmentId:
            return None
        segmentation = segmentationNode.GetSegmentation()
        for index in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(index)
            if segmentId != targetSegmentId and \
                    segmentTag(segmentation.GetSegment(segmentId), "SourceSegment") == targetSegmentId:
                return segmentId
        return None

    @staticmethod
    def setResultTags(segment, summary: dict, sourceSegmentId: str) -> None:
        """Record the result on the segment (tags are saved in the scene and in .seg.nrrd)."""
        tags = {"SourceSegment": sourceSegmentId, "Adapter": summary.get("adapter") or "",
                "EffectiveRank": summary.get("effective_rank"), "InitialRank": summary.get("initial_rank"),
                "Ranks": json.dumps(summary.get("ranks") or {}),
                "TrainableParameters": summary.get("trainable_parameters"),
                "ActiveParameters": summary.get("active_parameters"), "Method": summary.get("method"),
                "Backbone": summary.get("backbone"),
                "Steps": summary.get("steps"), "Lambda": summary.get("lam"), "Device": summary.get("device")}
        for key, value in tags.items():
            if value is not None and value != "" or key == "SourceSegment":
                segment.SetTag(TAG + key, str(value))

    @staticmethod
    def summaryText(summary: dict) -> str:
        """One line for the panel: total rank, initial rank, parameter counts."""
        parts = [_("Effective rank {rank}").format(rank=summary.get("effective_rank"))]
        if summary.get("initial_rank"):
            parts[0] += _(" of {initial}").format(initial=summary["initial_rank"])
        if summary.get("trainable_parameters"):
            parts.append(_("{active:,} of {trainable:,} adapter+head parameters active").format(
                active=summary.get("active_parameters") or 0, trainable=summary["trainable_parameters"]))
        if summary.get("seconds"):
            parts.append(_("{seconds:.0f} s on {device}").format(seconds=summary["seconds"],
                                                                  device=summary.get("device") or "?"))
        return "; ".join(parts)

    RANK_TABLE_NAME = "ARENA ranks"
    RANK_CHART_NAME = "ARENA ranks"

    def rankNodes(self):
        """The table (per-layer effective rank) and chart nodes of the last result, or (None, None)."""
        table = slicer.mrmlScene.GetFirstNode(self.RANK_TABLE_NAME, "vtkMRMLTableNode")
        chart = slicer.mrmlScene.GetFirstNode(self.RANK_CHART_NAME, "vtkMRMLPlotChartNode")
        return table, chart

    def updateRankNodes(self, summary: dict, resultName: str, history: list):
        """Fill the rank table (index, layer, effective rank) and a bar chart of it; the training
        curve (step, loss, total rank) goes to the table "ARENA training".

        Returns:
            (tableNode, chartNode)
        """
        table, chart = self.rankNodes()
        if table is None:
            table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", self.RANK_TABLE_NAME)
        ranks = summary.get("ranks") or {}
        layers, values = list(ranks), list(ranks.values())
        vtable = table.GetTable()
        vtable.Initialize()
        index = vtk.vtkIntArray()
        index.SetName("index")
        layer = vtk.vtkStringArray()
        layer.SetName("layer")
        rank = vtk.vtkIntArray()
        rank.SetName("effective rank")
        for i, (name, value) in enumerate(zip(layers, values)):
            index.InsertNextValue(i)
            layer.InsertNextValue(name)
            rank.InsertNextValue(int(value))
        for column in (index, layer, rank):
            vtable.AddColumn(column)
        table.SetAttribute(TAG + "Result", resultName)
        table.SetAttribute(TAG + "Summary", json.dumps(summary))
        table.Modified()

        if chart is None:
            chart = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotChartNode", self.RANK_CHART_NAME)
        series = chart.GetNthPlotSeriesNode(0) if chart.GetNumberOfPlotSeriesNodes() else None
        if series is None:
            series = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", "ARENA effective rank per layer")
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("index")
        series.SetYColumnName("effective rank")
        series.SetLabelColumnName("layer")
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeBar)
        chart.SetTitle(_("Effective rank per layer: {name}").format(name=resultName))
        chart.SetXAxisTitle(_("layer"))
        chart.SetYAxisTitle(_("effective rank"))
        chart.SetLegendVisibility(False)
        chart.Modified()

        if history:
            curve = slicer.mrmlScene.GetFirstNode("ARENA training", "vtkMRMLTableNode") or \
                slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "ARENA training")
            arrays = {}
            curve.GetTable().Initialize()
            for name, kind in (("step", vtk.vtkIntArray), ("loss", vtk.vtkDoubleArray), ("total rank", vtk.vtkIntArray)):
                arrays[name] = kind()
                arrays[name].SetName(name)
                curve.GetTable().AddColumn(arrays[name])
            for step, loss, total in history:
                curve.GetTable().InsertNextBlankRow()
                row = curve.GetTable().GetNumberOfRows() - 1
                curve.GetTable().SetValue(row, 0, vtk.vtkVariant(int(step)))
                curve.GetTable().SetValue(row, 1, vtk.vtkVariant(float(loss)))
                curve.GetTable().SetValue(row, 2, vtk.vtkVariant(int(total)))
            curve.Modified()
        return table, chart

    @staticmethod
    def rankTable(tableNode) -> dict:
        """The rank table back as ``{layer: effective rank}``."""
        vtable = tableNode.GetTable()
        layer, rank = vtable.GetColumnByName("layer"), vtable.GetColumnByName("effective rank")
        return {layer.GetValue(i): int(rank.GetValue(i)) for i in range(vtable.GetNumberOfRows())}

    def saveAdapter(self, adapterPath: str, path: str) -> Path:
        """Copy the adapter of a run (``adapterPath``, e.g. the segment tag) to ``path``."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise RuntimeError(_("Adapter files end with .safetensors, not '{name}'.").format(name=path.name))
        if not adapterPath or not os.path.isfile(adapterPath):
            raise RuntimeError(_("No adapter to save: run 'Adapt and segment' first."))
        shutil.copyfile(adapterPath, path)
        return path

    # --- MRML <-> arrays and files ---------------------------------------------------------

    @staticmethod
    def segmentArray(segmentationNode, segmentId: str, volumeNode) -> np.ndarray:
        """Segment voxels on the volume's grid, uint8 array indexed (k, j, i) like the volume."""
        return np.asarray(slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode),
                          dtype=np.uint8)

    @staticmethod
    def createSegmentationNode(volumeNode, name: Optional[str] = None):
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                  name or f"{volumeNode.GetName()} segmentation")
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        return node

    @staticmethod
    def writeVolume(volumeNode, path: Path) -> None:
        """Write the volume's voxels with its exact geometry (IJK-to-RAS incl. directions) using
        Slicer's own volume writer; the scene is not modified."""
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(False)  # a temporary file: speed over size
        if not storage.WriteData(volumeNode):
            raise RuntimeError(_("Writing volume '{name}' to '{path}' failed.").format(name=volumeNode.GetName(),
                                                                                    path=path))

    @staticmethod
    def _labelmapNode(array: np.ndarray, volumeNode):
        """A labelmap node outside the scene holding ``array`` (k, j, i) on the volume's grid."""
        node = slicer.vtkMRMLLabelMapVolumeNode()
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        node.SetIJKToRASMatrix(ijkToRas)
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
        return node

    @classmethod
    def writeLabelmap(cls, array: np.ndarray, volumeNode, path: Path, compress: bool = False) -> None:
        """Write a (k, j, i) label array on the volume's grid (NRRD or NIfTI by extension)."""
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(compress)
        if not storage.WriteData(cls._labelmapNode(array, volumeNode)):
            raise RuntimeError(_("Writing labelmap '{path}' failed.").format(path=path))

    @staticmethod
    def readLabelmap(path: str, volumeNode) -> np.ndarray:
        """Read a labelmap the worker wrote on the volume's grid; (k, j, i) array.

        Raises:
            RuntimeError: unreadable, or not exactly on the volume's grid (size, IJK-to-RAS).
        """
        node = slicer.vtkMRMLLabelMapVolumeNode()
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            raise RuntimeError(_("The result '{path}' cannot be read.").format(path=path))
        got, want = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(got)
        volumeNode.GetIJKToRASMatrix(want)
        same = node.GetImageData().GetDimensions() == volumeNode.GetImageData().GetDimensions() and np.allclose(
            slicer.util.arrayFromVTKMatrix(got), slicer.util.arrayFromVTKMatrix(want), atol=1e-3)
        if not same:
            raise RuntimeError(_("The result '{path}' is not on the grid of volume '{name}'.").format(
                path=path, name=volumeNode.GetName()))
        return np.array(slicer.util.arrayFromVolume(node))

    def exportSegment(self, segmentationNode, segmentId: str, volumeNode, path: str) -> Path:
        """Export one segment on the volume's grid.

        ``.nii``/``.nii.gz``/``.nrrd``: a labelmap (1 inside, 0 outside) on the volume's exact
        grid; ``.seg.nrrd``: a Slicer segmentation file with this segment only (name, color and
        the ARENA tags kept), readable with ``slicerio``.
        """
        path = Path(path)
        name = path.name.lower()
        array = self.segmentArray(segmentationNode, segmentId, volumeNode)
        if name.endswith(".seg.nrrd"):
            source = segmentationNode.GetSegmentation().GetSegment(segmentId)
            node = slicer.vtkMRMLSegmentationNode()
            labelmap = self._labelmapNode(array, volumeNode)
            image = slicer.vtkOrientedImageData()
            image.ShallowCopy(labelmap.GetImageData())
            ijkToRas = vtk.vtkMatrix4x4()
            volumeNode.GetIJKToRASMatrix(ijkToRas)
            image.SetImageToWorldMatrix(ijkToRas)
            segment = slicer.vtkSegment()
            segment.DeepCopyMetadata(source)
            segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), image)
            node.GetSegmentation().SetSourceRepresentationName(
                slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
            node.GetSegmentation().AddSegment(segment, segmentId)
            storage = slicer.vtkMRMLSegmentationStorageNode()
            storage.SetFileName(str(path))
            if not storage.WriteData(node):
                raise RuntimeError(_("Writing '{path}' failed.").format(path=path))
        elif name.endswith((".nii", ".nii.gz", ".nrrd")):
            self.writeLabelmap(array, volumeNode, path, compress=True)
        else:
            raise RuntimeError(_("Export to '{name}': use .nii.gz, .nii, .nrrd or .seg.nrrd.").format(name=path.name))
        return path


#
# ARENASegmentationTest
#


class ARENASegmentationTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: paint 3 slices of a bright structure of a sample CT, adapt for a
    few steps, check the new segment, cancel a run, export .seg.nrrd."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_AdaptSegmentCancelExport()

    def test_AdaptSegmentCancelExport(self):
        self.delayDisplay("Starting the test")
        missing = ARENASegmentationLogic.missingPythonPackages()
        if missing:  # the self-test must not install packages (nor ask to)
            self.skipTest(f"Python packages missing for ARENA: {', '.join(missing)}")

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
            time.sleep(0.1)
        logic.cancel()
        self.assertEqual(logic.waitForCompletion(timeout=30)["status"], "cancelled")
        self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 1)

        logic.startAdapt(volumeNode, segmentationNode, targetId, steps=5, device="auto")
        outcome = logic.waitForCompletion(timeout=1800)
        self.assertEqual(outcome["status"], "done", outcome["message"])
        result = ARENASegmentationLogic.segmentArray(segmentationNode, outcome["segmentId"], volumeNode)
        self.assertEqual(result.shape, ct.shape)
        self.assertTrue(np.all(result[painted > 0]))
        self.assertEqual(outcome["summary"]["effective_rank"], sum(outcome["summary"]["ranks"].values()))
        table, chart = logic.rankNodes()
        self.assertIsNotNone(table)
        self.assertIsNotNone(chart)

        path = Path(slicer.app.temporaryPath) / "ARENASegmentationTest.seg.nrrd"
        logic.exportSegment(segmentationNode, outcome["segmentId"], volumeNode, str(path))
        self.assertTrue(path.is_file())
        self.delayDisplay("Test passed")
