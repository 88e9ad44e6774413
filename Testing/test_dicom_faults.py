"""DICOM inputs from public bug reports (issue 21): an Enhanced (multi-frame) CT, whole or with a
frame missing (Slicer#6773, ClearCanvas#281), and slices without their geometry tags
(Slicer#7496, vtk-dicom#164). Every input is built here, in tmp folders, with pydicom from the
real 20-slice series in ../shared/data."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from arenaseg.cli import main
from arenaseg.errors import ArenaError
from arenaseg.io.images import read_image

from conftest import DICOM, LIVER, painted

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

SERIES = DICOM / "dicom"
FILES = sorted(SERIES.iterdir())
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def _item(**values) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def enhanced_ct(out: Path, drop=(), frame_edit=None) -> Path:
    """The series as one Enhanced CT Image Storage file, frames in the series' file order (from
    the head down), minus the slices in ``drop``: positions in the per-frame functional groups,
    orientation, pixel spacing and rescale (where GDCM reads it) in the shared groups;
    ``frame_edit(k, item)`` edits frame ``k``'s per-frame group."""
    slices = [pydicom.dcmread(f) for i, f in enumerate(FILES) if i not in drop]
    first = slices[0]
    ds = _item(SOPClassUID=ENHANCED_CT, SOPInstanceUID=generate_uid(), Modality="CT",
               SeriesInstanceUID=generate_uid(), StudyInstanceUID=generate_uid(),
               FrameOfReferenceUID=first.FrameOfReferenceUID, SeriesDescription="enhanced",
               ImageType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"], SamplesPerPixel=1,
               PhotometricInterpretation="MONOCHROME2", Rows=first.Rows, Columns=first.Columns,
               BitsAllocated=16, BitsStored=16, HighBit=15, PixelRepresentation=0,
               NumberOfFrames=len(slices))
    ds.SharedFunctionalGroupsSequence = Sequence([_item(
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=first.ImageOrientationPatient)]),
        PixelMeasuresSequence=Sequence([_item(PixelSpacing=first.PixelSpacing,
                                              SliceThickness=first.SliceThickness)]),
        PixelValueTransformationSequence=Sequence([_item(
            RescaleIntercept=first.RescaleIntercept, RescaleSlope=first.RescaleSlope,
            RescaleType="HU")]))])
    frames = [_item(PlanePositionSequence=Sequence([_item(ImagePositionPatient=s.ImagePositionPatient)]))
              for s in slices]
    for k, item in enumerate(frames):
        if frame_edit:
            frame_edit(k, item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.stack([s.pixel_array.astype(np.uint16) for s in slices]).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture(scope="module")
def reference():
    return read_image(SERIES)


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    return enhanced_ct(tmp_path_factory.mktemp("enhanced") / "ct.dcm")


@pytest.fixture(scope="module")
def annotations(tmp_path_factory):
    return painted(DICOM / "labels.nii.gz", LIVER, out=tmp_path_factory.mktemp("paint") / "paint.nii.gz")[0]


def refused_by_adapt(capsys, image, annotations, out_dir: Path, *words) -> str:
    """Run ``arenaseg adapt`` on ``image``: exit 2, one error line holding ``words``, nothing
    written in ``out_dir`` (created here, empty)."""
    out_dir.mkdir(exist_ok=True)
    rc = main(["adapt", "--image", str(image), "--annotations", str(annotations), "--label", "5",
               "--out", str(out_dir / "seg.nii.gz"), "--steps", "2"])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error" in line]
    assert rc == 2 and len(err) == 1 and err[0].startswith("arenaseg: error:"), err
    for word in words:
        assert word in err[0], err[0]
    assert not any(out_dir.iterdir()), list(out_dir.iterdir())
    return err[0]


# --- Enhanced (multi-frame) CT ---------------------------------------------------------------------

@pytest.mark.parametrize("as_folder", [False, True], ids=["file", "folder"])
def test_enhanced_ct_reads_with_the_series_geometry_and_voxels(intact, reference, as_folder):
    warnings = []
    image = read_image(intact.parent if as_folder else intact, warn=warnings.append)
    assert image.GetSize() == (512, 512, 20) and warnings == []
    np.testing.assert_allclose(image.GetSpacing(), (0.9765625, 0.9765625, 2.0))
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing())
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin())
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection())
    assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(reference))
    assert image.GetMetaData("0008|103e") == "enhanced"


def test_enhanced_ct_with_a_frame_missing_is_refused_naming_the_gap(capsys, annotations, tmp_path):
    gap = enhanced_ct(tmp_path / "gap" / "ct.dcm", drop=(7,))  # frames 7 and 8 now 4 mm apart
    messages = [refused_by_adapt(capsys, image, annotations, tmp_path / "out", str(image),
                                 "step of 4 mm between 'ct.dcm frame 8' and 'ct.dcm frame 7'",
                                 "missing frames", "complete series") for image in (gap, gap.parent)]
    assert messages[0].replace(str(gap), str(gap.parent)) != messages[0]  # each names what was given


def test_enhanced_ct_with_rounding_noise_in_frame_positions_is_only_a_warning(tmp_path):
    def jitter(k, item):
        x, y, z = map(float, item.PlanePositionSequence[0].ImagePositionPatient)
        item.PlanePositionSequence[0].ImagePositionPatient = [x, y, z + 0.01 * (k % 2)]

    warnings = []
    image = read_image(enhanced_ct(tmp_path / "ct.dcm", frame_edit=jitter), warn=warnings.append)
    assert image.GetSize() == (512, 512, 20) and abs(image.GetSpacing()[2] - 2) < 0.01
    assert len(warnings) == 1 and "under a tenth of a voxel" in warnings[0]


def test_enhanced_ct_frames_stored_out_of_order_are_sorted_like_a_series(reference, tmp_path):
    order = [3, 0, 1, 2] + list(range(4, 20))
    positions = [pydicom.dcmread(FILES[i], stop_before_pixels=True).ImagePositionPatient for i in range(20)]

    def shuffle(k, item):  # frame k shows slice order[k]: the pixels must follow
        item.PlanePositionSequence[0].ImagePositionPatient = positions[order[k]]

    path = enhanced_ct(tmp_path / "ct.dcm", frame_edit=shuffle)
    ds = pydicom.dcmread(path)
    pixels = np.stack([pydicom.dcmread(FILES[i]).pixel_array.astype(np.uint16) for i in order])
    ds.PixelData = pixels.tobytes()
    ds.save_as(path)
    image = read_image(path)
    assert np.array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(reference))
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin())


def _rescale_by_frame(k, item):
    item.PixelValueTransformationSequence = Sequence([_item(
        RescaleIntercept=-1024 if k < 10 else 0, RescaleSlope=1, RescaleType="HU")])


def _no_position(k, item):
    del item.PlanePositionSequence


@pytest.mark.parametrize("edit, words", [
    (_rescale_by_frame, ["different rescale", "'ct.dcm frame 11'", "single-frame"]),
    (_no_position, ["(0020,0032) ImagePositionPatient", "PlanePositionSequence", "every frame"]),
])
def test_enhanced_ct_frame_groups_gdcm_would_ignore_are_refused(tmp_path, edit, words):
    path = enhanced_ct(tmp_path / "ct.dcm", frame_edit=edit)
    with pytest.raises(ArenaError) as err:
        read_image(path)
    for word in [str(path)] + words:
        assert word in str(err.value), str(err.value)


def test_a_folder_of_several_multi_frame_files_is_refused(intact, tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    shutil.copy(intact, folder / "a.dcm")
    ds = pydicom.dcmread(intact)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(folder / "b.dcm")
    with pytest.raises(ArenaError, match="some multi-frame .*'a.dcm', 'b.dcm'.*give one multi-frame file"):
        read_image(folder)


# --- slices without their geometry tags ------------------------------------------------------------

@pytest.mark.parametrize("keyword, tag", [
    ("ImagePositionPatient", "(0020,0032) ImagePositionPatient"),
    ("ImageOrientationPatient", "(0020,0037) ImageOrientationPatient"),
    ("PixelSpacing", "(0028,0030) PixelSpacing"),
])
def test_slices_without_a_geometry_tag_are_refused_naming_it(capsys, annotations, tmp_path,
                                                            keyword, tag):
    folder = tmp_path / "series"
    folder.mkdir()
    for f in FILES:
        ds = pydicom.dcmread(f)
        del ds[keyword]
        ds.save_as(folder / f.name)
    message = refused_by_adapt(capsys, folder, annotations, tmp_path / "out", str(folder), tag,
                               "missing from every file", "CT.1.3.12", "original export")
    assert "several acquisitions" not in message  # the old, wrong cause
