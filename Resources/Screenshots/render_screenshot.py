"""Render the extension's catalog screenshot from a real ARENA run (VTK offscreen, no display).

    python Resources/Screenshots/render_screenshot.py [DATA_DIR]

Paints 3 axial liver slices from the reference labels of the shared abdomen CT
(``../shared/data/abdomen_ct`` or ``ARENASEG_DATA``), runs ``arenaseg adapt`` with the default
settings on the CPU, and draws the result as Slicer shows it: an axial slice with the ARENA
segment (orange), and the segment's surface in 3D with the bones.
Writes ``ARENASegmentation-1.png`` next to this file (the module's panel itself cannot be drawn
without the Slicer application).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util.numpy_support import numpy_to_vtk

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LIVER = 5  # label value of the liver in the shared data's labels
ORANGE = np.array([230, 140, 40], float)


def run_arena(data: Path, work: Path) -> tuple:
    sys.path.insert(0, str(ROOT / "ARENASegmentation"))
    from arenaseg.io.annotations import paint_slices
    from arenaseg.io.geometry import array_ijk, image_like

    labels = sitk.ReadImage(str(data / "labels.nii.gz"))
    painted = paint_slices(array_ijk(labels), LIVER, 3, 2)
    sitk.WriteImage(image_like(painted, labels), str(work / "painted.nii.gz"))
    subprocess.run([sys.executable, "-m", "arenaseg", "adapt", "--image", str(data / "ct.nii.gz"),
                    "--annotations", str(work / "painted.nii.gz"), "--label", str(LIVER), "--structure", "liver",
                    "--out", str(work / "liver.nii.gz"), "--device", "cpu"], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT / "ARENASegmentation")})
    orient = sitk.DICOMOrientImageFilter()
    orient.SetDesiredCoordinateOrientation("LPS")
    arrays = [sitk.GetArrayFromImage(orient.Execute(sitk.ReadImage(str(p))))
              for p in (data / "ct.nii.gz", work / "liver.nii.gz")]
    spacing = orient.Execute(sitk.ReadImage(str(data / "ct.nii.gz"))).GetSpacing()
    return arrays, spacing


def slice_actor(ct: np.ndarray, result: np.ndarray, spacing) -> vtk.vtkImageActor:
    """Axial slice (radiological view: patient left on the right) with the result blended in."""
    k = int(np.argmax(result.sum(axis=(1, 2))))
    gray = np.clip((ct[k].astype(float) + 160) / 400, 0, 1)[..., None] * 255 * np.ones(3)
    rgb = np.where(result[k, ..., None] > 0, 0.5 * gray + 0.5 * ORANGE, gray)
    rgb = np.ascontiguousarray(rgb[::-1].astype(np.uint8))  # VTK images start at the bottom row
    image = vtk.vtkImageData()
    image.SetDimensions(rgb.shape[1], rgb.shape[0], 1)
    image.SetSpacing(spacing[0], spacing[1], 1)
    image.GetPointData().SetScalars(numpy_to_vtk(rgb.reshape(-1, 3), deep=True))
    actor = vtk.vtkImageActor()
    actor.GetMapper().SetInputData(image)
    return actor


def surface_actor(mask: np.ndarray, spacing, color, opacity=1.0, level=0.5) -> vtk.vtkActor:
    data = vtk.vtkImageData()
    data.SetDimensions(mask.shape[2], mask.shape[1], mask.shape[0])
    data.SetSpacing(spacing)
    data.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(mask).ravel(), deep=True))
    surface = vtk.vtkFlyingEdges3D()
    surface.SetInputData(data)
    surface.SetValue(0, level)
    smooth = vtk.vtkWindowedSincPolyDataFilter()
    smooth.SetInputConnection(surface.GetOutputPort())
    smooth.SetNumberOfIterations(20)
    smooth.SetPassBand(0.05)
    mapper = vtk.vtkPolyDataMapper()
    mapper.SetInputConnection(smooth.GetOutputPort())
    mapper.ScalarVisibilityOff()
    actor = vtk.vtkActor()
    actor.SetMapper(mapper)
    actor.GetProperty().SetColor(color)
    actor.GetProperty().SetOpacity(opacity)
    return actor


def render(arrays, spacing, out: Path) -> None:
    ct, result = arrays
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(1200, 600)
    left, right = vtk.vtkRenderer(), vtk.vtkRenderer()
    left.SetViewport(0, 0, 0.5, 1)
    right.SetViewport(0.5, 0, 1, 1)
    left.AddActor(slice_actor(ct, result, spacing))
    left.ResetCamera()
    left.GetActiveCamera().Zoom(1.3)
    right.AddActor(surface_actor((result > 0).astype(np.uint8), spacing, ORANGE / 255))
    right.AddActor(surface_actor((ct > 250).astype(np.uint8), spacing, (0.95, 0.92, 0.85), 0.35))
    camera = right.GetActiveCamera()
    camera.SetViewUp(0, 0, 1)  # superior up; the arrays are (z, y, x): VTK's x = patient left
    camera.SetPosition(0, -1, 0)  # looking from anterior
    camera.SetFocalPoint(0, 0, 0)
    right.ResetCamera()
    camera.Zoom(1.2)
    for renderer in (left, right):
        renderer.SetBackground(0.1, 0.1, 0.12)
        window.AddRenderer(renderer)
    left.GetActiveCamera().SetViewUp(0, 1, 0)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(out))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()


def main() -> None:
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(
        os.environ.get("ARENASEG_DATA", ROOT.parent / "shared" / "data")) / "abdomen_ct"
    with tempfile.TemporaryDirectory() as work:
        arrays, spacing = run_arena(data, Path(work))
    render(arrays, spacing, HERE / "ARENASegmentation-1.png")
    print(HERE / "ARENASegmentation-1.png")


if __name__ == "__main__":
    main()
