"""How values read on the pages (dashboards.fmt): DICOM dates, decimals, units."""

from __future__ import annotations

from dashboards.fmt import MISSING, decimals_to_distinguish, dicom_date, quantity


def test_dicom_dates_read_as_iso_days() -> None:
    assert dicom_date("20260127") == "2026-01-27"
    assert dicom_date("2026-01-27") == "2026-01-27"
    assert dicom_date(None) == MISSING and dicom_date("") == MISSING
    assert dicom_date("20261399") == "(not a valid date)"  # never the raw value


def test_values_differing_in_the_third_decimal_print_differently() -> None:
    """The BTS priors table printed 3.8300 for 3.83 and 3.834."""
    d = decimals_to_distinguish([3.83, 3.834, 4.1])
    assert d == 3
    assert {quantity(v, "mL", d) for v in (3.83, 3.834)} == {"3.830 mL", "3.834 mL"}
    assert decimals_to_distinguish([3.8, 12.25, None]) == 2
    assert decimals_to_distinguish([1.00001, 1.00002]) == 4  # capped


def test_quantities_carry_their_unit() -> None:
    assert quantity(3.834, "mL") == "3.83 mL"
    assert quantity(12.5, "%", 1) == "12.5%"
    assert quantity(1234.5, "mm2", 1) == "1,234.5 mm2"
    assert quantity(None, "mL") == MISSING and quantity(float("nan"), "mL") == MISSING


def test_tables_show_two_decimals_and_a_dash_for_missing() -> None:
    """No "None" and no four decimals in the pages' tables (the CSV keeps everything)."""
    import pandas as pd

    from dashboards.ui import readable

    df = pd.DataFrame({"pct": [12.345678, None], "name": ["a", None],
                       "at": pd.to_datetime(["2026-01-27 14:05:09", "2026-01-28 09:00:00"])})
    shown = readable(df)
    assert list(shown.data["pct"]) == ["12.35", "—"]
    assert list(shown.data["name"]) == ["a", "—"]
    assert list(shown.data["at"]) == ["2026-01-27 14:05", "2026-01-28 09:00"]
    assert "None" not in shown.to_html() and "12.3457" not in shown.to_html()
