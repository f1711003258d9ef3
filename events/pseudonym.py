"""Pseudonyms and coarse demographics: how patients appear in events.

A patient is an HMAC-SHA256 of (issuer, patient ID) under the site secret:
stable within a site (longitudinal analysis works), meaningless outside it, and
not reversible without the secret. Age is a ten-year band; sex a one-letter code.
Birth dates, names and IDs never leave the DICOM file.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import date

MIN_SECRET_BYTES = 16


def pseudonym(secret: bytes, value: str, *, kind: str = "patient", issuer: str = "") -> str:
    """A 32-hex-digit keyed pseudonym of ``value`` (e.g. a Patient ID)."""
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"site secret must be at least {MIN_SECRET_BYTES} bytes")
    msg = "\x1f".join((kind, issuer, value.strip())).encode("utf-8")
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()[:32]


def age_band(
    patient_age: str | None = None,
    birth_date: str | None = None,
    study_date: str | None = None,
) -> str | None:
    """Ten-year band ("40-49", "90+") from PatientAge (e.g. "045Y") or dates (YYYYMMDD).

    Returns None when neither gives a plausible age. The birth date itself is
    used only here, in memory, and never returned.
    """
    years: int | None = None
    if patient_age and len(patient_age) == 4 and patient_age[:3].isdigit():
        n, unit = int(patient_age[:3]), patient_age[3].upper()
        years = {"Y": n, "M": n // 12, "W": n // 52, "D": n // 365}.get(unit)
    elif birth_date and study_date:
        try:
            b = date(int(birth_date[:4]), int(birth_date[4:6]), int(birth_date[6:8]))
            s = date(int(study_date[:4]), int(study_date[4:6]), int(study_date[6:8]))
        except ValueError:
            return None
        years = s.year - b.year - ((s.month, s.day) < (b.month, b.day))
    if years is None or years < 0 or years > 130:
        return None
    if years >= 90:
        return "90+"
    lo = years // 10 * 10
    return f"{lo}-{lo + 9}"


def sex_code(patient_sex: str | None) -> str | None:
    code = (patient_sex or "").strip().upper()[:1]
    return code if code in {"F", "M", "O"} else None
