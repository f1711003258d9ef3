"""De-identified DICOM (dicognito + our PS3.15 handlers) on a real CT from pydicom's test
files: what is removed, kept, remapped and shifted, and that it agrees with the events."""

from __future__ import annotations

import io
from datetime import date, timedelta

import pydicom
from pydicom.data import get_testdata_file

from events.catalogue import InstanceStored
from events.deidentify import Deidentifier, LogContext, Pseudonymiser
from retraining.dicom_deid import DicomActions, deidentify_dataset

KEY = b"k" * 32


def _ct() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def _deid(study_uid: str) -> Deidentifier:
    stored = InstanceStored.new(
        actor="CT01_OC0", study_uid=study_uid, sop_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_uid="1.2.3", transfer_syntax_uid=
        "1.2.840.10008.1.2.1", sha256="0" * 64, size_bytes=1, store_key="x", calling_ae="CT01",
        called_ae="LM_LTS", patient_pseudonym="site-pseudonym-of-1CT1")
    return Deidentifier(Pseudonymiser(KEY), LogContext.of([(1, stored)]))


def _original_values(ds: pydicom.Dataset) -> set[str]:
    found: set[str] = set()
    ds.walk(lambda _, el: found.add(str(el.value)) if el.VR in (
        "PN", "UI", "DA", "LO", "SH") and len(str(el.value)) >= 4 else None)
    return found


def test_ct_is_deidentified_as_the_profile_says_and_as_the_events_are() -> None:
    ds = _ct()
    original = _original_values(ds)
    study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
    deid = _deid(study)
    actions = DicomActions()
    out = deidentify_dataset(ds, deid, study, seed="s", actions=actions)
    # identity: the export's pseudonym, the export's UIDs (the ones its tables carry)
    patient = deid.patient_for_study(study)
    assert patient is not None and out.PatientID == patient and str(out.PatientName) == patient
    assert out.StudyInstanceUID == deid.pseudo.uid(study) and out.SOPInstanceUID == (
        deid.pseudo.uid(sop))
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    # what the object is: registry UIDs kept
    assert out.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert out.file_meta.TransferSyntaxUID == _ct().file_meta.TransferSyntaxUID
    # removed: places, private attributes; emptied: type-2 patient characteristics
    for gone in ("InstitutionName", "StationName", "TimezoneOffsetFromUTC", "InstanceCreatorUID"):
        assert gone not in out, gone
    assert not any(el.tag.is_private for el in out)
    assert actions.removed["private"] > 10 and actions.removed["InstitutionName"] == 1
    # dates: the patient's shift, the same as the events'; times of day kept
    days = deid.shift_for_study(study)
    assert out.StudyDate == (date(2004, 1, 19) + timedelta(days=days)).strftime("%Y%m%d")
    assert out.SeriesDate == (date(1997, 4, 30) + timedelta(days=days)).strftime("%Y%m%d")
    assert out.StudyTime == "072730"
    assert out.PatientIdentityRemoved == "YES"
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == [
        "113100", "113105", "113107"]
    # nothing of the original's identifying values is left in the written bytes
    buf = io.BytesIO()
    out.save_as(buf, enforce_file_format=True)
    header = buf.getvalue().split(b"\xe0\x7f\x10\x00")[0].decode("latin-1")
    left = {v for v in original if v in header and not v.startswith("1.2.840.10008")}
    assert left <= {"GE MEDICAL SYSTEMS", "RHAPSODE", "ISOVUE300/100", "STANDARD",
                    "LARGE BOWTIE FIL"}, left  # manufacturer, model, contrast, kernel


def test_the_same_key_gives_the_same_bytes() -> None:
    ds1, ds2 = _ct(), _ct()
    study = str(ds1.StudyInstanceUID)
    a = deidentify_dataset(ds1, _deid(study), study, seed="s")
    b = deidentify_dataset(ds2, _deid(study), study, seed="s")
    assert a == b
    c = deidentify_dataset(_ct(), Deidentifier(Pseudonymiser(b"z" * 32)), study, seed="t")
    assert c.StudyInstanceUID != a.StudyInstanceUID and c.PatientID != a.PatientID
