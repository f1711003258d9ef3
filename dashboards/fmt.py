"""How values read on the pages: dates as ISO 8601 days, measurements with their unit and
as many decimals as tell them apart, missing values as a dash. Pure functions."""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import date, datetime

MISSING = "—"


def dicom_date(value: str | None) -> str:
    """A DICOM DA value (PS3.5 6.2, ``YYYYMMDD``) as an ISO 8601 day ("2026-01-27");
    missing -> "—"; a value that is not a valid DA -> "(not a valid date)" (the raw
    value is never echoed)."""
    if not value:
        return MISSING
    text = value.strip()
    try:
        return datetime.strptime(text, "%Y%m%d").date().isoformat()
    except ValueError:
        try:  # already ISO (some sources store it so)
            return date.fromisoformat(text).isoformat()
        except ValueError:
            return "(not a valid date)"


def decimals_to_distinguish(values: Iterable[float | None], least: int = 2, most: int = 4,
                            ) -> int:
    """The fewest decimals (between ``least`` and ``most``) at which values that differ
    still print differently: [3.83, 3.834] -> 3 (not "3.83" twice), [3.8, 12.25] -> 2."""
    xs = sorted({float(v) for v in values if v is not None and math.isfinite(float(v))})
    for d in range(least, most + 1):
        if len({f"{x:.{d}f}" for x in xs}) == len(xs):
            return d
    return most


def quantity(value: float | None, unit: str | None, decimals: int = 2) -> str:
    """A measurement with its unit: "3.83 mL", "+12.5 %"-style units kept as given;
    missing -> "—"."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    number = f"{value:,.{decimals}f}"
    if not unit:
        return number
    return f"{number}{unit}" if unit == "%" else f"{number} {unit}"
