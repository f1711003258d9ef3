"""Series -> volume: geometry, rescale, ordering, enhanced multi-frame, and bad series."""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from demo.phantoms import abdomen_ct_study, brain_mr_study, pelvis_study
from engine.errors import GeometryError, PixelDataError
from engine.ops.volume import radiograph, series_to_volume


def _flair(seed: int = 1) -> list[pydicom.Dataset]:
    study = brain_mr_study(seed)
    return [d for d in study.datasets if d.SeriesDescription == "AX T2 FLAIR"]


def test_shuffled_slices_are_ordered_along_the_normal_with_spacing_from_positions() -> None:
    study = brain_mr_study(3)
    flair = [d for d in study.datasets if d.SeriesDescription == "AX T2 FLAIR"]
    rng = np.random.default_rng(0)
    shuffled = [flair[i] for i in rng.permutation(len(flair))]
    vol = series_to_volume(shuffled)
    assert vol.spacing == (3.0, 1.5, 1.5)
    assert [int(d.InstanceNumber) for d in vol.sources] == list(range(1, len(flair) + 1))
    assert vol.origin[2] == pytest.approx(-60.0)
    assert np.array_equal(vol.direction[2], [0, 0, 1])
    # values are the phantom's (no rescale for MR): the lesion is the bright part
    assert vol.array[study.labels == 1].mean() > 700 > vol.array[study.labels == 0].mean()


def test_ct_rescale_slope_and_intercept_give_hounsfield_units() -> None:
    study = abdomen_ct_study(4)
    vol = series_to_volume(study.datasets)
    assert study.datasets[0].RescaleIntercept == -1024
    right_lobe = vol.array[study.labels == 2]
    assert 75 < right_lobe.mean() < 95  # phantom right lobe is 85 HU
    # a slope other than 1 is applied too
    ds = copy.deepcopy(study.datasets)
    for d in ds:
        d.RescaleSlope = 2
    assert series_to_volume(ds).array[study.labels == 2].mean() == pytest.approx(
        2 * (right_lobe.mean() + 1024) - 1024, rel=1e-4)


def test_missing_slice_is_a_geometry_error_naming_the_gap() -> None:
    flair = _flair()
    del flair[17]
    with pytest.raises(GeometryError, match=r"missing or misplaced slice: gap of 6.000 mm"):
        series_to_volume(flair)


def test_mixed_orientation_is_refused() -> None:
    flair = _flair()
    flair[5].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    with pytest.raises(GeometryError, match=r"another orientation .*ImageOrientationPatient"):
        series_to_volume(flair)


def test_mixed_pixel_spacing_and_size_are_refused() -> None:
    flair = _flair()
    flair[2].PixelSpacing = [1.0, 1.0]
    with pytest.raises(GeometryError, match="pixel spacing"):
        series_to_volume(flair)
    flair = _flair()
    flair[3].Rows = 64
    with pytest.raises(GeometryError, match="is 64x128"):
        series_to_volume(flair)


def test_duplicate_positions_are_refused() -> None:
    flair = _flair()
    flair[4].ImagePositionPatient = list(flair[5].ImagePositionPatient)
    with pytest.raises(GeometryError, match="share position"):
        series_to_volume(flair)


def test_unreadable_pixel_data_is_a_pixel_data_error() -> None:
    flair = _flair()
    flair[7].PixelData = flair[7].PixelData[:1000]  # truncated
    with pytest.raises(PixelDataError, match="cannot be decoded"):
        series_to_volume(flair)
    flair = _flair()
    flair[8].file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"  # JPEG 2000, not encoded
    with pytest.raises(PixelDataError, match="1.2.840.10008.1.2.4.90"):
        series_to_volume(flair)


def test_enhanced_multiframe_ct_uses_per_frame_positions_and_shared_rescale() -> None:
    ds = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    vol = series_to_volume([ds])
    assert vol.array.shape == (int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    shared = ds.SharedFunctionalGroupsSequence[0]
    ps = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    assert vol.spacing[1:] == pytest.approx(ps)
    positions = [np.array(f.PlanePositionSequence[0].ImagePositionPatient, float)
                 for f in ds.PerFrameFunctionalGroupsSequence]
    normal = vol.direction[2]
    gaps = np.diff(sorted(p @ normal for p in positions))
    assert vol.spacing[0] == pytest.approx(float(np.median(gaps)))
    # first slice = lowest position along the normal
    assert np.array(vol.origin) @ normal == pytest.approx(min(p @ normal for p in positions))
    tr = shared.PixelValueTransformationSequence[0]
    raw = ds.pixel_array[0].astype(np.float64)
    first = int(np.argmin([p @ normal for p in positions]))
    expected = ds.pixel_array[first] * float(tr.RescaleSlope) + float(tr.RescaleIntercept)
    assert np.allclose(vol.array[0], expected) and raw.shape == vol.array.shape[1:]


def test_enhanced_object_stripped_of_functional_groups_is_a_geometry_error() -> None:
    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))  # groups removed in this file
    with pytest.raises(GeometryError, match="without plane orientation"):
        series_to_volume([ds])


def test_radiograph_monochrome1_is_inverted() -> None:
    study = pelvis_study(5, images=1, size=256)
    ds = study.datasets[0]
    plain = radiograph(ds).array
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = radiograph(ds).array
    assert np.allclose(plain + inverted, 4095)
