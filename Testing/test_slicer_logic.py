"""The Slicer module's Logic on real Slicer MRML (slicer-core + trame-slicer), with the real
background worker on the CPU: a clinician paints three liver slices and gets a liver."""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

from conftest import ABDOMEN, LIVER
from slicer_testing import import_module, load_volume, slicer_app  # noqa: F401 (fixture)

SHORT = {"steps": 3}  # runs that check plumbing, not accuracy
TERMINOLOGY_TAG = "TerminologyEntry"
LIVER_TERMINOLOGY = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical "
                     "Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    """The module; kept adapters go to a per-user folder, here a temporary one (ARENASEG_ADAPTERS)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("ARENASEG_ADAPTERS", str(tmp_path_factory.mktemp("adapters")))
    yield import_module()
    patch.undo()


@pytest.fixture(scope="module")
def abdomen(slicer_app):  # noqa: F811
    """The abdomen CT as a volume node and its reference labels as a (k, j, i) array."""
    import slicer

    volume = load_volume(slicer_app, ABDOMEN / "ct.nii.gz")
    labels = slicer_app.volumes_logic.AddArchetypeVolume(str(ABDOMEN / "labels.nii.gz"), "labels", 1)
    a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(a)
    labels.GetIJKToRASMatrix(b)
    assert np.allclose(slicer.util.arrayFromVTKMatrix(a), slicer.util.arrayFromVTKMatrix(b))
    reference = np.array(slicer.util.arrayFromVolume(labels))
    slicer.mrmlScene.RemoveNode(labels)
    return volume, reference


def paint(module, volume, reference, axis_ijk: int, node_name: str, name: str = "liver"):
    """A new segmentation ``node_name`` whose segment ``name`` holds 3 liver slices across voxel
    axis ``axis_ijk`` (2 = axial here), as a user paints them. Returns (node, segment id,
    painted kji)."""
    import slicer
    from arenaseg.io.annotations import paint_slices

    painted_ijk = paint_slices(reference.transpose(2, 1, 0), LIVER, 3, axis=axis_ijk)
    painted = (painted_ijk.transpose(2, 1, 0) > 0).astype(np.uint8)
    node = module.ARENASegmentationLogic.createSegmentationNode(volume, node_name)
    segment_id = node.GetSegmentation().AddEmptySegment("", name)
    slicer.util.updateSegmentBinaryLabelmapFromArray(painted, node, segment_id, volume)
    return node, segment_id, painted


def unpainted_dice(result: np.ndarray, reference: np.ndarray, painted: np.ndarray, axis_kji: int) -> float:
    from arenaseg.io.annotations import dice

    touched = np.any(painted, axis=tuple(a for a in range(3) if a != axis_kji))
    mask = np.ones(result.shape, bool)
    index = [slice(None)] * 3
    index[axis_kji] = np.flatnonzero(touched)
    mask[tuple(index)] = False
    return dice(result > 0, reference == LIVER, mask)


def snapshot(module, node, volume) -> dict:
    seg = node.GetSegmentation()
    ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
    return {i: module.ARENASegmentationLogic.segmentArray(node, i, volume).copy() for i in ids}


def ijk_to_ras(node) -> np.ndarray:
    import slicer

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


class EditorOf:
    """Slicer's Qt-free Segment Editor logic on ``node`` (its undo history, masking, overwrite)."""

    def __init__(self, node, volume):
        import slicer

        self.node = node.GetScene().AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        self.node.SetAndObserveSegmentationNode(node)
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(node.GetScene())
        self.logic.SetSegmentEditorNode(self.node)
        self.logic.SetSourceVolumeNode(volume)


@pytest.fixture(scope="module")
def axial_run(module, abdomen):
    """The full default adaptation on 3 painted axial liver slices, run by the effect's logic."""
    from ARENASegmentationLib import editing

    volume, reference = abdomen
    node, target, painted = paint(module, volume, reference, axis_ijk=2, node_name="axial")
    node.GetSegmentation().GetSegment(target).SetTag(TERMINOLOGY_TAG, LIVER_TERMINOLOGY)
    logic = module.ARENASegmentationLogic()
    effect = editing.EffectLogic(logic, lambda: {"device": "cpu"})
    events = []
    effect.run(node, target, volume, onProgress=events.append)
    outcome = logic.waitForCompletion(timeout=900)
    return logic, node, target, painted, outcome, events, effect


def test_three_painted_axial_slices_give_the_liver_as_a_preview_then_apply_and_undo(module, abdomen, axial_run):
    import slicer

    from ARENASegmentationLib import editing

    volume, reference = abdomen
    logic, node, target, painted, outcome, events, effect = axial_run
    assert outcome["status"] == "done", outcome["message"]
    seg = node.GetSegmentation()
    assert seg.GetNumberOfSegments() == 1 and outcome["segmentId"] == target
    target_now = module.ARENASegmentationLogic.segmentArray(node, target, volume)
    assert np.array_equal(target_now > 0, painted > 0)  # the run wrote nothing into the segment

    # The preview lies on the volume's voxel grid and holds the liver.
    preview = effect.session.previewNode
    assert preview is not None and preview.GetScene() is slicer.mrmlScene
    image = slicer.vtkOrientedImageData()
    preview.GetBinaryLabelmapRepresentation("preview", image)
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    assert np.allclose(slicer.util.arrayFromVTKMatrix(m), ijk_to_ras(volume), atol=1e-4)
    result = module.ARENASegmentationLogic.segmentArray(preview, "preview", volume)
    assert result.shape == slicer.util.arrayFromVolume(volume).shape
    assert np.array_equal(result > 0, outcome["result"])
    dice = unpainted_dice(result, reference, painted, axis_kji=0)
    print(f"axial: Dice {dice:.3f} on unpainted slices, effective rank {outcome['summary']['effective_rank']}")
    assert dice >= 0.85

    # Progress was reported step by step; the discovered ranks are shown and stored.
    summary = outcome["summary"]
    assert [e["step"] for e in events] == list(range(1, summary["steps"] + 1))
    assert summary["effective_rank"] == sum(summary["ranks"].values()) <= summary["initial_rank"]
    assert summary["active_parameters"] <= summary["trainable_parameters"]
    table, chart = logic.rankNodes()
    assert module.ARENASegmentationLogic.rankTable(table) == summary["ranks"]
    assert chart.GetNumberOfPlotSeriesNodes() == 1
    assert module.segmentTag(seg.GetSegment(target), "Adapter") == summary["adapter"]

    # Apply through the editor, then one Ctrl+Z: the painting exactly.
    editor = EditorOf(node, volume)
    written = effect.apply(editing.SegmentEditorLogicEditor(editor.logic))
    applied = module.ARENASegmentationLogic.segmentArray(node, target, volume) > 0
    assert np.array_equal(applied, written) and np.all(applied[painted > 0])
    assert unpainted_dice(applied, reference, painted, axis_kji=0) >= 0.85
    assert preview.GetScene() is None  # the preview is gone
    editor.logic.Undo()
    assert np.array_equal(module.ARENASegmentationLogic.segmentArray(node, target, volume), painted)
    slicer.mrmlScene.RemoveNode(editor.node)


def test_the_slice_to_paint_next_is_shown_and_the_views_go_there(module, abdomen, axial_run):
    import slicer

    volume, _ = abdomen
    logic, node, target, painted, outcome, events, _ = axial_run
    summary = outcome["summary"]
    painted_k = set(np.flatnonzero(painted.any(axis=(1, 2))))  # axial slices (kji array)
    assert summary["slice_axis"] == 2 and summary["next_slice"] not in painted_k
    assert f"paint slice {summary['next_slice']} next" in module.results.summaryText(summary)
    view = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceNode")
    view.SetOrientationToAxial()
    module.results.jumpToSlice(volume, 2, summary["next_slice"])
    m = vtk.vtkMatrix4x4()
    volume.GetRASToIJKMatrix(m)
    centre = view.GetSliceToRAS()
    ijk = m.MultiplyPoint([centre.GetElement(0, 3), centre.GetElement(1, 3), centre.GetElement(2, 3), 1.0])
    assert round(ijk[2]) == summary["next_slice"]
    slicer.mrmlScene.RemoveNode(view)


def test_a_run_leaves_3d_display_alone_and_keeps_its_adapter_per_user(module, axial_run):
    """No surface forced on (the user's Show 3D choice, and no frozen GUI on big
    segmentations), the live training curve, and the adapter in the documented per-user folder."""
    import os
    import tempfile
    from pathlib import Path

    import slicer

    logic, node, target, painted, outcome, events, _ = axial_run
    seg = node.GetSegmentation()
    assert not seg.ContainsRepresentation(slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    adapter = Path(outcome["summary"]["adapter"])
    assert adapter.is_file() and adapter.parent == Path(os.environ["ARENASEG_ADAPTERS"])
    assert not str(adapter).startswith(tempfile.gettempdir() + os.sep + "arena-runs")
    table = slicer.mrmlScene.GetFirstNode("ARENA training", "vtkMRMLTableNode")
    chart = slicer.mrmlScene.GetFirstNode("ARENA training", "vtkMRMLPlotChartNode")
    assert table.GetTable().GetNumberOfRows() == len(events) == outcome["summary"]["steps"]
    assert chart.GetNumberOfPlotSeriesNodes() == 2  # loss and total effective rank per step
    assert logic.history == [(e["step"], e["loss"], e["total_rank"]) for e in events]


def test_paint_that_would_move_is_refused_before_any_process(module, abdomen):
    """A segmentation stored as surfaces, or painted on another grid, is refused at once."""
    import slicer

    volume, reference = abdomen
    logic = module.ARENASegmentationLogic()
    node, target, painted = paint(module, volume, reference, axis_ijk=2, node_name="surfaces")
    node.CreateClosedSurfaceRepresentation()
    node.GetSegmentation().SetSourceRepresentationName(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    with pytest.raises(RuntimeError, match="source representation to 'Binary labelmap'"):
        logic.startAdapt(volume, node, target)
    assert not logic.isRunning

    # Half a voxel off the CT's grid: resampling would move strokes to other slices.
    shifted = slicer.vtkOrientedImageData()
    shifted.SetDimensions(*volume.GetImageData().GetDimensions())
    shifted.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    spacing = volume.GetSpacing()
    matrix.SetElement(2, 3, matrix.GetElement(2, 3) + spacing[2] / 2)
    shifted.SetImageToWorldMatrix(matrix)
    from vtk.util.numpy_support import vtk_to_numpy

    vtk_to_numpy(shifted.GetPointData().GetScalars())[:] = painted.ravel()
    other = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "off grid")
    other.AddSegmentFromBinaryLabelmapRepresentation(shifted, "liver")
    segment_id = other.GetSegmentation().GetNthSegmentID(0)
    with pytest.raises(RuntimeError, match="another voxel grid"):
        logic.startAdapt(volume, other, segment_id)
    assert not logic.isRunning
    for n in (node, other):
        slicer.mrmlScene.RemoveNode(n)


def test_seg_nrrd_and_labelmap_exports_read_back_with_the_same_voxels(module, abdomen, axial_run, tmp_path):
    import slicerio

    volume, _ = abdomen
    logic, node, target, _, outcome, _, _ = axial_run
    voxels = module.ARENASegmentationLogic.segmentArray(node, target, volume).transpose(2, 1, 0) > 0  # ijk

    path = logic.exportSegment(node, target, volume, tmp_path / "liver.seg.nrrd")
    segmentation = slicerio.read_segmentation(str(path))
    (segment,) = segmentation["segments"]
    assert segment["name"] == "liver"
    mask = slicerio.segment_mask(segmentation, segment)
    # The file may hold only the segment's extent: place it on the volume grid through its geometry.
    ijk_to_lps = np.diag([-1, -1, 1, 1]) @ ijk_to_ras(volume)
    offset = np.linalg.solve(ijk_to_lps, segmentation["ijkToLPS"])
    assert np.allclose(offset[:3, :3], np.eye(3), atol=1e-4)
    start = np.round(offset[:3, 3]).astype(int)
    assert np.allclose(offset[:3, 3], start, atol=1e-3)
    placed = np.zeros(voxels.shape, bool)
    placed[start[0]:start[0] + mask.shape[0], start[1]:start[1] + mask.shape[1],
           start[2]:start[2] + mask.shape[2]] = mask
    assert np.array_equal(placed, voxels)

    for name in ("liver.nii.gz", "liver.nrrd"):
        path = logic.exportSegment(node, target, volume, tmp_path / name)
        image, ct = sitk.ReadImage(str(path)), sitk.ReadImage(str(ABDOMEN / "ct.nii.gz"))
        assert image.GetSize() == ct.GetSize()
        assert np.allclose(image.GetOrigin(), ct.GetOrigin(), atol=1e-3)
        assert np.allclose(image.GetDirection(), ct.GetDirection(), atol=1e-6)
        assert np.array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0) > 0, voxels)


def test_correct_and_rerun_starts_from_the_previous_adapter_and_respects_background(
        module, abdomen, axial_run, tmp_path):
    """Second press: warm start from the adapter of the first run; a background segment clears
    the result there. A saved adapter applied to a volume makes a new segment each time: an
    existing result (maybe corrected) is never replaced; a segmentation stored as surfaces is
    refused before the run."""
    import slicer

    volume, reference = abdomen
    logic, node, target, painted, first, _, _ = axial_run
    background = np.zeros_like(painted)
    background[:, :, : painted.shape[2] // 2] = 1  # "not the liver": half the volume (i < I/2) ...
    background[painted > 0] = 1  # ... even where painted: painting wins
    background_id = node.GetSegmentation().AddEmptySegment("", "not liver")
    slicer.util.updateSegmentBinaryLabelmapFromArray(background, node, background_id, volume)
    try:
        logic.startAdapt(volume, node, target, backgroundSegmentId=background_id, device="cpu", settings=SHORT)
        assert logic.job["job"]["warm_start"] == first["summary"]["adapter"]
        outcome = logic.waitForCompletion(timeout=600)
        assert outcome["status"] == "done", outcome["message"]
        assert node.GetSegmentation().GetNumberOfSegments() == 2
        assert not np.any(outcome["result"][(background > 0) & (painted == 0)])

        # Save the adapter, then apply it twice to a volume ("a new patient": here the same CT).
        saved = logic.saveAdapter(outcome["summary"]["adapter"], tmp_path / "liver.safetensors")
        other = module.ARENASegmentationLogic.createSegmentationNode(volume, "new patient")
        names = []
        for _ in range(2):
            logic.startApplyAdapter(volume, str(saved), other, device="cpu")
            applied = logic.waitForCompletion(timeout=600)
            assert applied["status"] == "done", applied["message"]
            names.append(other.GetSegmentation().GetSegment(applied["segmentId"]).GetName())
            if len(names) == 1:  # the user corrects the first result
                corrected = np.zeros_like(painted)
                slicer.util.updateSegmentBinaryLabelmapFromArray(corrected + painted, other, applied["segmentId"],
                                                                 volume)
                first_id = applied["segmentId"]
        assert names == ["liver (ARENA)", "liver (ARENA) 2"]
        assert np.array_equal(module.ARENASegmentationLogic.segmentArray(other, first_id, volume), painted)
        assert module.ARENASegmentationLogic.segmentArray(other, applied["segmentId"], volume).any()

        surfaces = module.ARENASegmentationLogic.createSegmentationNode(volume, "surfaces")
        surfaces.GetSegmentation().SetSourceRepresentationName(
            slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
        with pytest.raises(RuntimeError, match="Binary labelmap"):
            logic.startApplyAdapter(volume, str(saved), surfaces, device="cpu")
        assert not logic.isRunning
        for n in (other, surfaces):
            slicer.mrmlScene.RemoveNode(n)
    finally:
        node.GetSegmentation().RemoveSegment(background_id)


def test_cancel_mid_run_leaves_the_segmentation_unchanged(module, abdomen):
    volume, reference = abdomen
    node, target, _ = paint(module, volume, reference, axis_ijk=2, node_name="cancelled")
    before = snapshot(module, node, volume)
    logic = module.ARENASegmentationLogic()
    logic.startAdapt(volume, node, target, device="cpu", settings={"steps": 1000})
    run_dir = logic.job["runDir"]
    deadline = time.monotonic() + 300
    while logic.lastProgress is None and logic.processEvents():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    logic.cancel()
    outcome = logic.waitForCompletion(timeout=30, pollInterval=0.02)  # 1000 steps: many minutes
    assert outcome["status"] == "cancelled"
    after = snapshot(module, node, volume)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert not run_dir.exists()
    assert not logic.isRunning


def test_sagittal_painting_gives_the_liver(module, abdomen):
    """Slices painted on a sagittal plane: the training input and the result follow that axis."""
    from ARENASegmentationLib import editing

    volume, reference = abdomen
    node, target, painted = paint(module, volume, reference, axis_ijk=0, node_name="sagittal")
    logic = module.ARENASegmentationLogic()
    effect = editing.EffectLogic(logic, lambda: {"device": "cpu"})
    session = effect.run(node, target, volume)
    assert session.run.axis == 2  # (K, J, I): the I axis
    outcome = logic.waitForCompletion(timeout=900)
    assert outcome["status"] == "done", outcome["message"]
    dice = unpainted_dice(outcome["result"], reference, painted, axis_kji=2)
    print(f"sagittal: Dice {dice:.3f} on unpainted slices, effective rank {outcome['summary']['effective_rank']}")
    assert dice >= 0.85
    effect.cancel()  # Cancel drops the preview; the painting stays
    assert session.previewNode is None
    assert np.array_equal(module.ARENASegmentationLogic.segmentArray(node, target, volume), painted)


def test_input_problems_are_refused_before_any_process_and_worker_errors_change_nothing(module, abdomen):
    volume, reference = abdomen
    node, target, _ = paint(module, volume, reference, axis_ijk=2, node_name="errors")
    empty = node.GetSegmentation().AddEmptySegment("", "nothing painted")
    logic = module.ARENASegmentationLogic()
    with pytest.raises(RuntimeError, match="paint the structure"):
        logic.startAdapt(volume, node, empty)
    with pytest.raises(RuntimeError, match="target segment"):
        logic.startAdapt(volume, node, "no such segment")
    assert not logic.isRunning

    before = snapshot(module, node, volume)
    logic.startAdapt(volume, node, target, backbone="no-such-backbone", device="cpu", settings=SHORT)
    outcome = logic.waitForCompletion(timeout=300)
    assert outcome["status"] == "error" and "no-such-backbone" in outcome["message"]
    after = snapshot(module, node, volume)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_a_segment_name_beyond_ascii_survives_export_and_selects_the_segment(module, abdomen, tmp_path):
    """Slicer writes segment names in UTF-8; the engine reads them as written (pynrrd alone
    dropped every non-ASCII character, so --label could not name such a segment)."""
    import slicer
    from arenaseg.errors import ArenaError
    from arenaseg.io.labels import resolve_label

    volume, reference = abdomen
    name = "Leber (ü, 肝)"
    node, segment_id, _ = paint(module, volume, reference, axis_ijk=2, node_name="utf-8", name=name)
    path = module.ARENASegmentationLogic().exportSegment(node, segment_id, volume, tmp_path / "leber.seg.nrrd")
    assert name.encode("utf-8") in path.read_bytes()[:4096]  # what Slicer's writer put in the header
    assert resolve_label(path, name) == (1, 0)
    with pytest.raises(ArenaError, match=r"segments: 'Leber \(ü, 肝\)' \(1\)"):
        resolve_label(path, "Milz")
    slicer.mrmlScene.RemoveNode(node)
