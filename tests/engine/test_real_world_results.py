"""Issue 14, items 2 and 3, on the write path: studies as modalities and archives send
them (Type 2 attributes absent, copied values malformed, SliceThickness empty, enhanced
multi-frame sources, no Frame of Reference) give valid SEG/SR objects, or an SR with
image references; no object with a dciodvfy error is kept.

The phantoms (demo.phantoms) altered, real enhanced files from pydicom-data, the
reference pipelines' write steps, and dciodvfy on everything written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from demo.phantoms import abdomen_ct_study, brain_mr_study
from engine.dicom_results import Provenance
from engine.errors import InputError
from engine.ops import postprocess
from engine.ops.volume import series_to_volume
from engine.result_sources import result_header
from engine.spec import LoadedPipeline
from engine.steps import OPERATORS, RunContext, _validated
from tests.engine.conftest import dciodvfy_errors

PROV = Provenance("unit-model", "2.1", "ab" * 32, "bts", "1.0.0", "run-real-world")
TYPE2_ABSENT_IN_GE_STUDY = ("PatientBirthDate", "PatientSex", "AccessionNumber",
                            "StudyDate", "StudyTime")


def _flair(seed: int) -> tuple[list[Dataset], np.ndarray]:
    study = brain_mr_study(seed)
    assert study.labels is not None
    return [d for d in study.datasets if d.SeriesDescription == "AX T2 FLAIR"], study.labels


def _written(pipeline: LoadedPipeline, series: list[Dataset], labels: np.ndarray
             ) -> RunContext:
    """Run the pipeline's write steps on ``series`` with ``labels`` (z, y, x) as the
    model's answer (the write path alone: no model involved)."""
    ctx = RunContext(pipeline=pipeline, runtime=None,  # type: ignore[arg-type]
                     datasets=series, provenance=PROV, series=series)
    ctx.volume = series_to_volume(series)
    ctx.labels = labels
    for name, ml in postprocess.volumes_ml(labels, ctx.volume.spacing,
                                           pipeline.spec.model.labels).items():
        from engine.steps import MeasurementValue

        ctx.measurements.append(MeasurementValue(f"volume_{name}", ml, "mL", name))
    for op in ("write_seg", "write_sr"):
        OPERATORS[op].fn(ctx, OPERATORS[op].params())
    return ctx


def _saved(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _results(ctx: RunContext, tmp: Path) -> dict[str, Dataset]:
    out = {}
    for kind, ds in ctx.results:
        path = _saved(ds, tmp / f"{kind}.dcm")
        assert dciodvfy_errors(path) == [], kind
        out[kind] = pydicom.dcmread(path)
    return out


def test_a_study_without_the_type2_attributes_a_ge_export_lacks_gives_valid_results(
    reference: dict, tmp_path: Path,
) -> None:
    series, labels = _flair(21)
    for ds in series:
        for keyword in TYPE2_ABSENT_IN_GE_STUDY:
            delattr(ds, keyword)
        ds.SliceThickness = None  # empty: the SEG's Pixel Measures need it (Type 1C)
    ctx = _written(reference["bts"], series, labels)
    got = _results(ctx, tmp_path)
    assert set(got) == {"SEG", "SR"} and ctx.seg_refused is None
    seg = got["SEG"]
    for keyword in TYPE2_ABSENT_IN_GE_STUDY:
        assert keyword in seg and not seg[keyword].value, keyword  # present, empty
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == pytest.approx(3.0)  # the measured spacing
    # the source datasets themselves are untouched
    assert all("PatientSex" not in d and d.SliceThickness is None for d in series)


def test_malformed_copied_values_are_normalised_when_unambiguous_else_emptied(
    reference: dict, tmp_path: Path,
) -> None:
    series, labels = _flair(22)
    for ds in series:
        ds.PatientBirthDate = "13.04.1937"
        ds.PatientSex = "X1"
        ds.StudyDate = "2026.03.01"
        ds.StudyTime = "10:15:00"
        ds.AccessionNumber = "A" * 30  # SH allows 16
        ds.PatientAge = "about 60"
        ds.PatientName = "Fakename"  # no caret: a lone family name
        # a Patient module sequence (highdicom copies it): one item with a value that
        # cannot be repaired, one with a CS that can
        broken, fine = Dataset(), Dataset()
        broken.PatientID, broken.TypeOfPatientID = "X" * 80, "TEXT"
        fine.PatientID, fine.TypeOfPatientID = "OTHER1", "text"
        ds.OtherPatientIDsSequence = [broken, fine]
    ctx = _written(reference["bts"], series, labels)
    got = _results(ctx, tmp_path)
    for ds in got.values():
        assert ds.PatientBirthDate == "19370413"
        assert ds.StudyDate == "20260301" and ds.StudyTime == "101500"
        assert not ds.PatientSex and not ds.AccessionNumber
        assert "PatientAge" not in ds
        assert str(ds.PatientName) == "Fakename^"
        (kept,) = ds.OtherPatientIDsSequence  # the broken item left out whole
        assert kept.PatientID == "OTHER1" and kept.TypeOfPatientID == "TEXT"  # CS repaired
    summary = ctx.repair.summary()
    assert "PatientBirthDate (0010,0030)" in summary and "PatientSex (0010,0040)" in summary
    assert "1937" not in summary and "X1" not in summary


@pytest.fixture(scope="module")
def enhanced_mr() -> tuple[Dataset, np.ndarray]:
    """A real enhanced object: the FLAIR series converted by highdicom's legacy
    converter (Legacy Converted Enhanced MR, what PACS and scanners produce)."""
    study = brain_mr_study(23, extra_localizer=False)
    assert study.labels is not None
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        study.datasets, series_instance_uid=hd.UID(), series_number=5,
        sop_instance_uid=hd.UID(), instance_number=1)
    return enhanced, study.labels


def test_seg_over_an_enhanced_multiframe_source_maps_each_frame_to_its_slice(
    reference: dict, enhanced_mr: tuple[Dataset, np.ndarray], tmp_path: Path,
) -> None:
    enhanced, truth = enhanced_mr
    ctx = _written(reference["bts"], [enhanced], truth)
    assert ctx.volume is not None and ctx.volume.frames != sorted(ctx.volume.frames)
    got = _results(ctx, tmp_path)
    seg = hd.seg.segread(tmp_path / "SEG.dcm")
    # each SEG frame refers to the source frame at its own position, with its mask
    positions = [float(f.PlanePositionSequence[0].ImagePositionPatient[2])
                 for f in enhanced.PerFrameFunctionalGroupsSequence]
    checked = 0
    for item in seg.PerFrameFunctionalGroupsSequence:
        src = item.DerivationImageSequence[0].SourceImageSequence[0]
        frame = int(src.ReferencedFrameNumber) - 1
        z = float(item.PlanePositionSequence[0].ImagePositionPatient[2])
        assert z == pytest.approx(positions[frame])
        checked += 1
    assert checked == int(truth.any(axis=(1, 2)).sum())  # empty frames omitted
    assert got["SR"].SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    mask = seg.get_volume(combine_segments=True).array
    assert int(mask.astype(bool).sum()) == int(truth.astype(bool).sum())


def test_seg_over_the_real_enhanced_ct_of_pydicom_data_is_valid(
    reference: dict, tmp_path: Path,
) -> None:
    ds = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    labels = np.zeros((int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns)), np.uint8)
    labels[:, 200:260, 200:260] = 1
    got = _results(_written(reference["lts"], [ds], labels), tmp_path)
    assert set(got) == {"SEG", "SR"}
    assert got["SEG"].NumberOfFrames == 2


def test_without_a_frame_of_reference_the_sr_references_the_images(
    reference: dict, tmp_path: Path,
) -> None:
    series, labels = _flair(24)
    for ds in series:
        del ds.FrameOfReferenceUID  # seen in old archives; a SEG cannot place its frames
    ctx = _written(reference["bts"], series, labels)
    assert ctx.seg_refused is not None and "FrameOfReferenceUID" not in ctx.seg_refused
    got = _results(ctx, tmp_path)
    assert set(got) == {"SR"}
    sr = got["SR"]
    referenced = {str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                  for item in _walk(sr.ContentSequence) if "ReferencedSOPSequence" in item}
    assert referenced >= {str(d.SOPInstanceUID) for d in series}
    volumes = [float(m.MeasuredValueSequence[0].NumericValue) for m in _walk(sr.ContentSequence)
               if "MeasuredValueSequence" in m]
    assert volumes and volumes[0] == pytest.approx(
        float(labels.sum()) * 3.0 * 1.5 * 1.5 / 1000.0, rel=1e-3)


def _walk(seq: Any) -> list[Dataset]:
    out = []
    for item in seq:
        out.append(item)
        if "ContentSequence" in item:
            out.extend(_walk(item.ContentSequence))
    return out


def test_an_invalid_object_is_refused_by_the_gate_naming_attributes_not_values(
    tmp_path: Path,
) -> None:
    study = abdomen_ct_study(25)
    ds = study.datasets[0]
    ds.PatientBirthDate = "13.04.1937"
    ds.StudyTime = "25:99"
    del ds.Modality  # Type 1
    with pytest.raises(InputError) as caught:
        _validated("SR", ds)
    message = str(caught.value)
    assert "PatientBirthDate (0010,0030)" in message and "StudyTime (0008,0030)" in message
    assert "1937" not in message and "25:99" not in message
    # the raw dciodvfy output did quote them: the gate is what removes them
    raw = dciodvfy_errors(_saved(ds, tmp_path / "bad.dcm"))
    assert any("13.04.1937" in line for line in raw)


def test_result_header_refuses_what_no_result_can_refer_to() -> None:
    series, _ = _flair(26)
    series[0].SOPInstanceUID = "1.2.840.ZQX7"
    with pytest.raises(InputError, match=r"SOPInstanceUID is missing or not a valid UID") as e:
        result_header(series[0])
    assert "ZQX7" not in str(e.value)
