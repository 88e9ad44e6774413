"""The ARENA effect of the Segment Editor (Qt wiring only; the logic is ``editing.EffectLogic``).

Paint the structure on a few slices in the selected segment (and, optionally, what is not the
structure in a background segment), press *Adapt*: the result comes back as a preview while the
GUI stays live. Correct the segment and press *Adapt* again, or *Apply* (one Ctrl+Z takes it
back) or *Cancel*. Registered by the ARENASegmentation module at Slicer's startup.
"""

import json
import logging
import os

import ctk
import qt

import slicer
from slicer.i18n import tr as _
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from ARENASegmentationLib import editing, panel, results


class EffectEditor:
    """The editor calls ``editing.Session.apply`` needs, on this effect (its undo state and its
    masking and overwrite rules)."""

    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect

    def saveStateForUndo(self):
        self.scriptedEffect.saveStateForUndo()

    def modifySegmentByLabelmap(self, segmentationNode, segmentId, labelmap):
        self.scriptedEffect.modifySegmentByLabelmap(segmentationNode, segmentId, labelmap,
                                                    slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """ARENA: adapt a pretrained CT backbone to the painted slices and preview the structure."""

    POLL_INTERVAL_MS = 100

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "ARENA"
        scriptedEffect.perSegment = True  # the selected segment is the structure
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.effectLogic = None
        self.timer = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "..", "Resources", "Icons", "ARENASegmentation.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return _("<html>Segment a structure from a few painted slices with ARENA.<p>"
                 "Paint the structure on 2-5 slices of the selected segment (optionally, what is not the "
                 "structure in a background segment) and press <b>Adapt</b>. The result is shown as a "
                 "preview; correct the segment and press <b>Adapt</b> again, then <b>Apply</b> "
                 "(Ctrl+Z takes it back) or <b>Cancel</b>. Settings, adapters and the rank chart are in "
                 "the ARENA Segmentation module.</html>")

    # --- options -------------------------------------------------------------------------

    def setupOptionsFrame(self):
        self.backgroundSelector = slicer.qMRMLSegmentSelectorWidget()
        self.backgroundSelector.noneEnabled = True
        self.backgroundSelector.segmentationNodeSelectorVisible = False  # the editor's segmentation only
        self.backgroundSelector.editEnabled = False
        self.backgroundSelector.setMRMLScene(slicer.mrmlScene)
        self.backgroundSegmentId = ""
        self.backgroundSelector.setToolTip(_("Optional segment of voxels known not to be the structure."))
        self.scriptedEffect.addLabeledOptionsWidget(_("Background:"), self.backgroundSelector)

        self.adaptButton = qt.QPushButton(_("Adapt"))
        self.adaptButton.objectName = self.__class__.__name__ + "Adapt"
        self.adaptButton.setToolTip(_("Adapt the backbone to the painted slices and preview the structure"))
        self.progressBar = qt.QProgressBar()
        self.progressBar.visible = False
        row = qt.QHBoxLayout()
        row.addWidget(self.adaptButton)
        row.addWidget(self.progressBar)
        self.scriptedEffect.addOptionsWidget(row)

        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

        self.opacitySlider = ctk.ctkSliderWidget()
        self.opacitySlider.minimum, self.opacitySlider.maximum = 0.0, 1.0
        self.opacitySlider.singleStep, self.opacitySlider.value = 0.05, 0.6
        self.opacitySlider.spinBoxVisible = False
        self.opacitySlider.setToolTip(_("Opacity of the preview"))
        self.scriptedEffect.addLabeledOptionsWidget(_("Preview opacity:"), self.opacitySlider)

        self.cancelButton = qt.QPushButton(_("Cancel"))
        self.cancelButton.objectName = self.__class__.__name__ + "Cancel"
        self.cancelButton.setToolTip(_("Drop the preview; the segment stays as painted"))
        self.applyButton = qt.QPushButton(_("Apply"))
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        self.applyButton.setToolTip(_("Write the preview into the segment (painted slices are kept; Ctrl+Z undoes it)"))
        row = qt.QHBoxLayout()
        row.addWidget(self.cancelButton)
        row.addWidget(self.applyButton)
        self.scriptedEffect.addOptionsWidget(row)

        self.adaptButton.connect("clicked()", self.onAdapt)
        self.cancelButton.connect("clicked()", self.onCancel)
        self.applyButton.connect("clicked()", self.onApply)
        self.opacitySlider.connect("valueChanged(double)", self.onOpacity)
        self.backgroundSelector.connect("currentSegmentChanged(QString)", self.onBackgroundChanged)

    def createCursor(self, widget):
        return slicer.util.mainWindow().cursor

    def _logic(self):
        """The effect's logic, on the module's shared Logic (its settings, one job at a time)."""
        if self.effectLogic is None:
            import ARENASegmentation as module

            moduleLogic = module.sharedLogic()
            self.effectLogic = editing.EffectLogic(moduleLogic, lambda: module.runSettings(moduleLogic.getParameterNode()))
        return self.effectLogic

    def onBackgroundChanged(self, segmentId):
        """Slicer's selector moves to another segment by itself when the chosen one is deleted:
        that is not the user's choice (``panel.segmentAfterSelectorChange``)."""
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        segmentation = segmentationNode.GetSegmentation() if segmentationNode else None
        chosen = panel.segmentAfterSelectorChange(self.backgroundSegmentId, segmentId or "",
                                                  lambda i: bool(segmentation and segmentation.GetSegment(i)))
        self.backgroundSegmentId = chosen
        if chosen != (segmentId or ""):
            wasBlocked = self.backgroundSelector.blockSignals(True)
            self.backgroundSelector.setCurrentSegmentID("")
            self.backgroundSelector.blockSignals(wasBlocked)

    def updateGUIFromMRML(self):
        segmentationNode = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        self.backgroundSelector.setCurrentNode(segmentationNode)
        logic = self.effectLogic
        running = bool(logic and logic.logic.isRunning)
        preview = bool(logic and logic.session and logic.session.hasPreview)
        self.adaptButton.text = _("Cancel run") if running else (_("Adapt again") if preview else _("Adapt"))
        self.applyButton.enabled = preview and not running
        self.cancelButton.enabled = preview or running
        self.opacitySlider.enabled = preview

    # The poll timer keeps running while another effect or module is shown: a run that ends
    # then still arrives as a preview.

    # --- actions -------------------------------------------------------------------------

    def onAdapt(self):
        logic = self._logic()
        if logic.logic.isRunning:
            logic.logic.cancel()
            self.statusLabel.text = _("Cancelling...")
            return
        import ARENASegmentation as module

        parameters = logic.logic.getParameterNode()
        if not module.ensureDependencies(parameters.method, parameters.backbone,
                                         lambda text: setattr(self.statusLabel, "text", text)):
            return
        editorNode = self.scriptedEffect.parameterSetNode()
        with slicer.util.tryWithErrorDisplay(_("ARENA could not start."), waitCursor=True):
            logic.run(editorNode.GetSegmentationNode(), editorNode.GetSelectedSegmentID(),
                      editorNode.GetSourceVolumeNode(), self.backgroundSegmentId,
                      onProgress=self.onProgress, onFinished=self.onFinished)
            self.progressBar.visible, self.progressBar.value = True, 0
            self.progressBar.maximum = max(1, parameters.steps)
            advice = module.memoryAdvice(parameters.backbone)  # "" for a job on a server
            self.statusLabel.text = advice or _("Starting the background process ({where})...").format(
                where=logic.logic.where())
            self._startTimer()
        self.updateGUIFromMRML()

    def _startTimer(self):
        if self.timer is None:
            self.timer = qt.QTimer()
            self.timer.setInterval(self.POLL_INTERVAL_MS)
            self.timer.connect("timeout()", self.onPoll)
        self.timer.start()

    def onPoll(self):
        logic = self.effectLogic
        running = logic.logic.processEvents()
        if running and logic.logic.lastPhase:
            self.statusLabel.text = panel.phaseText(logic.logic.lastPhase)
        if not running:
            self.timer.stop()
            self.updateGUIFromMRML()

    def onProgress(self, event):
        self.progressBar.maximum = max(1, event["steps"])
        self.progressBar.value = event["step"]
        logic = self.effectLogic.logic
        self.statusLabel.text = panel.progressText(event, logic.elapsed(), logic.device or "", logic.server)

    def onFinished(self, outcome):
        self.progressBar.visible = False
        if outcome["status"] == "done":
            summary = outcome["summary"]
            self.statusLabel.text = results.summaryText(summary)
            parameters = self.effectLogic.logic.getParameterNode()
            parameters.result = json.dumps(summary)  # the module's panel shows the rank chart
            if summary.get("adapter"):
                parameters.adapterPath = summary["adapter"]
            self.onOpacity(self.opacitySlider.value)
        elif outcome["status"] == "cancelled":
            self.statusLabel.text = _("Cancelled: the segment is unchanged")
        else:
            self.statusLabel.text = _("Failed: {message}").format(message=outcome["message"])
            slicer.util.errorDisplay(outcome["message"], windowTitle=_("ARENA"))
        self.updateGUIFromMRML()

    def onOpacity(self, value):
        if self.effectLogic and self.effectLogic.session:
            self.effectLogic.session.setPreviewOpacity(value)

    def onApply(self):
        with slicer.util.tryWithErrorDisplay(_("Apply failed."), waitCursor=True):
            self.effectLogic.apply(EffectEditor(self.scriptedEffect))
            self.statusLabel.text = _("Applied: Ctrl+Z takes it back")
        self.updateGUIFromMRML()

    def onCancel(self):
        if self.effectLogic:
            self.effectLogic.cancel()
            self.statusLabel.text = _("Preview dropped: the segment is unchanged")
        self.updateGUIFromMRML()

    def cleanup(self):
        if self.timer:
            self.timer.stop()
            self.timer.disconnect("timeout()", self.onPoll)  # or the effect is never collected (Slicer#7392)
        if self.effectLogic:
            self.effectLogic.sessions.clear()  # the module's shared Logic stops its job itself
        if not hasattr(self, "adaptButton"):  # the options were never shown
            return
        for widget, signal, slot in ((self.adaptButton, "clicked()", self.onAdapt),
                                     (self.cancelButton, "clicked()", self.onCancel),
                                     (self.applyButton, "clicked()", self.onApply),
                                     (self.opacitySlider, "valueChanged(double)", self.onOpacity),
                                     (self.backgroundSelector, "currentSegmentChanged(QString)",
                                      self.onBackgroundChanged)):
            widget.disconnect(signal, slot)
        logging.debug("ARENA effect cleaned up")
