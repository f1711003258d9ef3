"""SEG and SR objects built directly: dciodvfy-clean, provenance inside, stable UIDs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from demo.phantoms import abdomen_ct_study, brain_mr_study, pelvis_study
from engine.dicom_results import (
    HipFinding,
    Provenance,
    SegmentMeasurement,
    build_findings_sr,
    build_seg,
    build_volume_sr,
)
from engine.ops.volume import series_to_volume
from engine.spec import REFERENCE_DIR, load_pipeline
from tests.engine.conftest import dciodvfy_errors

PROV = Provenance("unit-model", "2.1", "ab" * 32, "bts", "1.0.0", "run-unit")


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_empty_mask_still_gives_a_valid_seg(tmp_path: Path) -> None:
    study = brain_mr_study(11)
    vol = series_to_volume([d for d in study.datasets if d.SeriesDescription == "AX T2 FLAIR"])
    seg = build_seg(vol.sources, np.zeros(vol.array.shape, np.uint8), {1: "lesion"}, PROV,
                    series_description="AI lesion")
    assert dciodvfy_errors(_save(seg, tmp_path / "seg.dcm")) == []
    sr = build_volume_sr(seg, vol.sources, [SegmentMeasurement(1, "lesion", 0.0)], PROV)
    assert dciodvfy_errors(_save(sr, tmp_path / "sr.dcm")) == []


def test_multi_label_seg_round_trips_the_label_map(tmp_path: Path) -> None:
    study = abdomen_ct_study(12)
    vol = series_to_volume(study.datasets)
    names = {1: "left_lobe", 2: "right_lobe", 3: "vessels"}
    seg = build_seg(vol.sources, study.labels, names, PROV, series_description="AI liver x")
    path = _save(seg, tmp_path / "seg.dcm")
    assert dciodvfy_errors(path) == []
    back = pydicom.dcmread(path)
    assert back.SeriesDescription == "AI liver x"
    assert back.ContentCreatorName if "ContentCreatorName" in back else True
    # every frame's segment and position maps back onto the source label map
    import highdicom as hd

    seg_obj = hd.seg.segread(path)
    for number, value in ((1, 1), (2, 2), (3, 3)):
        mask = seg_obj.get_pixels_by_source_instance(
            source_sop_instance_uids=[str(d.SOPInstanceUID) for d in vol.sources],
            segment_numbers=[number], ignore_spatial_locations=True)[..., 0]
        assert np.array_equal(mask.astype(bool), study.labels == value)


def test_same_run_key_gives_the_same_uids_different_key_different() -> None:
    study = brain_mr_study(13)
    vol = series_to_volume([d for d in study.datasets if d.SeriesDescription == "AX T2 FLAIR"])
    a = build_seg(vol.sources, study.labels, {1: "lesion"}, PROV, series_description="x")
    b = build_seg(vol.sources, study.labels, {1: "lesion"}, PROV, series_description="x")
    other = Provenance(**{**PROV.__dict__, "run_key": "other"})
    c = build_seg(vol.sources, study.labels, {1: "lesion"}, other, series_description="x")
    assert a.SOPInstanceUID == b.SOPInstanceUID != c.SOPInstanceUID
    assert a.SeriesInstanceUID == b.SeriesInstanceUID


def test_findings_sr_for_dx_images(tmp_path: Path) -> None:
    study = pelvis_study(14, images=2, size=256, modality="DX")
    findings = [HipFinding(study.datasets[i], side, cls, 0.9, (10.0, 20.0, 60.0, 90.0))
                for i in range(2) for side, cls in (("right", "normal"), ("left", "hardware"))]
    hfd = load_pipeline(REFERENCE_DIR / "hfd.yaml", check_model=False)
    sr = build_findings_sr(findings, PROV, finding="hip", codebook=hfd.spec.codes)
    path = _save(sr, tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    text = str(pydicom.dcmread(path).ContentSequence)
    assert "Orthopedic device" in text and "16349000" in text  # SNOMED CT, from hfd.yaml
    assert "Hip joint" in text and "122157" in text  # finding type; DCM Probability
    assert ("model_sha256=" + "ab" * 32).encode() in path.read_bytes()


def test_seg_refuses_mismatched_sources() -> None:
    study = brain_mr_study(15)
    vol = series_to_volume([d for d in study.datasets if d.SeriesDescription == "AX T2 FLAIR"])
    with pytest.raises(ValueError, match="mask slices"):
        build_seg(vol.sources[:-1], study.labels, {1: "lesion"}, PROV, series_description="x")
