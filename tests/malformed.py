"""Datasets whose every text attribute is malformed around one marker (issue 18 #2).

A test that sends such a dataset then searches events, logs, the read model and exports
for ``MARKER``: no DICOM value may reach them through an error message (reasons are our
words plus the attribute's keyword and tag).
"""

from __future__ import annotations

import pydicom
from pydicom.dataset import Dataset

MARKER = "ZQX7"
TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM",
            "UC", "UT"}
#: what routing, selection and the contract read: left valid so the run reaches its end
KEEP = {"Modality", "SeriesDescription", "PhotometricInterpretation", "BodyPartExamined",
        "SpecificCharacterSet", "ImagerPixelSpacing", "PixelSpacing", "InstanceNumber",
        "SeriesNumber", "ImageType", "PresentationIntentType", "PatientID",
        "IssuerOfPatientID"}


def malformed(ds: Dataset) -> None:
    """Every text attribute not needed to route the study: malformed around MARKER
    (call inside ``pydicom.config.disable_value_validation()``: the sender's side)."""
    for elem in list(ds):
        if elem.VR not in TEXT_VRS or elem.keyword in KEEP or elem.tag.group == 0x0002:
            continue
        if elem.VR == "DA":
            value = f"13.{MARKER}.1937"
        elif elem.VR == "TM":
            value = f"25:{MARKER}"
        elif elem.VR in ("DS", "IS"):
            value = f"{MARKER}.5"
        elif elem.VR == "CS":
            value = f"{MARKER.lower()} x"
        else:
            value = f"{MARKER}\\{MARKER}" if elem.VR in ("AS", "AE") else f"{MARKER}-{'x' * 70}"
        ds[elem.tag] = pydicom.DataElement(elem.tag, elem.VR, value)
