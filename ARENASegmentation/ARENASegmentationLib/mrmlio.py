"""MRML <-> numpy arrays and files, always on the CT volume's exact voxel grid (IJK-to-RAS)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import vtk

import slicer


def segmentArray(segmentationNode, segmentId: str, volumeNode) -> np.ndarray:
    """Segment voxels on the volume's grid, uint8 array indexed (k, j, i) like the volume."""
    return np.asarray(slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode),
                      dtype=np.uint8)


def _ijkToRas(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def gridProblem(segmentationNode, segmentIds: list, volumeNode) -> str:
    """Why the painted segments cannot be read on the CT's grid without moving paint, or "".

    The segments must be stored as binary labelmaps (their source representation: a labelmap
    made from surfaces differs from what was drawn), under the same transform as the volume, and
    on a grid whose voxels coincide with the volume's (same axes and spacing, offset by whole
    voxels): otherwise resampling would move strokes to other slices.
    """
    labelmapName = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    segmentation = segmentationNode.GetSegmentation()
    name, volume = segmentationNode.GetName(), volumeNode.GetName()
    if segmentation.GetSourceRepresentationName() != labelmapName:
        return (f"Segmentation '{name}' stores '{segmentation.GetSourceRepresentationName()}', not a binary "
                "labelmap: in the Segmentations module, set the source representation to 'Binary labelmap' "
                "(or paint with the Segment Editor) and press again.")
    if segmentationNode.GetParentTransformNode() is not volumeNode.GetParentTransformNode():
        return (f"Segmentation '{name}' and volume '{volume}' are under different transforms: harden the "
                "transforms (Data module, right-click, 'Harden transform') and press again.")
    volumeMatrix = _ijkToRas(volumeNode)
    for segmentId in segmentIds:
        image = slicer.vtkOrientedImageData()
        segmentationNode.GetBinaryLabelmapRepresentation(segmentId, image)
        extent = image.GetExtent()
        if extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
            continue  # empty: nothing to move
        m = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(m)
        offset = np.linalg.solve(volumeMatrix, slicer.util.arrayFromVTKMatrix(m))  # segment IJK -> volume IJK
        aligned = np.allclose(offset[:3, :3], np.eye(3), atol=1e-3) and \
            np.allclose(offset[:3, 3], np.round(offset[:3, 3]), atol=1e-3)
        if not aligned:
            spacing = np.linalg.norm(slicer.util.arrayFromVTKMatrix(m)[:3, :3], axis=0)
            return (f"Segment '{segmentation.GetSegment(segmentId).GetName()}' of '{name}' lies on another voxel "
                    f"grid than volume '{volume}' (spacing {np.round(spacing, 3).tolist()} mm vs "
                    f"{np.round(np.linalg.norm(volumeMatrix[:3, :3], axis=0), 3).tolist()} mm, or shifted), so "
                    "painted strokes would move to other slices: in the Segment Editor press 'Specify geometry', "
                    f"choose '{volume}' as source geometry, and repaint the slices.")
    return ""


def firstImageVolume(scene):
    """The first scalar volume of ``scene`` that is not a labelmap (a labelmap volume is a
    ``vtkMRMLScalarVolumeNode`` too), or None."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if not node.IsA("vtkMRMLLabelMapVolumeNode"):
            return node
    return None


def createSegmentationNode(volumeNode, name: str | None = None):
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or f"{volumeNode.GetName()} segmentation")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    return node


def writeVolume(volumeNode, path: Path) -> None:
    """Write the volume's voxels with its exact geometry (IJK-to-RAS incl. directions) using
    Slicer's own volume writer; the scene is not modified."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)  # a temporary file: speed over size
    if not storage.WriteData(volumeNode):
        raise RuntimeError(f"Writing volume '{volumeNode.GetName()}' to '{path}' failed: check the free disk space.")


def labelmapNode(array: np.ndarray, volumeNode):
    """A labelmap node outside the scene holding ``array`` (k, j, i) on the volume's grid."""
    node = slicer.vtkMRMLLabelMapVolumeNode()
    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    node.SetIJKToRASMatrix(ijkToRas)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    return node


def writeLabelmap(array: np.ndarray, volumeNode, path: Path, compress: bool = False) -> None:
    """Write a (k, j, i) label array on the volume's grid (NRRD or NIfTI by extension)."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(compress)
    if not storage.WriteData(labelmapNode(array, volumeNode)):
        raise RuntimeError(f"Writing labelmap '{path}' failed: check the folder exists and is writable.")


def readLabelmap(path: str, volumeNode) -> np.ndarray:
    """Read a labelmap the worker wrote on the volume's grid; (k, j, i) array.

    Raises:
        RuntimeError: unreadable, or not exactly on the volume's grid (size, IJK-to-RAS).
    """
    node = slicer.vtkMRMLLabelMapVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise RuntimeError(f"The result '{path}' cannot be read.")
    same = node.GetImageData().GetDimensions() == volumeNode.GetImageData().GetDimensions() and np.allclose(
        _ijkToRas(node), _ijkToRas(volumeNode), atol=1e-3)
    if not same:
        raise RuntimeError(f"The result '{path}' is not on the grid of volume '{volumeNode.GetName()}'.")
    return np.array(slicer.util.arrayFromVolume(node))


def exportSegment(segmentationNode, segmentId: str, volumeNode, path) -> Path:
    """Export one segment on the volume's grid.

    ``.nii``/``.nii.gz``/``.nrrd``: a labelmap (1 inside, 0 outside) on the volume's exact grid;
    ``.seg.nrrd``: a Slicer segmentation file with this segment only (name, color and the ARENA
    tags kept), readable with ``slicerio``.
    """
    path = Path(path)
    name = path.name.lower()
    array = segmentArray(segmentationNode, segmentId, volumeNode)
    if name.endswith(".seg.nrrd"):
        source = segmentationNode.GetSegmentation().GetSegment(segmentId)
        node = slicer.vtkMRMLSegmentationNode()
        image = slicer.vtkOrientedImageData()
        image.ShallowCopy(labelmapNode(array, volumeNode).GetImageData())
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        image.SetImageToWorldMatrix(ijkToRas)
        segment = slicer.vtkSegment()
        segment.DeepCopyMetadata(source)
        labelmapName = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
        segment.AddRepresentation(labelmapName, image)
        node.GetSegmentation().SetSourceRepresentationName(labelmapName)
        node.GetSegmentation().AddSegment(segment, segmentId)
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(path))
        if not storage.WriteData(node):
            raise RuntimeError(f"Writing '{path}' failed: check the folder exists and is writable.")
    elif name.endswith((".nii", ".nii.gz", ".nrrd")):
        writeLabelmap(array, volumeNode, path, compress=True)
    else:
        raise RuntimeError(f"Export to '{path.name}': use .nii.gz, .nii, .nrrd or .seg.nrrd.")
    return path
