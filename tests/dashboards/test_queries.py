"""The dashboards' pure parts and DuckDB edge, without a browser: filters narrow every
metric the way the oracle says, the ROC points integrate to the projections' AUC, the
report and its SVG are well formed, the settings survive the trip to the child process."""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import timedelta

import pytest

from dashboards import data as D
from dashboards import queries as Q
from dashboards import svg
from dashboards.config import DashboardConfigError, bus_from_json, bus_to_json
from dashboards.curves import roc_points, thin, trapezoid_auc
from dashboards.queries import Filters
from dashboards.report import governance_report
from events.jetstream import BusSettings
from projections import metrics as M
from projections.duckdb_store import ProjectionStore
from projections.folds import RowBatch
from projections.stats import roc_auc
from tests.dashboards import oracle
from tests.dashboards.conftest import NEW_VERSION, known_events

EVENTS, CONFIG = known_events()


@pytest.fixture
def con() -> Iterator[M.Con]:
    store = ProjectionStore(":memory:")
    store.apply(RowBatch().extend(enumerate(EVENTS, 1)))
    with store.connection() as c:
        yield c
    store.close()


def _studies(con: M.Con) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in M.volume(con):
        out[v.pipeline] = out.get(v.pipeline, 0) + v.studies
    return out


def test_no_filter_leaves_the_tables_alone(con: M.Con) -> None:
    Q.apply_filters(con, Filters(pipeline="hfd"))
    temp = con.execute("SELECT count(*) FROM duckdb_views() WHERE temporary AND NOT internal"
                       ).fetchone()
    assert temp == (0,)
    assert _studies(con) == oracle.exams(EVENTS)


def test_source_ae_filter_narrows_every_metric(con: M.Con) -> None:
    Q.apply_filters(con, Filters(source_ae="ZSFG_PACS"))
    assert _studies(con) == oracle.exams(EVENTS, source_ae="ZSFG_PACS")
    finished = sum(o.finished for o in M.outcomes(con))
    assert 0 < finished < sum(f for f, _, _ in oracle.outcomes(EVENTS).values())


def test_model_version_filter_keeps_that_version_only(con: M.Con) -> None:
    Q.apply_filters(con, Filters(model_version=NEW_VERSION))
    versions = {(r.pipeline, r.model_version) for r in M.runtime(con)}
    assert versions == {("hfd", NEW_VERSION)}
    assert _studies(con) == oracle.exams(EVENTS, version=NEW_VERSION)


def test_date_filter_keeps_arrivals_in_range(con: M.Con) -> None:
    start = (CONFIG.start + timedelta(weeks=2)).date()
    end = (CONFIG.start + timedelta(weeks=3)).date()
    Q.apply_filters(con, Filters(start=start, end=end))
    weeks = {v.week for v in M.volume(con)}
    assert weeks and all(start - timedelta(days=6) <= w <= end for w in weeks)
    first = con.execute("SELECT min(occurred_at)::DATE, max(occurred_at)::DATE FROM instances"
                        ).fetchone()
    assert first is not None and start <= first[0] and first[1] <= end


def test_overview_data_headline_matches_oracle(con: M.Con) -> None:
    o = D.overview_data(con, Filters())
    outcomes = oracle.outcomes(EVENTS)
    for p, h in o.headline.items():
        finished, ok, _ = outcomes[p]
        assert h["finished"] == finished
        assert h["success_rate"].value == pytest.approx(ok / finished)
    assert o.headline["hfd"]["runtime_version"] == NEW_VERSION


def test_agreement_data_matches_oracle_and_its_roc_matches_auc(con: M.Con) -> None:
    a = D.agreement_data(con, Filters(), pipeline="hfd", positive="fracture")
    sens, n = oracle.sensitivity(EVENTS, "hfd", "fracture")
    row = a.accuracy.set_index("measure").loc["sensitivity"]
    assert row["value"] == pytest.approx(sens) and row["n"] == n
    assert a.agreement.auc.value is not None
    assert trapezoid_auc(a.roc) == pytest.approx(a.agreement.auc.value)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_roc_points_integrate_to_the_mann_whitney_auc(seed: int) -> None:
    rng = random.Random(seed)
    truth = [rng.random() < 0.3 for _ in range(200)]
    scores = [round(rng.gauss(0.7 if t else 0.4, 0.2), 2) for t in truth]  # with ties
    pts = roc_points(truth, scores)
    assert (pts[0].fpr, pts[0].tpr) == (0.0, 0.0) and (pts[-1].fpr, pts[-1].tpr) == (1.0, 1.0)
    assert trapezoid_auc(pts) == pytest.approx(roc_auc(truth, scores).value)


def test_thinned_curve_keeps_its_ends_and_order() -> None:
    rng = random.Random(4)
    truth = [rng.random() < 0.5 for _ in range(3000)]
    pts = roc_points(truth, [rng.random() for _ in truth])
    few = thin(pts, 100)
    assert len(few) == 100 and few[0] == pts[0] and few[-1] == pts[-1]
    assert [p.fpr for p in few] == sorted(p.fpr for p in few)
    assert trapezoid_auc(few) == pytest.approx(trapezoid_auc(pts), abs=0.01)


def test_roc_of_one_class_is_empty() -> None:
    assert roc_points([True, True], [0.2, 0.9]) == []


def test_svg_charts_are_well_formed_xml() -> None:
    for text in (svg.bar_chart("a & b", ["x<1", "y"], [("s", [1.0, 2.0]), ("t", [3, 0])],
                               "n", target=2.5),
                 svg.bar_chart("stacked", ["x", "y"], [("s", [1.0, 2.0]), ("t", [3, 1])],
                               stacked=True),
                 svg.line_chart("roc", [0, 0.5, 1], [("AI", [0, 0.8, 1])], diagonal=True,
                                ymax=1.0),
                 svg.bar_chart("empty", [], [])):
        root = ET.fromstring(text)
        assert root.tag.endswith("svg")


def test_governance_report_has_figures_and_plots(con: M.Con) -> None:
    o = D.overview_data(con, Filters())
    a = D.agreement_data(con, Filters(), pipeline="hfd", positive="fracture")
    html = governance_report("hfd", o, a, Filters(source_ae="MR_MB"), 123)
    assert "Governance report: pipeline hfd" in html and "event #123" in html
    assert "source AE MR_MB" in html
    assert f"{o.headline['hfd']['exams']:,}" in html
    for part in html.split("<svg")[1:]:
        ET.fromstring("<svg" + part.split("</svg>")[0] + "</svg>")
    assert html.count("<svg") >= 3


def test_bus_settings_round_trip_and_bad_json() -> None:
    b = BusSettings(servers=("nats://127.0.0.1:1", "nats://127.0.0.1:2"), stream="X",
                    user="u", password="p")
    assert bus_from_json(bus_to_json(b)) == b
    with pytest.raises(DashboardConfigError):
        bus_from_json("{not json")
    with pytest.raises(DashboardConfigError):
        bus_from_json('{"surprise": 1}')
