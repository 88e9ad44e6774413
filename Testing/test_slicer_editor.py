"""The ARENA effect's logic inside the Segment Editor, on real MRML: Slicer's own Qt-free editor
logic (``vtkSlicerSegmentEditorLogic``: the undo history, masking and overwrite rules that
``qSlicerSegmentEditorAbstractEffect::modifySegmentByLabelmap`` and Ctrl+Z use) on the abdomen
CT. The prediction here is a fixed array that is wrong on purpose (it lacks the painted voxels
and fills the erased slice), so that any lost paint shows; the real worker is run in
``test_slicer_logic.py``."""

from __future__ import annotations

import numpy as np
import pytest
import vtk

from conftest import ABDOMEN
from slicer_testing import import_module, load_volume, slicer_app  # noqa: F401 (fixture)

BLADDER = 21


@pytest.fixture(scope="module")
def editing():
    import_module()  # puts ARENASegmentationLib on the path, as Slicer does
    from ARENASegmentationLib import editing

    return editing


@pytest.fixture(scope="module")
def ct(slicer_app):  # noqa: F811
    import slicer

    volume = load_volume(slicer_app, ABDOMEN / "ct.nii.gz")
    labels = slicer_app.volumes_logic.AddArchetypeVolume(str(ABDOMEN / "labels.nii.gz"), "labels", 1)
    reference = np.array(slicer.util.arrayFromVolume(labels)) == BLADDER
    slicer.mrmlScene.RemoveNode(labels)
    return volume, reference


class Editor:
    """A Segment Editor on ``volume``: Slicer's editor logic and its parameter node."""

    def __init__(self, volume):
        import slicer

        self.scene = volume.GetScene()
        self.node = self.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        self.segmentation = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "editor test")
        self.segmentation.CreateDefaultDisplayNodes()
        self.segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        self.node.SetAndObserveSegmentationNode(self.segmentation)
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(self.scene)
        self.logic.SetSegmentEditorNode(self.node)
        self.logic.SetSourceVolumeNode(volume)
        self.volume = volume

    def add(self, name: str) -> str:
        return self.segmentation.GetSegmentation().AddEmptySegment("", name)

    def stroke(self, segment_id: str, voxels: np.ndarray, erase: bool = False) -> None:
        """One paint (or erase) stroke, as the Paint effect makes it: an undo state, then the
        stroke through the editor (its masking and overwrite rules)."""
        import slicer
        from ARENASegmentationLib import editing

        self.logic.SaveStateForUndo()
        mode = slicer.vtkSlicerSegmentEditorLogic.ModificationModeRemove if erase else \
            slicer.vtkSlicerSegmentEditorLogic.ModificationModeAdd
        self.logic.ModifySegmentByLabelmap(self.segmentation, segment_id,
                                           editing.orientedLabelmap(voxels, self.volume), mode, True, False)

    def array(self, segment_id: str) -> np.ndarray:
        import slicer

        return np.array(slicer.util.arrayFromSegmentBinaryLabelmap(self.segmentation, segment_id, self.volume)) > 0

    def remove(self):
        self.scene.RemoveNode(self.segmentation)
        self.scene.RemoveNode(self.node)


def slices_of(reference: np.ndarray, ks) -> np.ndarray:
    out = np.zeros_like(reference)
    out[list(ks)] = reference[list(ks)]
    return out


def test_paint_preview_correct_rerun_apply_undo_loses_no_voxel_the_user_put_there(editing, ct):
    volume, reference = ct
    editor = Editor(volume)
    bladder = editor.add("bladder")
    ks = np.flatnonzero(reference.any(axis=(1, 2)))
    first, middle, last = ks[2], ks[len(ks) // 2], ks[-3]
    for k in (first, middle):
        editor.stroke(bladder, slices_of(reference, [k]))
    session = editing.Session(editor.segmentation, bladder, volume)

    run = session.startRun()
    assert run.knownSlices == {first, middle} and run.axis == 0  # (K, J, I): axial slices
    assert (run.labels == editing.STRUCTURE).sum() == reference[[first, middle]].sum()
    wrong = reference.copy()
    wrong[[first, middle]] = False  # a prediction that misses the painted slices
    wrong[ks[0] - 1] = reference[middle]  # and leaks onto a slice below the bladder
    session.showPreview(wrong)
    assert editor.array(bladder).sum() == reference[[first, middle]].sum()  # preview only: segment untouched
    preview = np.array(__import__("slicer").util.arrayFromSegmentBinaryLabelmap(
        session.previewNode, "preview", volume)) > 0
    assert np.array_equal(preview, wrong)

    # correction while the preview shows: a third slice, and the leak erased on its slice
    editor.stroke(bladder, slices_of(reference, [last]))
    painted = editor.array(bladder)
    run = session.startRun()
    assert run.knownSlices == {first, middle, last}
    session.showPreview(wrong)
    editor.stroke(bladder, slices_of(reference, [ks[1]]))  # a stroke while the run goes on
    painted_before_apply = editor.array(bladder)
    written = session.apply(editing.SegmentEditorLogicEditor(editor.logic))
    after = editor.array(bladder)
    assert np.array_equal(after, written)
    assert not (painted_before_apply & ~after).any(), "a painted voxel was lost at Apply"
    for k in (first, middle, last, ks[1]):  # the user's slices are exactly the user's
        assert np.array_equal(after[k], painted_before_apply[k])
    assert after[ks[0] - 1].any()  # the prediction elsewhere was written
    assert not session.hasPreview and editor.scene.GetFirstNodeByName("ARENA preview") is None

    # one Ctrl+Z takes back exactly the result: the painting, last stroke included, is back
    assert editor.logic.CanUndo()
    editor.logic.Undo()
    assert np.array_equal(editor.array(bladder), painted_before_apply)
    assert not np.array_equal(painted, painted_before_apply)
    editor.remove()


def test_after_apply_corrections_are_the_next_runs_input_and_arena_voxels_are_not(editing, ct):
    volume, reference = ct
    editor = Editor(volume)
    bladder = editor.add("bladder")
    ks = np.flatnonzero(reference.any(axis=(1, 2)))
    painted_ks = [ks[3], ks[len(ks) // 2]]
    editor.stroke(bladder, slices_of(reference, painted_ks))
    session = editing.Session(editor.segmentation, bladder, volume)
    session.startRun()
    leak = ks[0] - 2
    prediction = reference.copy()
    prediction[leak] = reference[painted_ks[1]]
    session.showPreview(prediction)
    session.apply(editing.SegmentEditorLogicEditor(editor.logic))

    # the user erases the leak slice and corrects one slice of the result
    editor.stroke(bladder, slices_of(np.ones_like(reference), [leak]), erase=True)
    fixed = ks[-2]
    editor.stroke(bladder, slices_of(np.roll(reference, 3, axis=1), [fixed]))  # the wall was missing
    run = session.startRun()
    assert run.knownSlices == set(painted_ks) | {leak, fixed}
    assert (run.labels[leak] == editing.KNOWN_BACKGROUND).all(), "the erased slice is known background"
    other = ks[len(ks) // 2 + 2]
    assert (run.labels[other] == 0).all(), "ARENA's own voxels are not training input"

    # Ctrl+Z back to the painting: read as painting again
    for _ in range(3):  # the correction, the erased slice, the Apply
        editor.logic.Undo()
    assert np.array_equal(editor.array(bladder), slices_of(reference, painted_ks))
    run = session.startRun()
    assert run.knownSlices == set(painted_ks) and run.notes
    editor.remove()


def test_apply_respects_the_editors_masking_and_the_background_segment(editing, ct):
    import slicer

    volume, reference = ct
    editor = Editor(volume)
    bladder, other, background = editor.add("bladder"), editor.add("prostate"), editor.add("not bladder")
    ks = np.flatnonzero(reference.any(axis=(1, 2)))
    editor.stroke(bladder, slices_of(reference, [ks[2], ks[-3]]))
    protected = np.zeros_like(reference)
    protected[ks[len(ks) // 2], :, :] = reference[ks[len(ks) // 2]]
    editor.stroke(other, protected)
    keep_out = np.zeros_like(reference)
    keep_out[ks[len(ks) // 2 + 1]] = reference[ks[len(ks) // 2 + 1]]
    editor.stroke(background, keep_out)
    # the user protects other segments: edits allowed outside all segments, overwrite none
    editor.node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    editor.node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    session = editing.Session(editor.segmentation, bladder, volume)
    run = session.startRun(backgroundSegmentId=background)
    assert (run.labels[keep_out] == editing.KNOWN_BACKGROUND).all()
    session.showPreview(reference)
    session.apply(editing.SegmentEditorLogicEditor(editor.logic))
    assert np.array_equal(editor.array(other), protected), "a masked segment was changed"
    assert np.array_equal(editor.array(background), keep_out)
    assert not (editor.array(bladder) & keep_out).any(), "the background segment's voxels stay background"
    editor.remove()


def test_nothing_to_apply_and_an_empty_segment_are_refused(editing, ct):
    volume, _ = ct
    editor = Editor(volume)
    empty = editor.add("empty")
    session = editing.Session(editor.segmentation, empty, volume)
    with pytest.raises(ValueError, match="paint the structure"):
        session.startRun()
    with pytest.raises(RuntimeError, match="run ARENA first"):
        session.apply(editing.SegmentEditorLogicEditor(editor.logic))
    editor.remove()
