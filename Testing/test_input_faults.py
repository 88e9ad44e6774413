"""Inputs that are not what they seem (issue 11, §3, §4, §6): a DICOM folder with several series,
slices that do not form a regular grid, a header with sheared or broken geometry, NaN voxels, a
lost rescale intercept, a volume too thin for the network, a multi-layer Slicer segmentation.
Every input is built here, in tmp folders, from the real data in ../shared/data."""

import json
from functools import partial
import shutil
import unicodedata
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from arenaseg import pipeline, worker
from arenaseg.io import checks
from arenaseg.cli import main
from arenaseg.errors import ArenaError
from arenaseg.io.geometry import array_ijk, image_like, index_to_world_matrix
from arenaseg.io.images import read_image
from arenaseg.io.labels import painted_points, read_labels_on, resolve_label
from arenaseg.training import AdaptSettings

from conftest import ABDOMEN_SMALL, DATA, DICOM, LIVER, SPLEEN, painted, read_ijk

CT = ABDOMEN_SMALL / "ct.nii.gz"
THREE_SLICES = DATA / "dcmqi_ct3slice"
DICOM_FILES = sorted((DICOM / "dicom").iterdir())


def series_uid(folder: Path) -> str:
    (uid,) = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    return uid


@pytest.fixture(scope="module")
def two_series(tmp_path_factory):
    """The 20-slice abdomen series and the 3 dcmqi slices in one folder. Their
    SeriesInstanceUIDs already differ (GDCM sees two series), so nothing is rewritten."""
    folder = tmp_path_factory.mktemp("two_series")
    for f in DICOM_FILES + sorted(THREE_SLICES.glob("*.dcm")):
        shutil.copy(f, folder)
    uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    assert len(set(uids)) == 2
    return folder


@pytest.fixture(scope="module")
def liver_adapter(small_liver, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter")
    result = pipeline.adapt(str(CT), str(small_liver[0]), LIVER, str(out / "seg.nii.gz"),
                            str(out / "liver.safetensors"), settings=AdaptSettings(steps=2),
                            structure="liver")
    return Path(result.adapter)


def refused(capsys, argv, *words):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len([line for line in err if "error" in line]) == 1 and err[-1].startswith("arenaseg: error:")
    for word in words:
        assert word in err[-1], err[-1]
    return err[-1]


# --- §3: which series -------------------------------------------------------------------------

def test_folder_with_two_series_and_no_annotations_lists_them(two_series):
    with pytest.raises(ArenaError) as err:
        read_image(two_series)
    message = str(err.value)
    assert "holds 2 DICOM series" in message and "--series" in message
    assert series_uid(THREE_SLICES) in message and "(3 slices)" in message
    assert "'CT Body 3.0' (20 slices)" in message


def test_annotations_choose_the_series_they_lie_on_and_say_so(two_series, tmp_path):
    warnings = []
    ann, _, _ = painted(DICOM / "labels.nii.gz", LIVER, out=tmp_path / "painted.nii.gz")
    image = read_image(two_series, match=partial(painted_points, ann), warn=warnings.append)
    assert image.GetSize() == (512, 512, 20)
    assert len(warnings) == 1 and "the one the annotations lie on" in warnings[0]
    assert "(20 slices)" in warnings[0]


def test_series_option_reads_that_series(two_series):
    image = read_image(two_series, series=series_uid(THREE_SLICES))
    assert image.GetSize() == (512, 512, 3)
    line = checks.describe(image, two_series)
    assert series_uid(THREE_SLICES) in line and "(3 slices)" in line
    assert "512×512×3 voxels" in line and "orientation LPS" in line


def test_segment_on_a_folder_with_two_series_stops_listing_them(capsys, two_series, liver_adapter,
                                                               tmp_path):
    out = tmp_path / "seg.nii.gz"
    refused(capsys, ["segment", "--image", str(two_series), "--adapter", str(liver_adapter),
                     "--out", str(out)], "2 DICOM series", "--series UID", "(20 slices)",
            "(3 slices)", series_uid(THREE_SLICES))
    assert not out.exists()


def test_the_chosen_series_too_thin_for_the_network_is_refused(capsys, two_series, liver_adapter,
                                                               tmp_path):
    err = refused(capsys, ["segment", "--image", str(two_series), "--series", series_uid(THREE_SLICES),
                           "--adapter", str(liver_adapter), "--out", str(tmp_path / "seg.nii.gz")],
                  "at least 8", "24 mm")
    assert "3 mm thick along voxel axis k" in err and not (tmp_path / "seg.nii.gz").exists()


def test_adapt_picks_the_series_of_the_annotations_and_prints_what_it_read(capsys, two_series,
                                                                           tmp_path):
    ann, _, _ = painted(DICOM / "labels.nii.gz", LIVER, out=tmp_path / "painted.nii.gz")
    out = tmp_path / "seg.nii.gz"
    assert main(["adapt", "--image", str(two_series), "--annotations", str(ann), "--label", "5",
                 "--out", str(out), "--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "the one the annotations lie on" in err
    read = [line for line in err.splitlines() if line.startswith("arenaseg: read ")]
    assert len(read) == 1 and "(20 slices), 512×512×20 voxels" in read[0]
    assert sitk.ReadImage(str(out)).GetSize() == (512, 512, 20)


def test_worker_takes_a_series_field_and_reports_warnings_as_events(capsys, two_series,
                                                                    liver_adapter, tmp_path):
    done = worker.run_job({"command": "segment", "image": str(two_series),
                           "series": series_uid(DICOM / "dicom"), "adapter": str(liver_adapter),
                           "out": str(tmp_path / "seg.nii.gz")})
    assert sitk.ReadImage(done["segmentation"]).GetSize() == (512, 512, 20)
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    warnings = [e for e in events if e["event"] == "warning"]
    assert any("40 mm thick" in e["message"] for e in warnings)  # 20 slices of 2 mm: thin
    assert any(e["event"] == "phase" and e["message"].startswith("read ") for e in events)


# --- §3: geometry that is not a regular grid ----------------------------------------------------

def _dicom_copy(folder: Path, edit=None, drop=(), duplicate=()):
    """The 20-slice series copied, slice ``i`` edited by ``edit(i, dataset)`` (pydicom: the only
    tool here that rewrites DICOM tags and keeps the pixel data as it is)."""
    import pydicom

    folder.mkdir()
    for i, f in enumerate(DICOM_FILES):
        if i in drop:
            continue
        if edit:
            ds = pydicom.dcmread(f)
            edit(i, ds)
            ds.save_as(folder / f.name)
        else:
            shutil.copy(f, folder)
        if i in duplicate:
            shutil.copy(f, folder / (f.name + ".copy"))
    return folder


def _tilt(i, ds):  # each slice 0.35 mm further back per mm along z: a tilted gantry
    x, y, z = map(float, ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y + 0.35 * (z - float(_tilt.z0)), z]


def _reformatted(i, ds):
    if i == 5:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]


def _jitter(i, ds):  # 0.01 mm rounding noise in the table position
    x, y, z = map(float, ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y, z + 0.01 * (i % 2)]


@pytest.mark.parametrize("kind, words", [
    ("missing", ["slice spacing varies from 2 to 4 mm", "missing slices", "complete series"]),
    ("duplicate", ["share a position", ".copy", "one file per position"]),
    ("tilt", ["gantry tilt", "19.3°", "regularization"]),
    ("reformatted", ["mixes slice orientations", "LIP"]),
])
def test_irregular_dicom_series_is_refused_naming_the_kind_and_the_file(tmp_path, kind, words):
    import pydicom

    _tilt.z0 = pydicom.dcmread(DICOM_FILES[0]).ImagePositionPatient[2]
    folder = _dicom_copy(tmp_path / kind, **{
        "missing": dict(drop=(7,)), "duplicate": dict(duplicate=(4,)), "tilt": dict(edit=_tilt),
        "reformatted": dict(edit=_reformatted)}[kind])
    with pytest.raises(ArenaError) as err:
        read_image(folder)
    message = str(err.value)
    assert str(folder) in message and "CT.1.3.12" in message  # the folder and a file named
    for word in words:
        assert word in message, message


def test_rounding_noise_in_slice_positions_is_only_a_warning(tmp_path):
    folder = _dicom_copy(tmp_path / "jitter", edit=_jitter)
    warnings = []
    image = read_image(folder, warn=warnings.append)
    assert image.GetSize() == (512, 512, 20)
    assert len(warnings) == 1 and "under a tenth of a voxel" in warnings[0]


def test_the_unchanged_series_reads_without_a_word():
    warnings = []
    read_image(DICOM / "dicom", warn=warnings.append)
    assert warnings == []


def test_sheared_or_broken_headers_are_refused_with_the_right_fix(tmp_path):
    ct = sitk.ReadImage(str(CT))
    sheared = sitk.Image(ct)
    direction = np.array(ct.GetDirection()).reshape(3, 3)
    direction[:, 2] = (direction[:, 2] + 0.3 * direction[:, 1]) / np.hypot(1, 0.3)
    sheared.SetDirection(direction.flatten().tolist())
    sitk.WriteImage(sheared, str(tmp_path / "sheared.nrrd"))
    with pytest.raises(ArenaError, match="not perpendicular.*sheared.*regular grid"):
        read_image(tmp_path / "sheared.nrrd")

    nifti = nib.load(str(CT))
    affine = nifti.affine.copy()
    affine[:3, 2] += 0.3 * affine[:3, 1]
    nib.save(nib.Nifti1Image(np.asarray(nifti.dataobj), affine), str(tmp_path / "sheared.nii.gz"))
    with pytest.raises(ArenaError, match="sheared affine.*regular grid"):
        read_image(tmp_path / "sheared.nii.gz")

    sitk.WriteImage(ct, str(tmp_path / "ct.mhd"))
    header = (tmp_path / "ct.mhd").read_text().replace("ElementSpacing = 3 3 3",
                                                      "ElementSpacing = 3 3 0")
    (tmp_path / "ct.mhd").write_text(header)
    with pytest.raises(ArenaError, match="zero or non-finite voxel spacing.*header is damaged"):
        read_image(tmp_path / "ct.mhd")


# --- §4: is the CT a CT -------------------------------------------------------------------------

def test_lost_rescale_intercept_is_refused_saying_what_to_do(capsys, small_liver, tmp_path):
    hu = sitk.ReadImage(str(CT))
    stored = sitk.Cast(sitk.Clamp(hu + 1024, lowerBound=0), sitk.sitkUInt16)  # intercept lost
    sitk.WriteImage(stored, str(tmp_path / "ct_uint16.nii.gz"))
    refused(capsys, ["adapt", "--image", str(tmp_path / "ct_uint16.nii.gz"), "--annotations",
                     str(small_liver[0]), "--label", "5", "--out", str(tmp_path / "seg.nii.gz")],
            "ct_uint16.nii.gz", "HU + 1024", "rescale intercept", "- 1024")
    assert not (tmp_path / "seg.nii.gz").exists()


def test_lost_rescale_intercept_other_than_1024_is_read_from_the_air():
    """Stored as HU + 2048 (a RescaleIntercept of -2048): the message told the user to subtract
    1024, which leaves every value 1024 too high. The offset is read from the air."""
    hu = sitk.ReadImage(str(CT))
    stored = sitk.Cast(sitk.Clamp(hu + 2048, lowerBound=0), sitk.sitkUInt16)
    with pytest.raises(ArenaError, match=r"HU \+ 2048 .*RescaleIntercept.*- 2048"):
        checks.check_intensities(stored, "ct_2048.nii.gz")


def test_normalised_image_is_not_a_ct():
    ct = sitk.ReadImage(str(CT), sitk.sitkFloat32)
    with pytest.raises(ArenaError, match="not a CT in Hounsfield units"):
        checks.check_intensities(sitk.RescaleIntensity(ct, 0, 1), "norm.nii.gz")
    checks.check_intensities(ct, "ct.nii.gz", warn=pytest.fail)  # the real CT passes silently


def test_nan_slab_is_outside_the_scan_and_never_segmented(capsys, liver_adapter, tmp_path):
    ct = sitk.ReadImage(str(CT), sitk.sitkFloat32)
    values = array_ijk(ct).copy()
    ref = read_ijk(ABDOMEN_SMALL / "labels.nii.gz") == LIVER
    slab = [k for k in range(values.shape[2]) if ref[:, :, k].sum() > 300][3:6]
    values[:, :, slab] = np.nan
    sitk.WriteImage(image_like(values, ct), str(tmp_path / "nan.nii.gz"))
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", "--image", str(tmp_path / "nan.nii.gz"), "--adapter",
                 str(liver_adapter), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    count = 3 * values.shape[0] * values.shape[1]
    assert f"warning: image '{tmp_path / 'nan.nii.gz'}' has {count} NaN/inf voxels" in err
    seg = read_ijk(out) > 0
    assert not seg[:, :, slab].any()  # no image there: nothing predicted
    assert seg.any()  # the liver outside the slab is still found


# --- §6: Slicer segmentations and label names ---------------------------------------------------

@pytest.fixture
def two_layer_seg(small_liver, tmp_path):
    """A Slicer .seg.nrrd: the painted liver in layer 0, an empty segment in a second layer."""
    import slicerio

    ann = sitk.ReadImage(str(small_liver[0]))
    paint = array_ijk(ann) == LIVER
    voxels = np.zeros((2, *paint.shape), np.uint8)
    voxels[0][paint] = 1
    segmentation = {"voxels": voxels, "ijkToLPS": index_to_world_matrix(ann), "segments": [
        {"id": "liver", "name": "liver", "labelValue": 1, "layer": 0},
        {"id": "tumour", "name": "tumour", "labelValue": 1, "layer": 1}]}
    path = tmp_path / "painted.seg.nrrd"
    slicerio.write_segmentation(str(path), segmentation)
    assert sitk.ReadImage(str(path)).GetNumberOfComponentsPerPixel() == 2  # what used to fail
    return path, paint


def test_segment_names_and_values_resolve_to_their_layer(two_layer_seg):
    path, paint = two_layer_seg
    assert resolve_label(path, "liver") == (1, 0)
    assert resolve_label(path, "tumour") == (1, 1)
    assert resolve_label(path, 1) == (1, 0)  # the empty layer cannot be the paint
    with pytest.raises(ArenaError, match="'spleen' is not a segment.*'liver' \\(1\\), 'tumour' \\(1\\)"):
        resolve_label(path, "spleen")
    with pytest.raises(ArenaError, match="plain labelmap without segment names"):
        resolve_label(CT, "liver")
    on_grid = read_labels_on(sitk.ReadImage(str(CT)), path, label="liver")
    assert np.array_equal(array_ijk(on_grid) == 1, paint)


def test_a_latin_1_name_and_a_segment_without_a_name_resolve(two_layer_seg):
    """Names not written by Slicer: a Latin-1 name is read as Latin-1 (not UTF-8 replacement
    characters), and a segment without a Name field is named by its ID (a KeyError before)."""
    path, _ = two_layer_seg
    header_end = path.read_bytes().index(b"\n\n")
    header, data = path.read_bytes()[:header_end], path.read_bytes()[header_end:]
    assert b"Segment0_Name:=liver" in header and b"Segment1_Name:=tumour\n" in header
    header = header.replace(b"Segment0_Name:=liver", "Segment0_Name:=Leber ü".encode("latin-1"))
    path.write_bytes(header.replace(b"Segment1_Name:=tumour\n", b"") + data)
    assert resolve_label(path, "Leber ü") == (1, 0)
    assert resolve_label(path, unicodedata.normalize("NFD", "LEBER Ü")) == (1, 0)  # typed on macOS
    assert resolve_label(path, 1) == (1, 0)
    with pytest.raises(ArenaError, match="segments: 'Leber ü' \\(1\\), 'tumour' \\(1\\)"):
        resolve_label(path, "Milz")


def test_two_layer_seg_nrrd_with_a_segment_name_as_label(capsys, two_layer_seg, tmp_path):
    path, paint = two_layer_seg
    out = tmp_path / "seg.nii.gz"
    assert main(["adapt", "--image", str(CT), "--annotations", str(path), "--label", "liver",
                 "--out", str(out), "--steps", "2"]) == 0
    seg = read_ijk(out)
    assert set(np.unique(seg)) <= {0, 1} and np.all(seg[paint] == 1)


def test_a_segment_name_picks_its_own_layer_when_values_repeat(capsys, small_liver, tmp_path):
    """Slicer stores overlapping segments in layers, each numbered from 1: the name decides."""
    import slicerio

    ann = sitk.ReadImage(str(small_liver[0]))
    paint, ref = array_ijk(ann) == LIVER, small_liver[2]
    other = (ref == SPLEEN) & np.any(paint, axis=(0, 1))[None, None, :]  # spleen, same slices
    voxels = np.zeros((2, *paint.shape), np.uint8)
    voxels[0][paint], voxels[1][other] = 1, 1
    path = tmp_path / "layers.seg.nrrd"
    slicerio.write_segmentation(str(path), {"voxels": voxels, "ijkToLPS": index_to_world_matrix(ann),
                                            "segments": [{"id": "a", "name": "liver", "labelValue": 1, "layer": 0},
                                                         {"id": "b", "name": "spleen", "labelValue": 1, "layer": 1}]})
    out = tmp_path / "seg.nii.gz"
    assert main(["adapt", "--image", str(CT), "--annotations", str(path), "--label", "spleen",
                 "--out", str(out), "--steps", "2"]) == 0, capsys.readouterr().err
    seg = read_ijk(out)
    assert np.all(seg[other] == 1) and not seg[paint & ~other].any()  # the spleen, not the liver


def test_a_truncated_nifti_is_refused_not_read_as_zeros(tmp_path):
    for name in ("ct.nii.gz", "ct.nii"):
        whole = tmp_path / f"whole_{name}"
        sitk.WriteImage(sitk.ReadImage(str(CT)), str(whole))
        data = whole.read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(data[:len(data) // 2])
        assert read_image(whole).GetSize() == sitk.ReadImage(str(CT)).GetSize()
        with pytest.raises(ArenaError, match=f"image '{cut}' is truncated or corrupt.*copy or export it again"):
            read_image(cut)
        with pytest.raises(ArenaError, match="annotations .* is truncated or corrupt"):
            read_image(cut, "annotations")
