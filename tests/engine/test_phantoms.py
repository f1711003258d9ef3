"""Phantoms: plausible DICOM with fake identities (for pseudonymisation tests), known truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from demo.phantoms import (
    HIP_CLASSES,
    abdomen_ct_study,
    brain_mr_study,
    fake_patient,
    pelvis_study,
)
from engine.feed import stored_events


def test_same_seed_same_study_and_truth() -> None:
    a, b = brain_mr_study(42), brain_mr_study(42)
    assert a.study_uid == b.study_uid
    assert np.array_equal(a.labels, b.labels)  # type: ignore[arg-type]
    assert [d.SOPInstanceUID for d in a.datasets] == [d.SOPInstanceUID for d in b.datasets]
    assert brain_mr_study(43).study_uid != a.study_uid


def test_files_carry_fake_identity_and_plausible_tags(tmp_path: Path) -> None:
    study = abdomen_ct_study(5)
    paths = study.write(tmp_path)
    ds = pydicom.dcmread(paths[0])
    assert ds.PatientID.startswith("FAKE") and "^" in str(ds.PatientName)
    assert len(ds.PatientBirthDate) == 8 and ds.PatientAge.endswith("Y")
    assert ds.Modality == "CT" and ds.RescaleIntercept == -1024 and ds.BodyPartExamined
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    cr = pelvis_study(5, images=2, size=128)
    assert {d.Modality for d in cr.datasets} == {"CR"} and cr.datasets[0].ImagerPixelSpacing
    assert all(h.classification in HIP_CLASSES for pair in cr.hips for h in pair)


def test_store_events_use_pseudonyms_never_identity(tmp_path: Path) -> None:
    study = brain_mr_study(6, patient=fake_patient(77))
    evs = stored_events(study.datasets[:3], tmp_path, b"s" * 32, called_ae="LM_BTS")
    assert len({e.patient_pseudonym for e in evs}) == 1
    text = " ".join(repr(e) for e in evs)
    assert study.patient.patient_id not in text and study.patient.birth_date not in text
    assert evs[0].age_band is not None and (tmp_path / evs[0].store_key).is_file()
