"""DICOM dates and times parsed as values (events.dicom_dates): standard forms, the older
forms archives still hold, refusals that name the attribute and never the value
(issue 14 item 4)."""

from __future__ import annotations

from datetime import date, datetime, time

import pytest

from events.dicom_dates import (
    DicomValueError,
    normalise_da,
    normalise_tm,
    parse_da,
    parse_dt,
    parse_tm,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("19370413", date(1937, 4, 13)),  # PS3.5 DA
    ("1937.04.13", date(1937, 4, 13)),  # ACR-NEMA 2.0
    ("1937-04-13", date(1937, 4, 13)),
    ("13.04.1937", date(1937, 4, 13)),  # day first wherever dots are written
    ("13/04/1937", date(1937, 4, 13)),  # 13 cannot be a month
    ("04/13/1937", date(1937, 4, 13)),
    (" 19370413 ", date(1937, 4, 13)),
])
def test_dates_in_every_unambiguous_form(text: str, expected: date) -> None:
    assert parse_da(text) == expected
    assert normalise_da(text) == "19370413"


@pytest.mark.parametrize("empty", [None, "", "  "])
def test_an_empty_type2_date_is_none(empty: str | None) -> None:
    assert parse_da(empty) is None and normalise_da(empty) is None


@pytest.mark.parametrize("text", ["04/05/1937", "19371332", "1937041", "yesterday",
                                  "13.04.37", "20260230"])
def test_ambiguous_or_impossible_dates_are_refused_naming_the_attribute(text: str) -> None:
    with pytest.raises(DicomValueError) as caught:
        parse_da(text, "PatientBirthDate")
    assert str(caught.value).startswith("PatientBirthDate is not a valid DA value")
    assert text not in str(caught.value)


@pytest.mark.parametrize(("text", "expected"), [
    ("101500", time(10, 15)), ("1015", time(10, 15)), ("10", time(10)),
    ("101500.123", time(10, 15, 0, 123000)), ("10:15:00", time(10, 15)),
    ("10:15", time(10, 15)), ("235960", time(23, 59, 59)),
])
def test_times_standard_partial_and_acr_nema(text: str, expected: time) -> None:
    assert parse_tm(text) == expected


def test_times_out_of_range_are_refused_and_normalised_forms_are_standard() -> None:
    with pytest.raises(DicomValueError, match="StudyTime is not a valid TM"):
        parse_tm("25:99", "StudyTime")
    assert normalise_tm("10:15:00") == "101500"
    assert normalise_tm("101500.5") == "101500.500000"


def test_datetimes_with_offsets_and_partial_precision() -> None:
    assert parse_dt("20260301101500.25+0100") == datetime(2026, 3, 1, 10, 15, 0, 250000)
    assert parse_dt("202603") == datetime(2026, 3, 1)
    with pytest.raises(DicomValueError):
        parse_dt("2026-03-01T10:15")
