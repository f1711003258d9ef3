"""DICOM dates and times as values, not strings (PS3.5 6.2: DA, TM, DT).

Archives still hold dates in forms older than PS3.5: ACR-NEMA's ``1937.04.13`` and
``13:04:05``, and the local ``13.04.1937`` that some modalities write. Comparing such
strings orders exams wrongly (``13.04.1937`` sorts after ``20260301``). Here each form
is parsed to a ``datetime.date`` / ``time`` / ``datetime`` when it is unambiguous, and
refused otherwise with a ``DicomValueError`` whose message names the attribute and the
form, never the value (it may be a patient's birth date).

Accepted (besides the standard forms):

- DA: ``YYYY.MM.DD`` (ACR-NEMA 2.0), ``YYYY-MM-DD``, ``DD.MM.YYYY`` (day first: the
  dotted form is day-month-year wherever it is written), ``DD/MM/YYYY`` or
  ``MM/DD/YYYY`` only where one of the first two fields is above 12.
- TM: ``HH:MM[:SS[.F]]`` (ACR-NEMA), and the standard's partial ``HH``, ``HHMM``.
- DT: ``YYYYMMDD[HH[MM[SS[.F]]]][&ZZXX]``; the offset is dropped (local time compares
  with local time).

Who calls it: the engine (longitudinal ordering, the dates it copies into results) and
ingest (to record ``study_date`` as ``YYYYMMDD`` or not at all). Pure, standard library
only, so any layer may import it.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time

__all__ = [
    "DicomValueError",
    "format_da",
    "format_tm",
    "normalise_da",
    "normalise_tm",
    "parse_da",
    "parse_dt",
    "parse_tm",
]


class DicomValueError(ValueError):
    """A DA/TM/DT value that cannot be read. The message names the attribute, not the value."""

    def __init__(self, keyword: str, vr: str, why: str) -> None:
        self.keyword, self.vr, self.why = keyword, vr, why
        super().__init__(f"{keyword} is not a valid {vr} value: {why}")


_DA_STANDARD = re.compile(r"(\d{4})(\d{2})(\d{2})")
_DA_YMD = re.compile(r"(\d{4})[.\-](\d{1,2})[.\-](\d{1,2})")
_DA_DMY_DOT = re.compile(r"(\d{1,2})\.(\d{1,2})\.(\d{4})")
_DA_SLASH = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4})")
_TM_STANDARD = re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?")
_TM_COLON = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?")
_DT = re.compile(r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})"
                 r"(?:\.(\d{1,6}))?)?)?)?)?)?([+\-]\d{4})?")


def _text(value: object) -> str:
    return ("" if value is None else str(value)).strip().strip("\x00").strip()


def _date(y: int, m: int, d: int, keyword: str) -> date:
    try:
        return date(y, m, d)
    except ValueError:
        raise DicomValueError(keyword, "DA", "no such calendar day") from None


def parse_da(value: object, keyword: str = "date") -> date | None:
    """A DA value as a ``date``; ``None`` when empty (Type 2 attributes may be).

    Raises ``DicomValueError`` for a form that is not a date or is ambiguous.
    """
    text = _text(value)
    if not text:
        return None
    if m := _DA_STANDARD.fullmatch(text):
        return _date(int(m[1]), int(m[2]), int(m[3]), keyword)
    if m := _DA_YMD.fullmatch(text):
        return _date(int(m[1]), int(m[2]), int(m[3]), keyword)
    if m := _DA_DMY_DOT.fullmatch(text):
        return _date(int(m[3]), int(m[2]), int(m[1]), keyword)
    if m := _DA_SLASH.fullmatch(text):
        a, b = int(m[1]), int(m[2])
        if a > 12 >= b:
            return _date(int(m[3]), b, a, keyword)
        if b > 12 >= a:
            return _date(int(m[3]), a, b, keyword)
        raise DicomValueError(keyword, "DA", "a slashed date whose day and month cannot be "
                                             "told apart")
    raise DicomValueError(keyword, "DA", "not YYYYMMDD nor a known older form")


def parse_tm(value: object, keyword: str = "time") -> time | None:
    """A TM value as a ``time`` (partial values fill with zeros); ``None`` when empty."""
    text = _text(value)
    if not text:
        return None
    m = _TM_STANDARD.fullmatch(text) or _TM_COLON.fullmatch(text)
    if m is None:
        raise DicomValueError(keyword, "TM", "not HHMMSS.FFFFFF nor HH:MM:SS")
    hh, mm, ss = int(m[1]), int(m[2] or 0), int(m[3] or 0)
    if ss == 60:  # PS3.5 allows a leap second; time() does not
        ss = 59
    frac = int((m[4] or "0").ljust(6, "0"))
    try:
        return time(hh, mm, ss, frac)
    except ValueError:
        raise DicomValueError(keyword, "TM", "hour, minute or second out of range") from None


def parse_dt(value: object, keyword: str = "datetime") -> datetime | None:
    """A DT value as a naive ``datetime`` (the UTC offset is dropped); ``None`` when empty."""
    text = _text(value)
    if not text:
        return None
    m = _DT.fullmatch(text)
    if m is None:
        raise DicomValueError(keyword, "DT", "not YYYYMMDDHHMMSS.FFFFFF&ZZXX")
    parts = [int(p) if p else None for p in m.groups()[:6]]
    y, mo, d, hh, mi, ss = parts
    assert y is not None
    frac = int((m[7] or "0").ljust(6, "0"))
    try:
        return datetime(y, mo or 1, d or 1, hh or 0, mi or 0, min(ss or 0, 59), frac)
    except ValueError:
        raise DicomValueError(keyword, "DT", "a field is out of range") from None


def format_da(value: date) -> str:
    """``YYYYMMDD`` (PS3.5 DA)."""
    return f"{value.year:04d}{value.month:02d}{value.day:02d}"


def format_tm(value: time) -> str:
    """``HHMMSS`` plus ``.FFFFFF`` when there are microseconds (PS3.5 TM)."""
    base = f"{value.hour:02d}{value.minute:02d}{value.second:02d}"
    return f"{base}.{value.microsecond:06d}" if value.microsecond else base


def normalise_da(value: object, keyword: str = "date") -> str | None:
    """The standard form of a DA value (``YYYYMMDD``), ``None`` when empty; raises
    ``DicomValueError`` when it cannot be read."""
    parsed = parse_da(value, keyword)
    return None if parsed is None else format_da(parsed)


def normalise_tm(value: object, keyword: str = "time") -> str | None:
    """The standard form of a TM value, ``None`` when empty; raises ``DicomValueError``."""
    parsed = parse_tm(value, keyword)
    return None if parsed is None else format_tm(parsed)
