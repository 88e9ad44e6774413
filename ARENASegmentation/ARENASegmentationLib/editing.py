"""The ARENA Segment Editor effect's logic, without Qt: the user's voxels in, a preview out, and
Apply through the editor (its masking and overwrite settings, one undo state).

Rules (the reason this file exists):

- The structure's segment only ever holds what the user put there until Apply; the prediction
  lives in a separate preview segmentation.
- Training input is the segment itself: every slice (along the painted axis) holding the
  structure is a known slice. After an Apply, the segment holds the result; the known slices
  are then those the user had painted, plus every slice the user changed since (a correction,
  an erased slice, a new stroke). A segment taken back to its painting (Ctrl+Z) is read as
  painting again.
- Apply writes the preview, except on known slices, where the segment's current content wins:
  nothing ARENA writes replaces a voxel the user painted, erased or corrected in the segment,
  including strokes made while the run was going on. Voxels of the background segment stay
  background. Other segments follow the editor's own masking and overwrite settings, as with
  every effect (the default, "overwrite all", takes overlapping voxels from them).

Arrays are ``(K, J, I)`` uint8/bool on the CT volume's grid, as ``slicer.util.arrayFromVolume``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import vtk

import slicer

from . import mrmlio

STRUCTURE, KNOWN_BACKGROUND = 1, 2  # values of the training labelmap sent to the worker
PREVIEW_ATTRIBUTE = "ARENASegmentation.PreviewOf"


def paintAxis(painted: np.ndarray) -> int:
    """The array axis the user painted along: the one on which the structure touches the fewest
    slices (the engine's rule, ``arenaseg.io.annotations.find_annotation``)."""
    counts = [int(np.any(painted, axis=tuple(a for a in range(3) if a != ax)).sum()) for ax in range(3)]
    return int(np.argmin(counts))


def occupiedSlices(array: np.ndarray, axis: int) -> set:
    return {int(s) for s in np.flatnonzero(np.any(array, axis=tuple(a for a in range(3) if a != axis)))}


def changedSlices(a: np.ndarray, b: np.ndarray, axis: int) -> set:
    """Slices along ``axis`` where the two arrays differ."""
    return occupiedSlices(np.asarray(a, bool) != np.asarray(b, bool), axis)


def _onSlices(shape, axis: int, slices) -> np.ndarray:
    mask = np.zeros(shape, bool)
    index = [slice(None)] * 3
    index[axis] = sorted(slices)
    mask[tuple(index)] = True
    return mask


@dataclass
class Applied:
    """What one Apply wrote into a segment: enough to tell the user's later edits from ARENA's."""
    before: np.ndarray  # the segment just before Apply (the user's painting)
    after: np.ndarray  # the segment just after Apply
    knownSlices: set  # slices whose content came from the user
    axis: int


@dataclass
class TrainingInput:
    labels: np.ndarray  # (K, J, I) uint8: 0 unknown, 1 structure, 2 known background
    knownSlices: set
    axis: int
    notes: list = field(default_factory=list)


def trainingInput(current: np.ndarray, background: np.ndarray | None = None,
                  applied: Applied | None = None) -> TrainingInput:
    """The labelmap a run learns from (see the module docstring for the rules).

    Args:
        current: the structure's segment now, ``(K, J, I)``.
        background: voxels of the background segment (known "not the structure"), or None.
        applied: the record of the last Apply into this segment, or None.

    Raises:
        ValueError: nothing painted (no known slice holds the structure).
    """
    current = np.asarray(current, bool)
    notes = []
    if applied is not None and len(changedSlices(current, applied.before, applied.axis)) < \
            len(changedSlices(current, applied.after, applied.axis)):
        applied = None  # nearer to the painting than to the result: the Apply was undone
        notes.append("the segment is back to its painting (undo): reading it as painting")
    if applied is None:
        if not current.any():
            raise ValueError("the segment is empty: paint the structure on a few slices first")
        axis = paintAxis(current)
        known = occupiedSlices(current, axis)
    else:
        axis = applied.axis
        known = set(applied.knownSlices) | changedSlices(current, applied.after, axis)
        if not (current & _onSlices(current.shape, axis, known)).any():
            raise ValueError("no painted or corrected slice holds the structure: paint it on a few slices")
    labels = np.zeros(current.shape, np.uint8)
    onKnown = _onSlices(current.shape, axis, known)
    labels[onKnown] = KNOWN_BACKGROUND
    labels[current & onKnown] = STRUCTURE
    if background is not None:
        labels[np.asarray(background, bool) & (labels != STRUCTURE)] = KNOWN_BACKGROUND
    return TrainingInput(labels=labels, knownSlices=known, axis=axis, notes=notes)


def merge(prediction: np.ndarray, current: np.ndarray, knownSlices: set, axis: int,
          background: np.ndarray | None = None) -> np.ndarray:
    """What Apply writes: the prediction, with the user's current content on ``knownSlices``
    and the background segment's voxels left out. ``(K, J, I)`` bool."""
    current = np.asarray(current, bool)
    out = np.asarray(prediction, bool).copy()
    onKnown = _onSlices(current.shape, axis, knownSlices)
    out[onKnown] = current[onKnown]
    if background is not None:
        out &= ~(np.asarray(background, bool) & ~current)
    return out


class SegmentEditorLogicEditor:
    """The two editor calls Apply needs, on Slicer's Qt-free ``vtkSlicerSegmentEditorLogic``
    (what ``qSlicerSegmentEditorAbstractEffect::modifySegmentByLabelmap`` calls; its undo
    history is the Segment Editor's). In Slicer the effect passes itself instead."""

    def __init__(self, editorLogic):
        self.logic = editorLogic

    def saveStateForUndo(self) -> None:
        self.logic.SaveStateForUndo()

    def modifySegmentByLabelmap(self, segmentationNode, segmentId: str, labelmap) -> None:
        self.logic.ModifySegmentByLabelmap(segmentationNode, segmentId, labelmap,
                                           slicer.vtkSlicerSegmentEditorLogic.ModificationModeSet, True, False)


def orientedLabelmap(array: np.ndarray, volumeNode):
    """``array`` (K, J, I) as a ``vtkOrientedImageData`` on the volume's grid (IJK to RAS)."""
    image = slicer.vtkOrientedImageData()
    image.ShallowCopy(mrmlio.labelmapNode(np.asarray(array, np.uint8), volumeNode).GetImageData())
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    return image


class Session:
    """One structure being segmented: its segment, the last run's input and preview, and the
    record of the last Apply (kept per segment by :class:`Sessions`)."""

    def __init__(self, segmentationNode, segmentId: str, volumeNode):
        self.segmentationNode, self.segmentId, self.volumeNode = segmentationNode, segmentId, volumeNode
        self.applied: Applied | None = None
        self.run: TrainingInput | None = None
        self.snapshot: np.ndarray | None = None  # the segment when the run started
        self.previewNode = None
        self.prediction: np.ndarray | None = None

    def segmentArray(self, segmentId: str | None = None) -> np.ndarray:
        return mrmlio.segmentArray(self.segmentationNode, segmentId or self.segmentId, self.volumeNode) > 0

    def _background(self, backgroundSegmentId: str):
        if backgroundSegmentId and backgroundSegmentId != self.segmentId and \
                self.segmentationNode.GetSegmentation().GetSegment(backgroundSegmentId):
            array = self.segmentArray(backgroundSegmentId)
            return array if array.any() else None
        return None

    def startRun(self, backgroundSegmentId: str = "") -> TrainingInput:
        """The labels for a run (:func:`trainingInput`); remembers the segment as it is now."""
        self.snapshot = self.segmentArray()
        self.run = trainingInput(self.snapshot, self._background(backgroundSegmentId), self.applied)
        self.backgroundSegmentId = backgroundSegmentId
        return self.run

    def showPreview(self, prediction: np.ndarray, opacity: float = 0.6):
        """Show ``prediction`` (K, J, I) in a preview segmentation (the segment's colour); the
        structure's segment is not touched."""
        self.prediction = np.asarray(prediction, bool)
        scene = self.segmentationNode.GetScene()
        if self.previewNode is None or self.previewNode.GetScene() is None:
            node = slicer.vtkMRMLSegmentationNode()
            node.SetName("ARENA preview")
            node.SetHideFromEditors(True)  # before AddNode: the subject hierarchy reads it then
            node.SetSaveWithScene(False)
            scene.AddNode(node)
            node.CreateDefaultDisplayNodes()
            node.SetReferenceImageGeometryParameterFromVolumeNode(self.volumeNode)
            node.SetAttribute(PREVIEW_ATTRIBUTE, f"{self.segmentationNode.GetID()}/{self.segmentId}")
            if self.segmentationNode.GetParentTransformNode():
                node.SetAndObserveTransformNodeID(self.segmentationNode.GetParentTransformNode().GetID())
            segment = self.segmentationNode.GetSegmentation().GetSegment(self.segmentId)
            node.GetSegmentation().AddEmptySegment("preview", segment.GetName() + " (preview)", segment.GetColor())
            self.previewNode = node
        slicer.util.updateSegmentBinaryLabelmapFromArray(self.prediction.astype(np.uint8), self.previewNode,
                                                         "preview", self.volumeNode)
        self.setPreviewOpacity(opacity)
        return self.previewNode

    def setPreviewOpacity(self, opacity: float) -> None:
        if self.previewNode is not None and self.previewNode.GetDisplayNode():
            self.previewNode.GetDisplayNode().SetOpacity(float(opacity))

    @property
    def hasPreview(self) -> bool:
        return self.prediction is not None and self.previewNode is not None and self.previewNode.GetScene() is not None

    def merged(self) -> np.ndarray:
        """What Apply would write now (:func:`merge`): slices the user changed while the run was
        going on count as known too."""
        current = self.segmentArray()
        known = set(self.run.knownSlices) | changedSlices(current, self.snapshot, self.run.axis)
        return merge(self.prediction, current, known, self.run.axis, self._background(self.backgroundSegmentId))

    def apply(self, editor) -> np.ndarray:
        """Commit the preview into the structure's segment through ``editor`` (one undo state,
        then the editor's masking and overwrite rules), and drop the preview.

        Raises:
            RuntimeError: no preview, or the segment was deleted.
        """
        if not self.hasPreview or self.run is None:
            raise RuntimeError("Nothing to apply: run ARENA first.")
        if not self.segmentationNode.GetSegmentation().GetSegment(self.segmentId):
            raise RuntimeError("The structure's segment was deleted: nothing applied.")
        current = self.segmentArray()
        known = set(self.run.knownSlices) | changedSlices(current, self.snapshot, self.run.axis)
        merged = self.merged()
        editor.saveStateForUndo()
        editor.modifySegmentByLabelmap(self.segmentationNode, self.segmentId,
                                       orientedLabelmap(merged, self.volumeNode))
        after = self.segmentArray()
        if np.array_equal(after, current) and not np.array_equal(merged, current):
            # vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap logs an error and returns
            # when it cannot apply the editable intensity range (segmentation and CT grids differ)
            raise RuntimeError("The Segment Editor wrote nothing (see the log): turn off 'Editable intensity "
                               "range' in the masking settings, or set the segmentation's geometry to the CT "
                               "('Specify geometry'), and press Apply again; the preview is kept.")
        self.applied = Applied(before=current, after=after, knownSlices=known, axis=self.run.axis)
        self.cancel()
        return merged

    def cancel(self) -> None:
        """Drop the preview; the segment stays as it is."""
        if self.previewNode is not None and self.previewNode.GetScene() is not None:
            self.previewNode.GetScene().RemoveNode(self.previewNode)
        self.previewNode, self.prediction = None, None


class Sessions:
    """One :class:`Session` per (segmentation, segment), so that each structure keeps the record
    of its last Apply while the user moves between segments."""

    def __init__(self):
        self._sessions = {}

    def get(self, segmentationNode, segmentId: str, volumeNode) -> Session:
        key = (segmentationNode.GetID(), segmentId)
        session = self._sessions.get(key)
        if session is None or session.volumeNode is not volumeNode or session.segmentationNode is not segmentationNode:
            session = self._sessions[key] = Session(segmentationNode, segmentId, volumeNode)
        return session

    def clear(self) -> None:
        for session in self._sessions.values():
            session.cancel()
        self._sessions.clear()


class EffectLogic:
    """What the ARENA effect does, without Qt: start a run on the selected segment, show its
    result as a preview, Apply or Cancel it. ``logic`` is the module's ``ARENASegmentationLogic``
    (one background job at a time); ``settings()`` returns the panel's keyword arguments for
    ``startAdapt`` (backbone, method, initialRank, lam, steps, device, warmStart)."""

    def __init__(self, logic, settings=lambda: {}):
        self.logic, self.settings = logic, settings
        self.sessions = Sessions()
        self.session: Session | None = None
        self.lastOutcome: dict | None = None

    def run(self, segmentationNode, segmentId: str, volumeNode, backgroundSegmentId: str = "",
            onProgress=None, onFinished=None) -> Session:
        """Start adapting to the segment's painted (and corrected) slices; returns at once.

        Raises:
            RuntimeError: a job is running, or the inputs cannot be used (the message says why).
        """
        if self.logic.isRunning:
            raise RuntimeError("An ARENA run is going on: cancel it or wait for it to end.")
        session = self.sessions.get(segmentationNode, segmentId, volumeNode)
        try:
            run = session.startRun(backgroundSegmentId)
        except ValueError as err:
            raise RuntimeError(f"Segment '{segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()}': "
                               f"{err}.") from None

        def finished(outcome: dict) -> None:
            self.lastOutcome = outcome
            if outcome["status"] == "done":
                session.showPreview(outcome["result"])
            if onFinished:
                onFinished(outcome)

        self.logic.startAdapt(volumeNode, segmentationNode, segmentId, backgroundSegmentId=backgroundSegmentId,
                              labels=run.labels, onProgress=onProgress, onFinished=finished, **self.settings())
        self.session = session
        return session

    def apply(self, editor) -> np.ndarray:
        """Commit the preview through ``editor`` (see :meth:`Session.apply`)."""
        if self.session is None:
            raise RuntimeError("Nothing to apply: run ARENA first.")
        return self.session.apply(editor)

    def cancel(self) -> None:
        """Stop a running job and drop the preview; the segment stays as it is."""
        self.logic.cancel()
        if self.session is not None:
            self.session.cancel()
