"""De-identified DICOM for a retraining set: dicognito, configured for PS3.15 Annex E.

dicognito walks every element of a dataset, sequences and file meta included, and acts
by VR and keyword: every person name (PN) replaced, every ID-like attribute (Patient ID,
Accession Number, Study ID, order numbers), addresses and institution replaced, every
date and time (DA, DT and the matching TM) shifted, every UID (UI) except class UIDs and
the Transfer Syntax replaced. We put our own handlers in front of its pipeline
(``Anonymizer.add_element_handler``) so that the result is the Basic Application Level
Confidentiality Profile (PS3.15 E.2, Table E.1-1) with two options, and so that the
DICOM agrees with the event tables of the same export:

- UIDs go through the export's ``Pseudonymiser.uid`` (registry UIDs kept), so the
  de-identified SEG still references its de-identified source images and the tables'
  study, series and SOP Instance UIDs are the ones in the files;
- Retain Longitudinal Temporal Information with Modified Dates (E.3.6): dicognito's own
  ``DateTimeAnonymizer`` with the *patient's* offset from the export (whole days), so
  every date of a patient moves as the tables' dates do;
- Clean Descriptors (E.3.5): descriptions kept, cleaned of UIDs, paths and every
  identifying value known from the object and the log;
- Patient ID and Patient's Name become the export's patient pseudonym, a content
  creator (the reader who corrected a mask) the reader's export pseudonym;
- removed (X), emptied (Z, type-2 attributes) or a dummy (D, the device serial number,
  type 1 in a SEG's Enhanced General Equipment): private attributes, institution,
  station, device serial number, AE titles, patient age, sex, size, weight, birth date
  and the other patient characteristics, comments and the request attributes;
- Patient Identity Removed = YES, Longitudinal Temporal Information Modified =
  MODIFIED, and the De-identification Method Code Sequence (CID 7050: 113100, 113105,
  113107) say what was done (PS3.3 C.7.1.1).

Burned-in annotations are not looked for: the reference pipelines' inputs are
cross-sectional MR/CT and radiographs whose Burned In Annotation is NO.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pydicom
from dicognito.anonymizer import Anonymizer
from dicognito.datetimeanonymizer import DateTimeAnonymizer
from dicognito.element_anonymizer import ElementAnonymizer
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from events.deidentify import Deidentifier

#: PS3.15 Table E.1-1 attributes the basic profile removes (X) that dicognito keeps.
REMOVE = frozenset({
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "InstitutionCodeSequence", "StationName", "DeviceUID",
    "SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
    "ReceivingApplicationEntityTitle", "RetrieveAETitle", "StationAETitle",
    "ScheduledStationAETitle", "PerformedStationAETitle", "PerformedLocation",
    "PatientAge", "PatientSize", "PatientWeight", "EthnicGroup", "Occupation",
    "AdditionalPatientHistory", "PatientComments", "StudyComments", "MedicalAlerts",
    "Allergies", "SmokingStatus", "PregnancyStatus", "LastMenstrualDate", "PatientState",
    "SpecialNeeds", "PatientBirthTime", "PatientBirthName", "PatientMotherBirthName",
    "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
    "ReferencedPatientSequence", "RequestAttributesSequence", "PatientAddress",
    "CountryOfResidence", "RegionOfResidence", "PatientTelephoneNumbers",
    "MilitaryRank", "BranchOfService", "ResponsiblePerson", "ResponsibleOrganization",
    "IssuerOfPatientID", "InstanceCreatorUID", "TimezoneOffsetFromUTC",
    "AcquisitionComments", "InterpretationText", "TextComments", "TextString",
})
#: Type-2 attributes of the Patient module: present, empty (PS3.15 action Z).
EMPTY = frozenset({"PatientSex", "PatientBirthDate"})
#: Type-1 where they occur (Enhanced General Equipment): a dummy value (action D).
DUMMY = {"DeviceSerialNumber": "DEIDENTIFIED"}
#: Descriptors kept under the Clean Descriptors option, cleaned.
DESCRIPTORS = frozenset({
    "StudyDescription", "SeriesDescription", "ProtocolName", "ImageComments",
    "PerformedProcedureStepDescription", "RequestedProcedureDescription",
    "ContentDescription", "DerivationDescription", "ContentLabel", "BodyPartExamined",
    "SegmentDescription", "SeriesDescriptionCodeSequence",
})
#: CID 7050 codes for what this export does (PS3.16).
METHOD_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113105", "Clean Descriptors Option"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
)
METHOD = "PS3.15 E basic profile, 113105, 113107 (dicognito)"

# values of these attributes are identifying text to clean out of descriptors
_IDENTIFYING = ("PatientName", "PatientID", "AccessionNumber", "InstitutionName",
                "StationName", "ReferringPhysicianName", "OperatorsName", "StudyID",
                "PerformingPhysicianName", "ContentCreatorName", "DeviceSerialNumber",
                "InstitutionAddress", "InstitutionalDepartmentName")


@dataclass
class DicomActions:
    """Counts of what the handlers did, by keyword (the export's manifest)."""

    removed: Counter[str] = field(default_factory=Counter)
    emptied: Counter[str] = field(default_factory=Counter)  # and dummies
    cleaned: Counter[str] = field(default_factory=Counter)
    remapped_uids: int = 0


def identifying_values(ds: Dataset) -> set[str]:
    """Identifying strings of ``ds`` (names and their parts, IDs, places), so that a
    descriptor repeating one of them can be cleaned."""
    found: set[str] = set()

    def visit(d: Dataset, el: DataElement) -> None:
        if el.keyword in _IDENTIFYING or el.VR == "PN":
            for v in el.value if isinstance(el.value, pydicom.multival.MultiValue) else [
                    el.value]:
                text = str(v or "").strip()
                found.add(text)
                found.update(re.split(r"[\^= ]+", text))

    ds.walk(visit)
    return {v for v in found if len(v) >= 3}


class _LastmileHandler(ElementAnonymizer):
    """Our decisions, run before dicognito's own (see the module docstring)."""

    def __init__(self, deid: Deidentifier, patient: str, known: set[str],
                 actions: DicomActions) -> None:
        self.deid, self.patient, self.actions = deid, patient, actions
        alts = sorted(known | self.deid.context.known_values, key=len, reverse=True)
        self._known = re.compile("|".join(re.escape(v) for v in alts)) if alts else None

    def clean(self, text: str) -> str:
        text = self.deid.clean_text(text)
        return self._known.sub("", text).strip() if self._known is not None else text

    def __call__(self, dataset: Dataset, el: DataElement) -> bool:
        kw = el.keyword
        if el.tag.is_private or kw in REMOVE:
            del dataset[el.tag]
            self.actions.removed[kw or "private"] += 1
            return True
        if kw in EMPTY:
            el.value = ""
            self.actions.emptied[kw] += 1
            return True
        if kw in DUMMY:
            el.value = DUMMY[kw]
            self.actions.emptied[kw] += 1
            return True
        if kw in ("PatientID", "PatientName"):
            el.value = self.patient
            return True
        if kw == "ContentCreatorName" and el.value:
            el.value = self.deid.pseudo.person(str(el.value).strip("^ "))
            return True
        if el.VR == "UI":
            if el.value:
                values = el.value if isinstance(el.value, pydicom.multival.MultiValue) else [
                    el.value]
                new = [self.deid.pseudo.uid(str(v)) for v in values]
                el.value = new if len(new) > 1 else new[0]
                self.actions.remapped_uids += len(new)
            return True
        if kw in DESCRIPTORS and el.VR != "SQ" and isinstance(el.value, str):
            cleaned = self.clean(el.value)
            if cleaned != el.value:
                self.actions.cleaned[kw] += 1
            el.value = cleaned
            return True
        return False

    def describe_actions(self) -> Iterator[str]:
        yield "Remove private attributes and " + ", ".join(sorted(REMOVE))
        yield "Empty " + ", ".join(sorted(EMPTY)) + "; dummy " + ", ".join(sorted(DUMMY))
        yield "Patient ID and Patient's Name: the export's patient pseudonym"
        yield "UIDs: the export's keyed 2.25 UIDs, registry UIDs kept"
        yield "Clean " + ", ".join(sorted(DESCRIPTORS))


def deidentify_dataset(ds: Dataset, deid: Deidentifier, study_uid: str, *,
                       seed: str, actions: DicomActions | None = None) -> Dataset:
    """De-identify ``ds`` in place (and return it) as the export does for ``study_uid``:
    the patient's pseudonym and date shift come from ``deid``; dicognito's own fake
    values (names of other people, accession numbers) are seeded by ``seed`` and the
    study so that two exports give the same bytes."""
    actions = actions if actions is not None else DicomActions()
    patient = deid.patient_for_study(study_uid) or deid.pseudo.patient(study_uid)
    days = deid.shift_for_study(study_uid)
    anonymizer = Anonymizer(seed=f"{seed}\x1f{patient}")
    anonymizer.add_element_handler(DateTimeAnonymizer(days * 24))
    anonymizer.add_element_handler(_LastmileHandler(deid, patient, identifying_values(ds),
                                                    actions))
    anonymizer.anonymize(ds)
    ds.PatientIdentityRemoved = "YES"
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    methods = ds.get("DeidentificationMethod", [])
    methods = list(methods) if isinstance(methods, pydicom.multival.MultiValue) else (
        [methods] if methods else [])
    ds.DeidentificationMethod = [METHOD, *[m for m in methods if m != METHOD]]
    codes = Sequence()
    for value, meaning in METHOD_CODES:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = codes
    return ds
