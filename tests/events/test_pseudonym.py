"""Pseudonyms, age bands and the site secret."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from events.pseudonym import age_band, pseudonym, sex_code
from lastmile.settings import ConfigError, Settings

SECRET = b"0123456789abcdef0123456789abcdef"


def test_pseudonym_is_stable_keyed_and_not_the_id() -> None:
    a = pseudonym(SECRET, "PAT-0042")
    assert a == pseudonym(SECRET, " PAT-0042 ")
    assert a != pseudonym(SECRET, "PAT-0043")
    assert a != pseudonym(b"another-site-secret-32-bytes-long", "PAT-0042")
    assert a != pseudonym(SECRET, "PAT-0042", issuer="OTHER-HOSPITAL")
    assert "0042" not in a and len(a) == 32 and int(a, 16) >= 0


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        pseudonym(b"short", "x")


@pytest.mark.parametrize(
    ("age", "birth", "study", "band"),
    [
        ("045Y", None, None, "40-49"),
        ("009Y", None, None, "0-9"),
        ("018M", None, None, "0-9"),
        ("093Y", None, None, "90+"),
        (None, "19800615", "20260614", "40-49"),
        (None, "19800615", "20260615", "40-49"),
        (None, "19860615", "20260614", "30-39"),
        (None, "19800615", None, None),
        (None, "bad", "20260101", None),
        ("abc", None, None, None),
    ],
)
def test_age_band(age: str | None, birth: str | None, study: str | None, band: str | None) -> None:
    assert age_band(age, birth, study) == band


@given(st.integers(min_value=0, max_value=130))
def test_age_band_contains_the_age(years: int) -> None:
    band = age_band(f"{years:03d}Y")
    assert band is not None
    if band == "90+":
        assert years >= 90
    else:
        lo, hi = (int(x) for x in band.split("-"))
        assert lo <= years <= hi and hi - lo == 9


def test_sex_code() -> None:
    codes = [sex_code(s) for s in ("F", "m", "O", "", None, "X")]
    assert codes == ["F", "M", "O", None, None, None]


def test_site_secret_is_generated_once_with_0600(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LASTMILE_SITE_SECRET", raising=False)
    settings = Settings(state_dir=tmp_path)
    first = settings.secret()
    assert len(first) == 64
    assert (tmp_path / "site_secret").stat().st_mode & 0o777 == 0o600
    assert Settings(state_dir=tmp_path).secret() == first


def test_a_readable_secret_file_is_refused(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LASTMILE_SITE_SECRET", raising=False)
    (tmp_path / "site_secret").write_text("x" * 64)
    os.chmod(tmp_path / "site_secret", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        Settings(state_dir=tmp_path).secret()


def test_secret_from_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LASTMILE_SITE_SECRET", "from-the-environment-0123456789")
    assert Settings(state_dir=tmp_path).secret() == b"from-the-environment-0123456789"
    assert not (tmp_path / "site_secret").exists()
