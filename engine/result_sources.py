"""Source headers a result may copy: every copied value conformant, or left out.

highdicom builds a SEG or SR by copying the Patient, General Study and Patient Study
modules of its source image (PS3.3 C.7.1.1, C.7.2.1, C.7.2.2). Real studies break that
copy in three ways: a Type 2 attribute is absent (a de-identified GE MR study lacks
PatientBirthDate, PatientSex, AccessionNumber, StudyDate and StudyTime), a value is not
valid for its VR (``13.04.1937`` as a DA, ``X1`` as PatientSex), or a Type 1C attribute
the result needs is empty (SliceThickness in Pixel Measures). Each made the writer raise
an exception that quoted the value, on input that cannot change.

``result_header`` returns a header-only copy (no pixel data) of a source dataset in
which every top-level value the result copies is valid for its VR (pydicom's validators,
PS3.5 6.2): old date and time forms are normalised (``events.dicom_dates``), PatientSex
is one of M/F/O, a person name without a caret gets one (PS3.5 6.2.1.1: a lone family
name), and what cannot be repaired is emptied when the attribute is Type 2 and left
out when it is Type 3. Absent Type 2 attributes are added empty. The source itself is
never modified. ``Repair`` records what was changed, by attribute keyword and tag only.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import VALIDATORS

from engine.errors import InputError
from events.dicom_dates import DicomValueError, normalise_da, normalise_tm, parse_dt

#: Type 2 attributes of the Patient and General Study modules that highdicom reads
#: unconditionally (``src.PatientBirthDate``): absent, they are added empty.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                "AccessionNumber")
#: Needed to write any result at all (PS3.3 Type 1): missing or invalid is a refusal.
REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_PIXEL_TAGS = {Tag(0x7FE0, 0x0010), Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009)}
_NO_CHECK_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "US", "SS", "UL", "SL",
                 "FL", "FD", "AT", "UV", "SV"}


def tag_text(tag: int | BaseTag) -> str:
    """``(0010,0030)``."""
    t = Tag(tag)
    return f"({t.group:04X},{t.element:04X})"


def name_of(tag: int | BaseTag) -> str:
    """``PatientBirthDate (0010,0030)`` (keyword and tag, never a value)."""
    return f"{keyword_for_tag(Tag(tag)) or 'private attribute'} {tag_text(tag)}"


@dataclass
class Repair:
    """What ``result_header`` changed, by attribute (keyword + tag), never by value."""

    normalised: set[str] = field(default_factory=set)
    emptied: set[str] = field(default_factory=set)
    dropped: set[str] = field(default_factory=set)
    added: set[str] = field(default_factory=set)
    measured: set[str] = field(default_factory=set)

    def merge(self, other: Repair) -> None:
        self.normalised |= other.normalised
        self.emptied |= other.emptied
        self.dropped |= other.dropped
        self.added |= other.added
        self.measured |= other.measured

    def summary(self) -> str:
        parts = []
        for what, names in (("normalised", self.normalised), ("emptied", self.emptied),
                            ("left out", self.dropped), ("added empty", self.added),
                            ("taken from the measured spacing", self.measured)):
            if names:
                parts.append(f"{what}: {', '.join(sorted(names))}")
        return "; ".join(parts)

    def __bool__(self) -> bool:
        return bool(self.normalised or self.emptied or self.dropped or self.added
                    or self.measured)


def _valid(vr: str, value: object) -> bool:
    validator = VALIDATORS.get(vr)
    if validator is None:
        return True
    values: Iterable[object] = value if isinstance(value, list | MultiValue) else [value]
    if vr in ("DS", "IS", "PN"):  # parsed values: validate the text they came from
        values = [v if isinstance(v, str) or v is None else str(v) for v in values]
    return all(v is None or v == "" or validator(vr, v)[0] for v in values)


def _repaired(keyword: str, vr: str, value: object) -> object | None:
    """A conformant equivalent of ``value``, or None when there is none."""
    try:
        if vr == "DA":
            return normalise_da(value, keyword)
        if vr == "TM":
            return normalise_tm(value, keyword)
        if vr == "DT":
            parsed = parse_dt(value, keyword)
            return None if parsed is None else parsed.strftime("%Y%m%d%H%M%S")
    except DicomValueError:
        return None
    if keyword == "PatientSex":
        text = str(value).strip().upper()
        return {"M": "M", "F": "F", "O": "O", "MALE": "M", "FEMALE": "F",
                "OTHER": "O"}.get(text)
    if vr in ("CS", "SH", "LO", "AE") and isinstance(value, str):
        text = value.strip()
        if vr == "CS":
            text = text.upper().replace("-", "_").replace(" ", "_")
        return text if _valid(vr, text) else None
    return None


def _copy_valid(src: Dataset, out: Dataset, repair: Repair, *, nested: bool = False
                ) -> bool:
    """Copy ``src``'s elements into ``out``, each valid for its VR or repaired, emptied
    (Type 2) or left out. Sequence items are cleaned the same way, recursively, except
    that an item with a value that cannot be repaired is left out whole (its module's
    attribute types are not known here). Returns False when ``nested`` and such a value
    was found."""
    for elem in src:
        if elem.tag in _PIXEL_TAGS:
            continue
        if elem.VR == "SQ" and not elem.tag.is_private and elem.value:
            items = []
            for item in elem.value:
                clean = Dataset()
                if _copy_valid(item, clean, repair, nested=True):
                    items.append(clean)
            if items:
                out[elem.tag] = DataElement(elem.tag, "SQ", items)
            if len(items) < len(elem.value):
                repair.dropped.add(f"items of {name_of(elem.tag)}")
            continue
        if (elem.VR in _NO_CHECK_VRS or elem.tag.is_private or elem.is_empty
                or elem.tag.group == 0x0002):
            out.add(copy.deepcopy(elem))
            continue
        keyword = elem.keyword or "private"
        value = elem.value
        # decided before copying: creating an element with an invalid value makes
        # pydicom warn, quoting the value
        if _valid(elem.VR, value) and (keyword != "PatientSex" or str(value) in ("M", "F", "O")):
            if elem.VR == "PN" and "^" not in str(value) and "=" not in str(value):
                out[elem.tag] = DataElement(elem.tag, "PN", f"{value}^")
            else:
                out.add(copy.deepcopy(elem))
            continue
        fixed = _repaired(keyword, elem.VR, value)
        if fixed is not None and _valid(elem.VR, fixed):
            out[elem.tag] = DataElement(elem.tag, elem.VR, fixed)
            repair.normalised.add(name_of(elem.tag))
        elif nested:
            return False
        elif keyword in TYPE2_COPIED:
            out[elem.tag] = DataElement(elem.tag, elem.VR, None)
            repair.emptied.add(name_of(elem.tag))
        else:
            repair.dropped.add(name_of(elem.tag))
    return True


def result_header(ds: Dataset, *, slice_thickness_mm: float | None = None
                  ) -> tuple[Dataset, Repair]:
    """A header-only copy of ``ds`` that a SEG/SR writer may copy from (module doc).

    ``slice_thickness_mm``: the measured slice spacing, written as SliceThickness
    when the source lacks a usable one (PS3.3 C.7.6.2: Type 2 in the Image Plane
    module, but Type 1C in the result's Pixel Measures). Raises ``InputError`` naming
    the attribute when one of ``REQUIRED`` is missing or not a UID.
    """
    repair = Repair()
    for keyword in REQUIRED:  # checked before anything is copied (a copy re-validates)
        value = ds.get(keyword)
        if not value or not _valid("UI", str(value)):
            raise InputError(f"{keyword} is missing or not a valid UID: no result can "
                             "refer to this instance")
    out = Dataset()
    if hasattr(ds, "file_meta"):
        out.file_meta = copy.deepcopy(ds.file_meta)
    _copy_valid(ds, out, repair)
    for keyword in TYPE2_COPIED:
        if keyword not in out:
            setattr(out, keyword, None)
            repair.added.add(name_of(Tag(keyword)))
    if slice_thickness_mm is not None:
        thickness = out.get("SliceThickness")
        try:
            usable = thickness not in (None, "") and float(thickness) > 0  # type: ignore[arg-type]
        except (TypeError, ValueError):
            usable = False
        if not usable:
            out.SliceThickness = round(float(slice_thickness_mm), 6)
            repair.measured.add(name_of(Tag("SliceThickness")))
    return out, repair
