"""The dashboard in a real browser (Debian Chromium via Playwright) over a read model folded
from a known event set: every page renders without a Streamlit exception, key figures
equal the oracle's, filters change them, downloads hold the data."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from bench.dashboards import wait_for_page
from dashboards.process import PAGES, page_url
from tests.dashboards import oracle
from tests.dashboards.conftest import ARTIFACTS, NEW_VERSION, NOT_RUN, UNROUTED, KnownSite

pytestmark = [pytest.mark.server, pytest.mark.slow]

EXCEPTION = '[data-testid="stException"]'


def open_page(page: Any, site: KnownSite, name: str, query: str = "") -> None:
    page.goto(page_url(site.url, name) + query)
    wait_for_page(page)
    assert page.locator(EXCEPTION).count() == 0, page.locator(EXCEPTION).first.inner_text()


def shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    size = page.viewport_size
    # Streamlit scrolls inside its main block, not the document: grow the viewport to it
    height = page.evaluate(
        "() => { const m = document.querySelector('[data-testid=\"stMain\"]');"
        " return m ? m.scrollHeight : document.body.scrollHeight; }")
    page.set_viewport_size({"width": size["width"], "height": min(int(height) + 40, 7000)})
    page.wait_for_timeout(400)  # let Vega re-lay out charts at the new size
    wait_for_page(page)
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(size)
    return path


def metric(page: Any, label: str, scope: str = "") -> Any:
    """The value element of the st.metric with this label (inside ``scope`` if given)."""
    root = page.locator(scope) if scope else page
    box = root.locator('[data-testid="stMetric"]').filter(
        has=page.locator('[data-testid="stMetricLabel"]', has_text=label))
    return box.first.locator('[data-testid="stMetricValue"]')


def pick(page: Any, label: str, option: str, sidebar: bool = True) -> None:
    """Choose ``option`` in the selectbox labelled ``label``, as a reader would."""
    root = page.locator('[data-testid="stSidebar"]') if sidebar else page.locator(
        '[data-testid="stMain"]')
    box = root.get_by_role("combobox", name=label, exact=True)
    box.scroll_into_view_if_needed()
    box.click()
    box.fill(option)  # typing narrows the list; Enter takes the first match
    expect(page.get_by_role("option", name=option, exact=True)).to_be_attached()
    box.press("ArrowDown")
    box.press("Enter")
    expect(box).to_have_value(option)


def test_every_page_renders_with_freshness(known_site: KnownSite, page: Any) -> None:
    n = len(known_site.events)
    study = next(e.study_uid for e in known_site.events if e.study_uid)
    for name in PAGES:
        open_page(page, known_site, name, f"?study={study}" if name == "audit" else "")
        expect(page.get_by_text(f"data as of event #{n},")).to_be_visible()
        shot(page, name)  # test-artifacts/dashboards/; `make screenshots` copies to docs/


def test_overview_opens_at_its_own_address(known_site: KnownSite, page: Any) -> None:
    """/overview (the README, bookmarks) opens the Overview, not "Page not found"."""
    page.goto(f"{known_site.url}/overview")
    wait_for_page(page)
    expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()
    assert page.get_by_text("Page not found").count() == 0
    # HFD's stages (seconds) are drawn on their own scale, not as slivers of a 10-minute axis
    pick(page, "Pipeline", "hfd")
    wait_for_page(page)
    expect(page.get_by_text("so the axis shows the stages, not the target")).to_be_visible()


def test_overview_figures_equal_the_event_set(known_site: KnownSite, page: Any) -> None:
    open_page(page, known_site, "overview")
    exams = oracle.exams(known_site.events)
    outcomes = oracle.outcomes(known_site.events)
    for p in ("bts", "hfd", "lts"):
        scope = f".st-key-pipeline-{p}"
        expect(metric(page, "exams", scope)).to_have_text(f"{exams[p]:,}")
        finished, ok, _ = outcomes[p]
        expect(metric(page, "success rate", scope)).to_have_text(f"{100 * ok / finished:.1f}%")


def test_source_ae_filter_changes_the_figures(known_site: KnownSite, page: Any) -> None:
    open_page(page, known_site, "overview")
    everyone = oracle.exams(known_site.events)
    only = oracle.exams(known_site.events, source_ae="MR_MB")
    assert only["bts"] < everyone["bts"]
    pick(page, "Site / source AE", "MR_MB")
    expect(metric(page, "exams", ".st-key-pipeline-bts")).to_have_text(f"{only['bts']:,}")
    expect(metric(page, "exams", ".st-key-pipeline-hfd")).to_have_text(f"{only['hfd']:,}")
    assert page.locator(EXCEPTION).count() == 0


def test_model_version_filter_keeps_only_that_version(known_site: KnownSite, page: Any) -> None:
    open_page(page, known_site, "overview")
    expected = oracle.exams(known_site.events, version=NEW_VERSION)
    assert set(expected) == {"hfd"}
    pick(page, "Model version", NEW_VERSION)
    expect(metric(page, "exams", ".st-key-pipeline-hfd")).to_have_text(f"{expected['hfd']:,}")
    expect(page.locator(".st-key-pipeline-bts")).to_have_count(0)
    assert page.locator(EXCEPTION).count() == 0


def test_exams_csv_holds_the_chart_data(known_site: KnownSite, page: Any,
                                        tmp_path: Path) -> None:
    open_page(page, known_site, "overview")
    with page.expect_download() as dl:
        page.locator(".st-key-csv-exams_per_week button").first.click()
    path = tmp_path / "exams.csv"
    dl.value.save_as(path)
    lines = path.read_text().strip().splitlines()
    assert lines[0] == "week,pipeline,exams"
    total = sum(int(line.rsplit(",", 1)[1]) for line in lines[1:])
    assert total == sum(oracle.exams(known_site.events).values())


def test_governance_report_downloads_as_html(known_site: KnownSite, page: Any,
                                             tmp_path: Path) -> None:
    open_page(page, known_site, "overview")
    pick(page, "Report for pipeline", "hfd", sidebar=False)
    expect(page.get_by_text("Report of pipeline hfd")).to_be_visible()
    wait_for_page(page)
    with page.expect_download() as dl:
        page.locator(".st-key-report-download button").first.click()
    path = tmp_path / "report.html"
    dl.value.save_as(path)
    html = path.read_text()
    assert "Governance report: pipeline hfd" in html
    assert f"data as of event #{len(known_site.events)}" in html
    assert html.count("<svg") >= 3
    sens, _ = oracle.sensitivity(known_site.events, "hfd", "fracture")
    assert f"{100 * sens:.1f}%" in html
    assert "all pipelines" not in html  # the report is of hfd, whatever the sidebar says
    with page.expect_download() as dl:
        page.locator(".st-key-report-pdf-download button").first.click()
    pdf = tmp_path / "report.pdf"
    dl.value.save_as(pdf)
    assert pdf.read_bytes().startswith(b"%PDF-")
    assert dl.value.suggested_filename.endswith(".pdf")


def test_agreement_sensitivity_equals_the_event_set(known_site: KnownSite, page: Any) -> None:
    open_page(page, known_site, "agreement")
    pick(page, "Agreement of pipeline", "hfd", sidebar=False)
    # one "Pipeline" box on the page (the sidebar's filter), not two
    assert page.get_by_role("combobox", name="Pipeline", exact=True).count() == 1
    sens, n = oracle.sensitivity(known_site.events, "hfd", "fracture")
    expect(metric(page, "sensitivity")).to_have_text(f"{100 * sens:.1f}%")
    expect(page.get_by_text(f"n={n}").first).to_be_visible()
    # HFD draws no masks: Dice says so rather than "not enough data"
    expect(page.get_by_text("Not applicable: HFD draws no masks").first).to_be_visible()
    # empty states are sentences, never a raw key ("dice hfd:", "psi bts:")
    main = page.locator('[data-testid="stMain"]').inner_text()
    assert "dice hfd" not in main and "bland altman" not in main
    assert page.locator(EXCEPTION).count() == 0
    shot(page, "agreement-hfd")


def test_blinded_reads_are_unblinded_with_the_key(known_site: KnownSite, page: Any,
                                                  tmp_path: Path) -> None:
    open_page(page, known_site, "agreement")
    with page.expect_download() as dl:
        page.locator(".st-key-csv-blinded_reads button").first.click()
    path = tmp_path / "blinded.csv"
    dl.value.save_as(path)
    rows = list(csv.DictReader(path.open()))
    got = {r["source"]: float(r["accepted"]) for r in rows}
    expected = oracle.blinded_acceptance(known_site.events, known_site.unblinding)
    assert set(got) == {"ai", "expert", "novice"} == set(expected)
    for source, share in expected.items():
        assert got[source] == pytest.approx(share)


def test_reliability_counts_runs(known_site: KnownSite, page: Any) -> None:
    open_page(page, known_site, "reliability")
    outcomes = oracle.outcomes(known_site.events)
    expect(metric(page, "runs finished")).to_have_text(
        f"{sum(f for f, _, _ in outcomes.values()):,}")
    expect(metric(page, "final failures")).to_have_text(
        f"{sum(b for _, _, b in outcomes.values()):,}")


def test_reliability_lists_studies_with_no_runnable_pipeline(known_site: KnownSite, page: Any,
                                                             tmp_path: Path) -> None:
    open_page(page, known_site, "reliability")
    expect(page.get_by_role("heading", name="Studies completed with no runnable pipeline")
           ).to_be_visible()
    with page.expect_download() as dl:
        page.locator(".st-key-csv-not_run button").first.click()
    path = tmp_path / "not_run.csv"
    dl.value.save_as(path)
    rows = list(csv.DictReader(path.open()))
    assert [(r["pipeline"], r["kind"], r["reason_code"], r["reason"], r["n"]) for r in rows] == [
        ("myhip", "not_run", "not_deployed", NOT_RUN.reason, "1"),
        ("", "not_run", "no_route", UNROUTED[0].reason, "1")]


def test_audit_deep_link_shows_and_downloads_the_history(known_site: KnownSite, page: Any,
                                                         tmp_path: Path) -> None:
    counts = oracle.study_event_counts(known_site.events)
    study, n = counts.most_common(1)[0]
    open_page(page, known_site, "audit", f"?study={study}")
    expect(page.get_by_role("heading", name=f"{n} events")).to_be_visible()
    expanders = page.locator('[data-testid="stExpander"]')
    expect(expanders).to_have_count(n)
    expanders.first.locator("summary").click()
    first = next(e for e in known_site.events if e.study_uid == study)
    expect(page.get_by_text(first.event_id).first).to_be_visible(timeout=30_000)
    with page.expect_download() as dl:
        page.locator(".st-key-audit-json button").first.click()
    path = tmp_path / "history.json"
    dl.value.save_as(path)
    history = json.loads(path.read_text())
    assert [h["event_id"] for h in history] == [e.event_id for e in known_site.events
                                                if e.study_uid == study]
    seqs = [h["sequence"] for h in history]
    assert seqs == sorted(seqs)


def test_audit_text_box_sets_the_deep_link(known_site: KnownSite, page: Any) -> None:
    counts = oracle.study_event_counts(known_site.events)
    study, n = counts.most_common()[-1]
    open_page(page, known_site, "audit")
    box = page.get_by_label("StudyInstanceUID")
    box.fill(study)
    box.press("Enter")
    expect(page.get_by_role("heading", name=f"{n} events")).to_be_visible()
    assert f"study={study}" in page.url


def test_models_page_shows_who_deployed_and_the_card(known_site: KnownSite, page: Any) -> None:
    open_page(page, known_site, "models")
    # the deployer is in the model card's title (the history table is a canvas grid whose
    # cells are in the DOM but not "visible" to Playwright)
    deployed = page.locator('[data-testid="stExpander"]').filter(has_text="by dr.governance")
    expect(deployed.first).to_be_visible()
    card = page.locator('[data-testid="stExpander"]').filter(has_text=f"hfd {NEW_VERSION}")
    card.locator("summary").click()
    expect(card.get_by_text("Not a clinical model.")).to_be_visible()
