"""Result display and bookkeeping: segment tags, rank table and charts, 3D surface, terminology,
and the per-user folder where adapters are kept."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import vtk

import slicer

TAG = "ARENASegmentation."  # prefix of the segment tags that record a result
RANK_TABLE_NAME = "ARENA ranks"
RANK_CHART_NAME = "ARENA ranks"
TRAINING_TABLE_NAME = "ARENA training"
TRAINING_CHART_NAME = "ARENA training"


def adapterFolder() -> Path:
    """Per-user folder for the adapters of finished runs (warm start, *Save adapter*):
    ``$ARENASEG_ADAPTERS``, else ``%LOCALAPPDATA%\\arenaseg\\adapters`` (Windows),
    ``~/Library/Application Support/arenaseg/adapters`` (macOS),
    ``$XDG_DATA_HOME/arenaseg/adapters`` or ``~/.local/share/arenaseg/adapters`` (Linux).
    Not the temporary folder: the operating system may empty that while a scene still refers
    to the adapter."""
    if os.environ.get("ARENASEG_ADAPTERS"):
        return Path(os.environ["ARENASEG_ADAPTERS"])
    if os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "arenaseg" / "adapters"


def keepAdapter(runAdapter: Path, structure: str) -> str:
    """Move a run's adapter into :func:`adapterFolder` under a unique name; returns its path."""
    folder = adapterFolder()
    folder.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in structure or "adapter")
    path = folder / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.safetensors"
    index = 1
    while path.exists():
        index += 1
        path = folder / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{index}.safetensors"
    shutil.move(str(runAdapter), path)
    return str(path)


def segmentTag(segment, key: str) -> str:
    """Value of the ARENA tag ``key`` of a vtkSegment ("" when absent)."""
    value = vtk.reference("")
    return str(value) if segment.GetTag(TAG + key, value) else ""


def uniqueSegmentName(segmentation, name: str) -> str:
    """``name``, or ``name 2``, ``name 3``... : the first that no segment of ``segmentation`` has."""
    candidate, index = name, 1
    while segmentation.GetSegmentIdBySegmentName(candidate):
        index += 1
        candidate = f"{name} {index}"
    return candidate


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


def copyTerminology(source, result) -> None:
    """The result is the same anatomy as the painted segment: same terminology entry (category,
    type, region), so that colour tables, DICOM SEG export and searches treat it alike."""
    tagName = slicer.vtkSegment.GetTerminologyEntryTagName()
    value = vtk.reference("")
    if source.GetTag(tagName, value) and str(value):
        result.SetTag(tagName, str(value))


def canToggleSurface(segmentationNode) -> bool:
    """Whether *Show 3D* may add and remove the closed surface: only when it is not the source
    representation (removing a source representation deletes the segments' data; Slicer's own
    Show 3D button, ``qMRMLSegmentationShow3DButton``, is disabled then)."""
    if segmentationNode is None:
        return False
    surface = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    return segmentationNode.GetSegmentation().GetSourceRepresentationName() != surface


def surfaceShown(segmentationNode) -> bool:
    """Whether the segmentation holds a closed surface (what *Show 3D* shows)."""
    surface = slicer.vtkSegmentationConverter.GetSegmentationClosedSurfaceRepresentationName()
    return bool(segmentationNode and segmentationNode.GetSegmentation().ContainsRepresentation(surface))


def setSurfaceShown(segmentationNode, show: bool) -> None:
    """*Show 3D*: create or remove the closed surface; refused (a no-op) where the surface is
    the source representation."""
    if not canToggleSurface(segmentationNode):
        return
    if show:
        segmentationNode.CreateClosedSurfaceRepresentation()
    else:
        segmentationNode.RemoveClosedSurfaceRepresentation()


def summaryText(summary: dict) -> str:
    """One line for the panel: total rank, initial rank, parameter counts."""
    parts = [f"Effective rank {summary.get('effective_rank')}"]
    if summary.get("initial_rank"):
        parts[0] += f" of {summary['initial_rank']}"
    if summary.get("trainable_parameters"):
        parts.append(f"{summary.get('active_parameters') or 0:,} of {summary['trainable_parameters']:,} "
                     "adapter+head parameters active")
    if summary.get("seconds"):
        parts.append(f"{summary['seconds']:.0f} s on {summary.get('device') or '?'}"
                     + (f" of server {summary['server']}" if summary.get("server") else ""))
    if summary.get("next_slice") is not None:
        parts.append(f"paint slice {summary['next_slice']} next (voxel axis "
                     f"{'IJK'[summary.get('slice_axis') or 0]}: the result is least sure there)")
    return "; ".join(parts)


def sliceCentre(volumeNode, axis: int, index: int) -> list:
    """World RAS of the middle of slice ``index`` along voxel ``axis`` (0 = I, 1 = J, 2 = K):
    the volume's IJK to RAS, then its parent transforms (the views show the transformed volume)."""
    ijk = [(d - 1) / 2 for d in volumeNode.GetImageData().GetDimensions()]
    ijk[axis] = index
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    local = matrix.MultiplyPoint([*ijk, 1.0])[:3]
    transform = volumeNode.GetParentTransformNode()
    if transform is None:
        return list(local)
    toWorld = vtk.vtkGeneralTransform()
    transform.GetTransformToWorld(toWorld)  # also non-linear transforms
    return list(toWorld.TransformPoint(local))


def jumpToSlice(volumeNode, axis: int, index: int) -> None:
    """Centre every slice view on the middle of slice ``index`` along voxel ``axis`` of
    ``volumeNode`` (:func:`sliceCentre`)."""
    slicer.vtkMRMLSliceNode.JumpAllSlices(volumeNode.GetScene() or slicer.mrmlScene,
                                          *sliceCentre(volumeNode, axis, index),
                                          slicer.vtkMRMLSliceNode.CenteredJumpSlice)


def _node(className: str, name: str):
    return slicer.mrmlScene.GetFirstNode(name, className) or slicer.mrmlScene.AddNewNodeByClass(className, name)


def _fillTable(tableNode, columns: list, rows: list) -> None:
    """Replace the table's content: ``columns`` = [(name, vtkArray class)], ``rows`` = tuples."""
    vtable = tableNode.GetTable()
    vtable.Initialize()
    arrays = []
    for name, kind in columns:
        array = kind()
        array.SetName(name)
        arrays.append(array)
    for row in rows:
        for array, value in zip(arrays, row):
            array.InsertNextValue(value)
    for array in arrays:
        vtable.AddColumn(array)
    tableNode.Modified()


#: Series colours: a new vtkMRMLPlotSeriesNode is black, so two curves of one chart look alike.
SERIES_COLORS = {"ARENA effective rank per layer": (0.2, 0.4, 0.8), "ARENA loss": (0.85, 0.33, 0.1),
                 "ARENA total rank": (0.2, 0.4, 0.8)}


def _series(chart, name: str, table, x: str, y: str, plotType):
    for i in range(chart.GetNumberOfPlotSeriesNodes()):
        if chart.GetNthPlotSeriesNode(i).GetName() == name:
            series = chart.GetNthPlotSeriesNode(i)
            break
    else:
        series = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    series.SetAndObserveTableNodeID(table.GetID())
    series.SetXColumnName(x)
    series.SetYColumnName(y)
    series.SetPlotType(plotType)
    series.SetColor(*SERIES_COLORS.get(name, (0.2, 0.4, 0.8)))
    return series


def rankNodes():
    """The table (per-layer effective rank) and chart nodes of the last result, or (None, None)."""
    return (slicer.mrmlScene.GetFirstNode(RANK_TABLE_NAME, "vtkMRMLTableNode"),
            slicer.mrmlScene.GetFirstNode(RANK_CHART_NAME, "vtkMRMLPlotChartNode"))


def updateRankNodes(summary: dict, resultName: str):
    """Fill the rank table (index, layer, effective rank) and its bar chart; returns both."""
    table = _node("vtkMRMLTableNode", RANK_TABLE_NAME)
    ranks = summary.get("ranks") or {}
    _fillTable(table, [("index", vtk.vtkIntArray), ("layer", vtk.vtkStringArray), ("effective rank", vtk.vtkIntArray)],
               [(i, name, int(value)) for i, (name, value) in enumerate(ranks.items())])
    table.SetAttribute(TAG + "Result", resultName)
    table.SetAttribute(TAG + "Summary", json.dumps(summary))
    chart = _node("vtkMRMLPlotChartNode", RANK_CHART_NAME)
    series = _series(chart, "ARENA effective rank per layer", table, "index", "effective rank",
                     slicer.vtkMRMLPlotSeriesNode.PlotTypeBar)
    series.SetLabelColumnName("layer")
    chart.SetTitle(f"Effective rank per layer: {resultName}")
    chart.SetXAxisTitle("layer")
    chart.SetYAxisTitle("effective rank")
    chart.SetLegendVisibility(False)
    return table, chart


def updateTrainingNodes(history: list):
    """The training curve so far, (step, loss, total rank) per step, as a table and a line chart
    (loss and total effective rank per step); called on every progress event: a live plot."""
    table = _node("vtkMRMLTableNode", TRAINING_TABLE_NAME)
    _fillTable(table, [("step", vtk.vtkIntArray), ("loss", vtk.vtkDoubleArray), ("total rank", vtk.vtkIntArray)],
               [(int(s), float(loss), int(rank)) for s, loss, rank in history])
    chart = _node("vtkMRMLPlotChartNode", TRAINING_CHART_NAME)
    for column in ("loss", "total rank"):  # scatter: the "step" column is the X axis (a line plot ignores X)
        _series(chart, f"ARENA {column}", table, "step", column, slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    chart.SetTitle("Loss and total effective rank per step")
    chart.SetXAxisTitle("step")
    return table, chart


def rankTable(tableNode) -> dict:
    """The rank table back as ``{layer: effective rank}``."""
    vtable = tableNode.GetTable()
    layer, rank = vtable.GetColumnByName("layer"), vtable.GetColumnByName("effective rank")
    return {layer.GetValue(i): int(rank.GetValue(i)) for i in range(vtable.GetNumberOfRows())}
