"""The governance report a board circulates: HTML and PDF with agreement, Dice and runtime
figures, titled with its own pipeline, bars never hidden by a target line. The PDF is
printed by Debian's Chromium and its pages rendered to PNG (PDFium, via pypdfium2) to
check what a reader of the file sees."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dashboards import data as D
from dashboards import svg
from dashboards.queries import Filters
from dashboards.report import governance_report
from dashboards.report_pdf import ReportPdfError, report_pdf
from projections import metrics as M
from projections.duckdb_store import ProjectionStore
from projections.folds import RowBatch
from tests.dashboards import oracle
from tests.dashboards.conftest import ARTIFACTS, known_events

EVENTS, CONFIG = known_events()


@pytest.fixture(scope="module")
def con() -> Iterator[M.Con]:
    store = ProjectionStore(":memory:")
    store.apply(RowBatch().extend(enumerate(EVENTS, 1)))
    with store.connection() as c:
        yield c
    store.close()


def _rects(text: str) -> list[ET.Element]:
    root = ET.fromstring(text)
    return [e for e in root if e.tag.endswith("rect") and e.get("fill") == svg.PALETTE[0]
            and len(e)]  # bars carry a <title>; legend swatches do not


def test_target_line_is_drawn_behind_the_bars() -> None:
    text = svg.bar_chart("runtime", ["1.0.0"], [("p50", [200.0]), ("p90", [300.0])],
                         "seconds", target=270.0)
    line = text.index('stroke="#d62728"')
    assert line < text.index("<rect"), "the target line must be under the bars"
    assert "target 270" in text


def test_a_far_target_is_noted_instead_of_flattening_the_bars() -> None:
    """Turnaround stages of a few seconds against a 600 s target: the bars keep the
    scale, the target is written as above it."""
    text = svg.bar_chart("turnaround", ["queue", "inference"], [("p50", [3.0, 12.0])],
                         "seconds", target=600.0)
    assert "target 600 seconds, above the scale" in text
    assert 'stroke-dasharray="5,3"' not in text
    heights = [float(r.get("height", 0)) for r in _rects(text)]
    assert min(heights) >= 20, heights  # 3 s of a 20 s scale, not 3 s of 600


def test_durations_read_as_a_person_writes_them() -> None:
    from dashboards.report import _duration

    assert [_duration(v) for v in (42, 450, 84_000)] == ["42 s", "7.5 min", "23.3 h"]


def test_small_values_never_vanish() -> None:
    text = svg.bar_chart("x", ["a", "b"], [("s", [1000.0, 0.001])])
    assert min(float(r.get("height", 0)) for r in _rects(text)) >= svg.MIN_BAR_PX


def test_report_names_its_own_pipeline_and_has_dice_and_target(con: M.Con) -> None:
    o = D.overview_data(con, Filters())
    dice = D.dice_data(con, Filters(), pipeline="bts")
    assert dice, "the known site has corrected BTS masks"
    html = governance_report("bts", o, None, Filters(), 7, dice=dice)
    assert "all pipelines" not in html
    assert "pipeline bts" in html
    assert "runs ≤ target 270 s" in html  # bts's file says 270 s
    assert f"{dice[0].mean.value:.3f}" in html and f"Dice {dice[0].label}" in html
    html = governance_report("lts", o, None, Filters(), 7, dice=[])
    assert "runs ≤ target 600 s" in html and "no corrected masks" in html


def test_governance_report_pdf_renders_to_png(con: M.Con) -> None:
    import pypdfium2 as pdfium

    o = D.overview_data(con, Filters())
    a = D.agreement_data(con, Filters(), pipeline="hfd", positive="fracture")
    dice = D.dice_data(con, Filters(), pipeline="hfd")
    html = governance_report("hfd", o, a, Filters(), len(EVENTS), dice=dice)
    pdf = report_pdf(html)
    assert pdf.startswith(b"%PDF-")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "governance-hfd.pdf").write_bytes(pdf)
    doc = pdfium.PdfDocument(pdf)
    try:
        assert 1 <= len(doc) <= 3, f"{len(doc)} pages"
        text = " ".join(doc[i].get_textpage().get_text_range() for i in range(len(doc)))
        text = re.sub(r"\s+", " ", text)
        assert "Governance report: pipeline hfd" in text
        assert "runs ≤ target 20 s" in text  # hfd's own target, from its pipeline file
        sens, _ = oracle.sensitivity(EVENTS, "hfd", "fracture")
        assert f"{100 * sens:.1f}%" in text  # agreement
        assert "kappa AI vs" in text
        assert "Dice" in text
        # the readers' first look is a figure in hours, not a bar flattening the others
        assert re.search(r"published to first review, p50 / p90 [\d.]+ h / [\d.]+ h", text)
        pixels = []
        for i in range(len(doc)):
            image = doc[i].render(scale=1.5).to_pil()
            image.save(ARTIFACTS / f"governance-hfd-page{i + 1}.png")
            pixels.append(np.asarray(image.convert("RGB")).reshape(-1, 3))
    finally:
        doc.close()
    rgb = np.concatenate(pixels)
    for colour in svg.PALETTE[:2]:  # the p50 and p90 bars are on the page
        want = np.array([int(colour[k:k + 2], 16) for k in (1, 3, 5)])
        assert (np.abs(rgb.astype(int) - want).sum(axis=1) < 30).sum() > 200, colour


def test_pdf_without_chromium_says_which_binary(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.setenv("LASTMILE_CHROMIUM", str(tmp_path / "no-chromium"))
    with pytest.raises(ReportPdfError, match="no Chromium at .*no-chromium"):
        report_pdf("<html></html>")
