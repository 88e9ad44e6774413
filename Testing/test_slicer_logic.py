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
    from arenaseg.annotations import paint_slices

    painted_ijk = paint_slices(reference.transpose(2, 1, 0), LIVER, 3, axis=axis_ijk)
    painted = (painted_ijk.transpose(2, 1, 0) > 0).astype(np.uint8)
    node = module.ARENASegmentationLogic.createSegmentationNode(volume, node_name)
    segment_id = node.GetSegmentation().AddEmptySegment("", name)
    slicer.util.updateSegmentBinaryLabelmapFromArray(painted, node, segment_id, volume)
    return node, segment_id, painted


def unpainted_dice(result: np.ndarray, reference: np.ndarray, painted: np.ndarray, axis_kji: int) -> float:
    from arenaseg.annotations import dice

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


@pytest.fixture(scope="module")
def axial_run(module, abdomen):
    """The full default adaptation on 3 painted axial liver slices (new segment mode)."""
    volume, reference = abdomen
    node, target, painted = paint(module, volume, reference, axis_ijk=2, node_name="axial")
    node.GetSegmentation().GetSegment(target).SetTag(TERMINOLOGY_TAG, LIVER_TERMINOLOGY)
    logic = module.ARENASegmentationLogic()
    events = []
    logic.startAdapt(volume, node, target, device="cpu", onProgress=events.append)
    outcome = logic.waitForCompletion(timeout=900)
    return logic, node, target, painted, outcome, events


def test_three_painted_axial_slices_give_the_liver_in_a_new_segment(module, abdomen, axial_run):
    import slicer

    volume, reference = abdomen
    logic, node, target, painted, outcome, events = axial_run
    assert outcome["status"] == "done", outcome["message"]
    seg = node.GetSegmentation()
    assert seg.GetNumberOfSegments() == 2
    result_id = outcome["segmentId"]
    assert result_id != target and seg.GetSegment(result_id).GetName() == "liver (ARENA)"

    # On the volume's geometry: the segment's own labelmap lies on the volume's voxel grid.
    image = slicer.vtkOrientedImageData()
    node.GetBinaryLabelmapRepresentation(result_id, image)
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    assert np.allclose(slicer.util.arrayFromVTKMatrix(m), ijk_to_ras(volume), atol=1e-4)
    result = module.ARENASegmentationLogic.segmentArray(node, result_id, volume)
    assert result.shape == slicer.util.arrayFromVolume(volume).shape

    dice = unpainted_dice(result, reference, painted, axis_kji=0)
    print(f"axial: Dice {dice:.3f} on unpainted slices, effective rank {outcome['summary']['effective_rank']}")
    assert dice >= 0.85
    assert np.all(result[painted > 0])  # every painted voxel is in the result ...
    target_now = module.ARENASegmentationLogic.segmentArray(node, target, volume)
    assert np.array_equal(target_now > 0, painted > 0)  # ... and the painting is untouched

    # Progress was reported step by step; the discovered ranks are shown and stored.
    summary = outcome["summary"]
    assert [e["step"] for e in events] == list(range(1, summary["steps"] + 1))
    assert summary["effective_rank"] == sum(summary["ranks"].values()) <= summary["initial_rank"]
    assert summary["active_parameters"] <= summary["trainable_parameters"]
    table, chart = logic.rankNodes()
    assert module.ARENASegmentationLogic.rankTable(table) == summary["ranks"]
    assert chart.GetNumberOfPlotSeriesNodes() == 1
    segment = seg.GetSegment(result_id)
    assert module.segmentTag(segment, "EffectiveRank") == str(summary["effective_rank"])
    assert module.segmentTag(segment, "SourceSegment") == target
    assert module.segmentTag(seg.GetSegment(target), "Adapter") == summary["adapter"]


def test_the_slice_to_paint_next_is_shown_and_the_views_go_there(module, abdomen, axial_run):
    import slicer

    volume, _ = abdomen
    logic, node, target, painted, outcome, events = axial_run
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


def test_result_is_shown_in_3d_named_like_the_target_and_its_adapter_is_kept_per_user(module, axial_run):
    """A surface at the end of the run, the target's terminology entry on the result, the live
    training curve, and the adapter in the documented per-user folder, not the temporary one."""
    import os
    import tempfile
    from pathlib import Path

    import slicer

    logic, node, target, painted, outcome, events = axial_run
    seg = node.GetSegmentation()
    assert seg.ContainsRepresentation(slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    value = vtk.reference("")
    assert seg.GetSegment(outcome["segmentId"]).GetTag(TERMINOLOGY_TAG, value) and str(value) == LIVER_TERMINOLOGY
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
    logic, node, _, _, outcome, _ = axial_run
    result_id = outcome["segmentId"]
    voxels = module.ARENASegmentationLogic.segmentArray(node, result_id, volume).transpose(2, 1, 0) > 0  # ijk

    path = logic.exportSegment(node, result_id, volume, tmp_path / "liver.seg.nrrd")
    segmentation = slicerio.read_segmentation(str(path))
    (segment,) = segmentation["segments"]
    assert segment["name"] == "liver (ARENA)"
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
        path = logic.exportSegment(node, result_id, volume, tmp_path / name)
        image, ct = sitk.ReadImage(str(path)), sitk.ReadImage(str(ABDOMEN / "ct.nii.gz"))
        assert image.GetSize() == ct.GetSize()
        assert np.allclose(image.GetOrigin(), ct.GetOrigin(), atol=1e-3)
        assert np.allclose(image.GetDirection(), ct.GetDirection(), atol=1e-6)
        assert np.array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0) > 0, voxels)


def test_correct_and_rerun_starts_from_the_previous_adapter_and_respects_background(
        module, abdomen, axial_run, tmp_path):
    """Second press: warm start from the adapter of the first run; a background segment clears
    the result there (painted voxels excepted); the result segment is updated, not duplicated."""
    import slicer

    volume, reference = abdomen
    logic, node, target, painted, first, _ = axial_run
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
        assert outcome["segmentId"] == first["segmentId"]
        assert node.GetSegmentation().GetNumberOfSegments() == 3
        result = module.ARENASegmentationLogic.segmentArray(node, outcome["segmentId"], volume)
        assert np.all(result[painted > 0])
        assert not np.any(result[(background > 0) & (painted == 0)])

        # Save the adapter, then apply it to a volume ("a new patient": here the same CT).
        saved = logic.saveAdapter(outcome["summary"]["adapter"], tmp_path / "liver.safetensors")
        other = module.ARENASegmentationLogic.createSegmentationNode(volume, "new patient")
        logic.startApplyAdapter(volume, str(saved), other, device="cpu")
        applied = logic.waitForCompletion(timeout=600)
        assert applied["status"] == "done", applied["message"]
        assert other.GetSegmentation().GetSegment(applied["segmentId"]).GetName() == "liver (ARENA)"
        assert module.ARENASegmentationLogic.segmentArray(other, applied["segmentId"], volume).any()
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


def test_sagittal_painting_fills_the_target_segment(module, abdomen):
    """Slices painted on a sagittal plane, result written into the target segment itself."""
    volume, reference = abdomen
    node, target, painted = paint(module, volume, reference, axis_ijk=0, node_name="sagittal")
    logic = module.ARENASegmentationLogic()
    logic.startAdapt(volume, node, target, device="cpu", fillTarget=True)
    outcome = logic.waitForCompletion(timeout=900)
    assert outcome["status"] == "done", outcome["message"]
    assert outcome["segmentId"] == target
    assert node.GetSegmentation().GetNumberOfSegments() == 1
    result = module.ARENASegmentationLogic.segmentArray(node, target, volume)
    assert np.all(result[painted > 0])
    dice = unpainted_dice(result, reference, painted, axis_kji=2)
    print(f"sagittal: Dice {dice:.3f} on unpainted slices, effective rank {outcome['summary']['effective_rank']}")
    assert dice >= 0.85

    # Undo: the painting comes back exactly, and only once.
    assert logic.canUndoFill()
    logic.undoFill()
    assert np.array_equal(module.ARENASegmentationLogic.segmentArray(node, target, volume), painted)
    assert not logic.canUndoFill()
    with pytest.raises(RuntimeError, match="Nothing to undo"):
        logic.undoFill()


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
