"""Faults of the module found by reading it against Slicer's source (issue 20), each on real MRML
(slicer-core + trame-slicer) or on the pure function the Widget applies; no worker runs here."""

from __future__ import annotations

import types

import numpy as np
import pytest
import vtk

from slicer_testing import import_module, slicer_app  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def module():
    return import_module()


def small_volume(scene, name="ct"):
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.zeros((6, 7, 8), np.int16))
    node.SetSpacing(1.5, 1.5, 3.0)
    node.SetOrigin(10.0, -20.0, 5.0)
    return node


def test_show_3d_never_removes_a_closed_surface_source_representation(module, slicer_app):  # noqa: F811
    """Fault 2: unchecking *Show 3D* called RemoveClosedSurfaceRepresentation(), which deletes
    every segment's data when the closed surface is the source representation."""
    import slicer

    surface = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "surfaces")
    sphere = vtk.vtkSphereSource()
    sphere.Update()
    node.GetSegmentation().SetSourceRepresentationName(surface)  # e.g. a model imported as segments
    node.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "ball")
    assert node.GetSegmentation().GetSourceRepresentationName() == surface
    assert not module.results.canToggleSurface(node)
    module.results.setSurfaceShown(node, False)
    assert node.GetSegmentation().ContainsRepresentation(surface)
    segment = node.GetSegmentation().GetNthSegment(0)
    assert segment.GetRepresentation(surface).GetNumberOfPoints() > 0

    labelmaps = module.ARENASegmentationLogic.createSegmentationNode(small_volume(slicer.mrmlScene), "labelmaps")
    labelmaps.GetSegmentation().AddEmptySegment("", "a")
    assert module.results.canToggleSurface(labelmaps)
    module.results.setSurfaceShown(labelmaps, True)
    assert labelmaps.GetSegmentation().ContainsRepresentation(surface)
    module.results.setSurfaceShown(labelmaps, False)
    assert not labelmaps.GetSegmentation().ContainsRepresentation(surface)
    assert module.results.canToggleSurface(None) is False


def test_a_deleted_segment_is_not_replaced_by_the_one_the_selector_moves_to(module):
    """Fault 8: deleting the background segment made Slicer's selector pick the first segment,
    which the module stored as "known background"; a user's own choice is kept."""
    segments = {"Segment_1", "Segment_3"}
    after = module.panel.segmentAfterSelectorChange
    assert after("Segment_2", "Segment_1", segments.__contains__) == ""  # Segment_2 was deleted
    assert after("Segment_1", "Segment_3", segments.__contains__) == "Segment_3"  # the user's choice
    assert after("", "Segment_1", segments.__contains__) == "Segment_1"
    assert after("Segment_1", "", segments.__contains__) == ""


def test_segment_ids_do_not_carry_over_to_another_segmentation(module):
    """Fault 8: "Segment_2" of another segmentation is another segment."""
    ids = module.panel.segmentIdsForSegmentation
    assert ids("vtkMRMLSegmentationNode1", "vtkMRMLSegmentationNode2", "Segment_2", "Segment_3") == ("", "")
    assert ids("vtkMRMLSegmentationNode1", "vtkMRMLSegmentationNode1", "Segment_2", "Segment_3") == \
        ("Segment_2", "Segment_3")
    assert ids("", "vtkMRMLSegmentationNode1", "Segment_2", "") == ("", "")


def test_widget_stores_no_segment_the_selector_picked_by_itself(module, slicer_app):  # noqa: F811
    """The Widget's slots on a real parameter node and segmentation (fault 8)."""
    import slicer

    widget = module.ARENASegmentationWidget()
    parameters = module.ARENASegmentationLogic().getParameterNode()
    widget._parameterNode = parameters
    volume = small_volume(slicer.mrmlScene)
    first = module.ARENASegmentationLogic.createSegmentationNode(volume, "first")
    second = module.ARENASegmentationLogic.createSegmentationNode(volume, "second")
    a = first.GetSegmentation().AddEmptySegment("Segment_1", "liver")
    b = first.GetSegmentation().AddEmptySegment("Segment_2", "not liver")
    second.GetSegmentation().AddEmptySegment("Segment_2", "spleen")
    parameters.segmentationNode = first
    widget.onSegmentationChanged(first)
    widget.onTargetSegmentChanged(a)
    widget.onBackgroundSegmentChanged(b)
    assert (parameters.targetSegmentID, parameters.backgroundSegmentID) == (a, b)
    first.GetSegmentation().RemoveSegment(b)
    widget.onBackgroundSegmentChanged(a)  # what Slicer's selector emits after the deletion
    assert parameters.backgroundSegmentID == ""
    parameters.segmentationNode = second
    widget.onSegmentationChanged(second)
    assert (parameters.targetSegmentID, parameters.backgroundSegmentID) == ("", "")
    for node in (first, second, volume):
        slicer.mrmlScene.RemoveNode(node)


def test_the_suggested_slice_is_found_under_a_transform(module, slicer_app):  # noqa: F811
    """Fault 10: the jump used the volume's local IJK to RAS; the views show it transformed."""
    import slicer

    volume = small_volume(slicer.mrmlScene)
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 40.0)
    matrix.SetElement(2, 3, -12.5)
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    centre = module.results.sliceCentre(volume, 2, 4)
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    local = ijk_to_ras.MultiplyPoint([3.5, 3.0, 4, 1.0])[:3]
    assert np.allclose(centre, np.add(local, [40.0, 0.0, -12.5]))
    view = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceNode")
    view.SetOrientationToAxial()
    module.results.jumpToSlice(volume, 2, 4)
    slice_to_ras = view.GetSliceToRAS()
    assert np.isclose(slice_to_ras.GetElement(2, 3), centre[2])
    for node in (view, volume, transform):
        slicer.mrmlScene.RemoveNode(node)


def test_an_empty_adapter_path_is_empty_not_a_dot(module):
    """Fault 12: an empty ``pathlib.Path`` parameter shows "." in the line edit."""
    parameters = module.ARENASegmentationLogic().getParameterNode()
    assert parameters.applyAdapterPath == ""
    assert str(parameters.applyAdapterPath or "") == ""


def test_the_first_volume_offered_is_never_a_labelmap(module, slicer_app):  # noqa: F811
    """Fault 12: ``GetFirstNodeByClass("vtkMRMLScalarVolumeNode")`` returns a labelmap volume when
    it was loaded first (vtkMRMLLabelMapVolumeNode is a scalar volume node)."""
    import slicer

    scene = slicer.vtkMRMLScene()
    for cls in ("vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode"):
        scene.RegisterNodeClass(getattr(slicer, cls)())
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    assert scene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode") is labels  # the fault
    assert module.mrmlio.firstImageVolume(scene) is None
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    assert module.mrmlio.firstImageVolume(scene) is ct


def test_a_failing_progress_display_does_not_leave_the_job_running(module, tmp_path):
    """Fault 12: an exception in the progress callback escaped processEvents before the final
    event was read, so the job stayed "running" forever. A real worker process that prints a
    progress event and a done event, then exits."""
    import sys

    from ARENASegmentationLib import process

    script = tmp_path / "worker.py"
    script.write_text(
        "import json, sys\n"
        "print(json.dumps({'event': 'progress', 'step': 1, 'steps': 1, 'loss': 0.5, 'total_rank': 3}))\n"
        "print(json.dumps({'event': 'error', 'message': 'stopped on purpose'}))\n"
        "sys.exit(1)\n")
    logic = module.ARENASegmentationLogic()
    worker = process.WorkerProcess([sys.executable, str(script)], None, tmp_path / "worker.log")

    def broken(event):
        raise ValueError("a display error")

    finished = []
    logic.job = dict(job={"command": "adapt"}, runDir=tmp_path / "run", worker=worker, onProgress=broken,
                     onFinished=finished.append, context={}, final=None, started=0.0,
                     sceneObserver=(types.SimpleNamespace(RemoveObserver=lambda tag: None), 0))
    outcome = logic.waitForCompletion(timeout=60, pollInterval=0.02)
    assert outcome["status"] == "error" and "stopped on purpose" in outcome["message"]
    assert not logic.isRunning and finished == [outcome]
