"""The rule language: typed conditions on DICOM tags, never ``eval``, and their evaluation.

Conditions: ``equals``, ``one_of``, ``regex`` (``re.search``), ``range`` (``min``/``max``,
numeric), ``exists`` (true/false) on a tag given by keyword (``Modality``) or number
(``(0008,0060)``, ``00080060``); combined with ``all``, ``any`` and ``not``. A multi-valued
element matches when any of its values does. Everything here is pure: ``evaluate`` takes
values and returns values. Routing (``ingest.rules``) and pipeline selection use it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

#: Tag values as the rules see them: keyword -> values (as strings). A tag that is
#: absent from the mapping is absent from the dataset.
TagValues = Mapping[str, tuple[str, ...]]

#: Identity tags: rules may test them, but their values never appear in a reason
#: (reasons are recorded in events, and events never carry patient identity).
IDENTITY_TAGS = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "OtherPatientIDs",
    "OtherPatientNames", "OtherPatientIDsSequence", "PatientAddress", "PatientTelephoneNumbers",
    "PatientMotherBirthName", "IssuerOfPatientID", "AccessionNumber", "ReferringPhysicianName",
    "PerformingPhysicianName", "OperatorsName", "PatientComments", "MilitaryRank",
    "EthnicGroup", "PatientReligiousPreference", "MedicalRecordLocator",
})

#: Tags a series manifest may use: what ``ingest.instance.stored`` events carry.
SERIES_TAGS = frozenset({
    "Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID", "Manufacturer",
    "ManufacturerModelName", "StationName", "InstitutionName",
})


@dataclass(frozen=True)
class Equals:
    tag: str
    value: str


@dataclass(frozen=True)
class OneOf:
    tag: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class Regex:
    tag: str
    pattern: re.Pattern[str]


@dataclass(frozen=True)
class Range:
    tag: str
    min: float | None
    max: float | None


@dataclass(frozen=True)
class Exists:
    tag: str
    present: bool


@dataclass(frozen=True)
class AllOf:
    items: tuple[Condition, ...]


@dataclass(frozen=True)
class AnyOf:
    items: tuple[Condition, ...]


@dataclass(frozen=True)
class Not:
    item: Condition


Condition = Equals | OneOf | Regex | Range | Exists | AllOf | AnyOf | Not


def _shown(tag: str, values: tuple[str, ...] | None, show: bool = True) -> str:
    if values is None:
        return f"{tag} absent"
    if not show:
        return tag
    if tag in IDENTITY_TAGS:
        return f"{tag}=<identity, not shown>"
    text = "\\".join(values)
    return f"{tag}={text[:64]!r}"


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def evaluate(cond: Condition, tags: TagValues, *, show_values: bool = True
             ) -> tuple[bool, str]:
    """Whether ``cond`` holds for ``tags``, and a short human reason (for events and CLI).

    On identity tags neither the value nor the rule's operand appears in the reason.
    With ``show_values=False`` no value of ``tags`` appears at all: the reason is the
    keyword, the rule's own operand and our words ("ContrastBolusAgent absent",
    "SequenceName !~ /tse/"), as series selection records in its audit.
    """
    tag = getattr(cond, "tag", None)
    if tag in IDENTITY_TAGS:
        ok, _ = _evaluate(cond, tags, show_values)
        return ok, f"{tag} {'matches' if ok else 'does not match'} (identity: not shown)"
    return _evaluate(cond, tags, show_values)


def _evaluate(cond: Condition, tags: TagValues, show: bool = True) -> tuple[bool, str]:
    match cond:
        case Equals(tag, value):
            vals = tags.get(tag)
            ok = vals is not None and any(v == value for v in vals)
            return ok, f"{_shown(tag, vals, show)} {'==' if ok else '!='} {value!r}"
        case OneOf(tag, values):
            vals = tags.get(tag)
            ok = vals is not None and any(v in values for v in vals)
            return ok, f"{_shown(tag, vals, show)} {'in' if ok else 'not in'} {list(values)}"
        case Regex(tag, pattern):
            vals = tags.get(tag)
            ok = vals is not None and any(pattern.search(v) for v in vals)
            return ok, f"{_shown(tag, vals, show)} {'~' if ok else '!~'} /{pattern.pattern}/"
        case Range(tag, lo, hi):
            vals = tags.get(tag)
            nums = [n for n in (_number(v) for v in vals or ()) if n is not None]
            ok = any((lo is None or n >= lo) and (hi is None or n <= hi) for n in nums)
            return ok, f"{_shown(tag, vals, show)} {'in' if ok else 'not in'} [{lo}, {hi}]"
        case Exists(tag, present):
            ok = (tag in tags) == present
            return ok, f"{tag} {'present' if tag in tags else 'absent'}"
        case AllOf(items):
            reasons = []
            for item in items:
                ok, why = evaluate(item, tags, show_values=show)
                reasons.append(why)
                if not ok:
                    return False, why
            return True, " and ".join(reasons)
        case AnyOf(items):
            misses = []
            for item in items:
                ok, why = evaluate(item, tags, show_values=show)
                if ok:
                    return True, why
                misses.append(why)
            return False, "none of: " + "; ".join(misses)
        case Not(item):
            ok, why = evaluate(item, tags, show_values=show)
            return (not ok), f"not ({why})"
    raise TypeError(f"not a condition: {cond!r}")  # pragma: no cover - exhaustive


def condition_tags(cond: Condition) -> frozenset[str]:
    """Every tag a condition reads (so the SCP extracts only those)."""
    match cond:
        case AllOf(items) | AnyOf(items):
            out: frozenset[str] = frozenset()
            for item in items:
                out |= condition_tags(item)
            return out
        case Not(item):
            return condition_tags(item)
        case Equals(tag) | OneOf(tag) | Regex(tag) | Range(tag) | Exists(tag):
            return frozenset({tag})
    raise TypeError(f"not a condition: {cond!r}")  # pragma: no cover
