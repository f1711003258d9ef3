"""The dashboards' DuckDB edge: page filters as temporary views, and the few queries the
pages need that ``projections.metrics`` does not offer (yet).

Filters. ``projections.metrics`` functions take a pipeline; the pages also filter by
model version, source AE (the calling AE that sent the study) and arrival date. Rather
than re-implementing every metric, ``apply_filters`` shadows each fact table of a
read-only connection with a TEMP view of the same name holding only the selected
studies and runs (DuckDB searches the temp catalogue first), and re-creates the
derived views on top of them. Every metric function then runs unchanged on the
filtered facts. Nothing is written to the database file: temp objects live in the
connection, which the caller closes right after.

Selection rules (the README's "Dashboards" section repeats them):

- a study's arrival is its first instance event (stored, rejected or duplicated), else
  its first inference request; its source AE is the calling AE of its first instance;
- a run's model version is the one its completion reports, else the version deployed
  with the model hash its request names (failed and skipped runs have no completion);
- with a model version selected, only that version's runs, and the studies they belong
  to, remain; events without a study (deployments, drift alerts) stay unless a date
  range excludes them.

Missing in projections (candidates to move there): ``turnaround_overall``,
``open_worklist``, ``completion_latency``,
``weekly_output``, ``drift_alerts``, ``model_versions``, ``options``; the
``pipeline_changes`` table has no actor or model-card column, so the Models page reads
those from the event log.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

import duckdb

from projections.metrics import STAGES
from projections.schema import SUPERSEDED_SQL, TABLES, VIEWS

Con = duckdb.DuckDBPyConnection

RUN_TABLES = frozenset(t.name for t in TABLES if any(c == "run_key" for c, _ in t.columns))
STUDY_TABLES = frozenset(t.name for t in TABLES if t.envelope)
SEQUENTIAL_STAGES = tuple(name for name, _, _ in STAGES if name != "arrival_to_published")


@dataclass(frozen=True)
class Filters:
    """What a reader selected in the sidebar; ``None`` means "all"."""

    pipeline: str | None = None
    model_version: str | None = None
    source_ae: str | None = None
    start: date | None = None  # arrival on or after this day (UTC)
    end: date | None = None  # arrival on or before this day (UTC)

    @property
    def narrows(self) -> bool:
        """True when the fact tables themselves must be filtered (beyond a pipeline)."""
        return any(v is not None for v in (self.model_version, self.source_ae, self.start,
                                           self.end))

    def describe(self) -> str:
        parts = [f"pipeline {self.pipeline}" if self.pipeline else "all pipelines"]
        if self.model_version:
            parts.append(f"model version {self.model_version}")
        if self.source_ae:
            parts.append(f"source AE {self.source_ae}")
        if self.start or self.end:
            parts.append(f"arrivals {self.start or '…'} to {self.end or '…'}")
        return ", ".join(parts)


def _bounds(f: Filters) -> tuple[datetime | None, datetime | None]:
    lo = datetime.combine(f.start, time()) if f.start else None
    hi = datetime.combine(f.end, time()) + timedelta(days=1) if f.end else None
    return lo, hi


def apply_filters(con: Con, f: Filters) -> None:
    """Shadow the fact tables of ``con`` with filtered TEMP views (see module docstring)."""
    if not f.narrows:
        return
    db = con.execute("SELECT current_database()").fetchone()
    catalog = f'"{db[0]}".main' if db else "main"
    lo, hi = _bounds(f)
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE lm_run_version AS
        WITH deployed AS (
            SELECT DISTINCT name, model_sha256, version FROM {catalog}.pipeline_changes
            WHERE kind = 'deployed' AND model_sha256 IS NOT NULL
        )
        SELECT i.run_key, any_value(i.study_uid) AS study_uid,
               coalesce(any_value(i.model_version) FILTER (i.kind = 'completed'),
                        any_value(d.version)) AS version
        FROM {catalog}.inference i
        LEFT JOIN deployed d ON i.kind = 'requested' AND d.name = i.pipeline
             AND d.model_sha256 = i.model_sha256
        GROUP BY i.run_key
    """)
    conds: list[str] = []
    params: list[object] = []
    if f.source_ae is not None:
        conds.append("ae = ?")
        params.append(f.source_ae)
    if lo is not None:
        conds.append("arrived_at >= ?")
        params.append(lo)
    if hi is not None:
        conds.append("arrived_at < ?")
        params.append(hi)
    if f.model_version is not None:
        conds.append("study_uid IN (SELECT study_uid FROM lm_run_version WHERE version = ?)")
        params.append(f.model_version)
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE lm_studies AS
        WITH arrivals AS (
            SELECT study_uid, min(occurred_at) AS arrived_at, arg_min(calling_ae, seq) AS ae
            FROM {catalog}.instances WHERE study_uid IS NOT NULL GROUP BY study_uid
        ), requested AS (
            SELECT study_uid, min(occurred_at) AS arrived_at FROM {catalog}.inference
            WHERE study_uid IS NOT NULL GROUP BY study_uid
        ), s AS (
            SELECT coalesce(a.study_uid, r.study_uid) AS study_uid,
                   coalesce(a.arrived_at, r.arrived_at) AS arrived_at, a.ae
            FROM arrivals a FULL OUTER JOIN requested r USING (study_uid)
        )
        SELECT study_uid FROM s WHERE {" AND ".join(conds) or "true"}
    """, params)
    runs = ""
    if f.model_version is not None:
        con.execute("CREATE OR REPLACE TEMP TABLE lm_runs AS SELECT run_key FROM "
                    "lm_run_version WHERE version = ?", [f.model_version])
        runs = " AND run_key IN (SELECT run_key FROM lm_runs)"
    # views cannot hold prepared parameters: the bounds are datetimes we built, as literals
    no_study = "true"
    if lo is not None:
        no_study += f" AND occurred_at >= TIMESTAMP '{lo.isoformat(sep=' ')}'"
    if hi is not None:
        no_study += f" AND occurred_at < TIMESTAMP '{hi.isoformat(sep=' ')}'"
    for table in TABLES:
        if not table.envelope:
            continue
        run_cond = runs if table.name in RUN_TABLES else ""
        con.execute(
            f"CREATE OR REPLACE TEMP VIEW {table.name} AS SELECT * FROM {catalog}.{table.name} "
            f"WHERE (study_uid IN (SELECT study_uid FROM lm_studies){run_cond}) "
            f"OR (study_uid IS NULL AND {no_study})")
    for name, sql in VIEWS:
        con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS {sql}")


# --------------------------------------------------------------------------- checkpoint


@dataclass(frozen=True)
class Freshness:
    """How current the read model is: the last event folded and when it happened."""

    last_sequence: int
    events: int
    last_event_at: datetime | None


def freshness(con: Con) -> Freshness:
    row = con.execute("SELECT max(last_sequence), sum(events) FROM checkpoint").fetchone()
    seq = int(row[0] or 0) if row else 0
    events = int(row[1] or 0) if row else 0
    at = None
    if seq:
        found = con.execute("""
            SELECT max(occurred_at) FROM (
                SELECT occurred_at FROM instances WHERE seq = $1
                UNION ALL SELECT occurred_at FROM inference WHERE seq = $1
                UNION ALL SELECT occurred_at FROM reviews WHERE seq = $1
                UNION ALL SELECT occurred_at FROM study_completions WHERE seq = $1)
        """, [seq]).fetchone()
        at = found[0] if found else None
    return Freshness(seq, events, at)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    """The values the sidebar filters offer."""

    pipelines: tuple[str, ...]
    model_versions: tuple[str, ...]
    source_aes: tuple[str, ...]
    first_day: date | None
    last_day: date | None


def options(con: Con) -> Options:
    pipes = [p for (p,) in con.execute(
        "SELECT DISTINCT pipeline FROM (SELECT pipeline FROM inference UNION ALL "
        "SELECT name FROM pipeline_changes UNION ALL SELECT route_pipeline FROM routes) "
        "WHERE pipeline IS NOT NULL ORDER BY 1").fetchall()]
    versions = [v for (v,) in con.execute(
        "SELECT DISTINCT version FROM (SELECT model_version AS version FROM inference "
        "WHERE kind = 'completed' UNION ALL SELECT version FROM pipeline_changes) "
        "WHERE version IS NOT NULL ORDER BY 1").fetchall()]
    aes = [a for (a,) in con.execute(
        "SELECT DISTINCT calling_ae FROM instances WHERE calling_ae IS NOT NULL ORDER BY 1"
    ).fetchall()]
    lo, hi = con.execute("SELECT min(occurred_at), max(occurred_at) FROM instances").fetchone() \
        or (None, None)
    return Options(tuple(pipes), tuple(versions), tuple(aes),
                   lo.date() if lo else None, hi.date() if hi else None)


# --------------------------------------------------------------------------- overview


@dataclass(frozen=True)
class StageRow:
    pipeline: str
    stage: str
    n: int
    p50_s: float
    p90_s: float


def turnaround_overall(con: Con, pipeline: str | None = None) -> list[StageRow]:
    """Per pipeline and turnaround stage, p50/p90 over every study (not per week)."""
    where, params = ("AND pipeline = ?", [pipeline]) if pipeline else ("", [])
    parts = " UNION ALL ".join(
        f"SELECT pipeline, '{name}' AS stage, date_diff('millisecond', {a}, {b}) / 1000.0 AS s "
        f"FROM t WHERE {a} IS NOT NULL AND {b} IS NOT NULL"
        for name, a, b in STAGES)
    rows = con.execute(f"""
        WITH t AS (SELECT * FROM study_timeline WHERE true {where}), u AS ({parts})
        SELECT pipeline, stage, count(*), quantile_cont(s, 0.5), quantile_cont(s, 0.9)
        FROM u GROUP BY ALL ORDER BY ALL
    """, params).fetchall()
    return [StageRow(p, s, int(n), float(a), float(b)) for p, s, n, a, b in rows]


@dataclass(frozen=True)
class WorklistRow:
    pipeline: str
    reader: str
    open_cases: int
    oldest_at: datetime | None


def open_worklist(con: Con, pipeline: str | None = None) -> list[WorklistRow]:
    """Cases assigned to a reader with no review by that reader since (per blinded label),
    of current results only (a superseded result is no longer a case)."""
    where, params = ("AND a.pipeline = ?", [pipeline]) if pipeline else ("", [])
    rows = con.execute(f"""
        SELECT a.pipeline, a.reader, count(*), min(a.occurred_at)
        FROM assignments a
        WHERE a.run_key NOT IN {SUPERSEDED_SQL} AND NOT EXISTS (
            SELECT 1 FROM reviews r WHERE r.run_key = a.run_key AND r.reader = a.reader
              AND r.blinded_label IS NOT DISTINCT FROM a.blinded_label AND r.seq > a.seq)
        {where}
        GROUP BY ALL ORDER BY ALL
    """, params).fetchall()
    return [WorklistRow(p, r, int(n), at) for p, r, n, at in rows]


def qc_pending(con: Con, pipeline: str | None = None) -> dict[str, int]:
    """Completed runs of pipelines with a QC gate that have no QC decision yet."""
    where, params = ("AND i.pipeline = ?", [pipeline]) if pipeline else ("", [])
    rows = con.execute(f"""
        SELECT i.pipeline, count(DISTINCT i.run_key) FROM inference i
        WHERE i.kind = 'completed' {where} AND i.run_key NOT IN {SUPERSEDED_SQL}
          AND i.pipeline IN (SELECT DISTINCT pipeline FROM qc)
          AND i.run_key NOT IN (SELECT run_key FROM qc)
        GROUP BY ALL
    """, params).fetchall()
    return {p: int(n) for p, n in rows}


# --------------------------------------------------------------------------- agreement


# --------------------------------------------------------------------------- reliability


@dataclass(frozen=True)
class LatencyRow:
    pipeline: str
    reason: str
    n: int
    p50_s: float
    p90_s: float


def completion_latency(con: Con, pipeline: str | None = None) -> list[LatencyRow]:
    """Study-completion latency (last instance to completion) per completion reason."""
    where, params = ("AND pipeline = ?", [pipeline]) if pipeline else ("", [])
    rows = con.execute(f"""
        SELECT pipeline, reason, count(*), quantile_cont(latency_s, 0.5),
               quantile_cont(latency_s, 0.9)
        FROM study_completions WHERE latency_s IS NOT NULL {where} GROUP BY ALL ORDER BY ALL
    """, params).fetchall()
    return [LatencyRow(p, r, int(n), float(a), float(b)) for p, r, n, a, b in rows]


# --------------------------------------------------------------------------- drift


@dataclass(frozen=True)
class WeeklyOutputRow:
    week: date
    feature: str
    n: int
    p10: float
    p50: float
    p90: float


def weekly_output(con: Con, pipeline: str) -> list[WeeklyOutputRow]:
    """Per week: quantiles of the AI score and of each AI volume (output drift charts)."""
    rows = con.execute("""
        SELECT CAST(date_trunc('week', occurred_at) AS DATE) AS week, 'score', count(*),
               quantile_cont(score, 0.1), quantile_cont(score, 0.5), quantile_cont(score, 0.9)
        FROM inference WHERE kind = 'completed' AND score IS NOT NULL AND pipeline = ?
        GROUP BY ALL
        UNION ALL
        SELECT CAST(date_trunc('week', occurred_at) AS DATE), 'volume:' || name, count(*),
               quantile_cont(value, 0.1), quantile_cont(value, 0.5), quantile_cont(value, 0.9)
        FROM measurements WHERE source = 'ai' AND unit = 'mL' AND pipeline = ? GROUP BY ALL
        ORDER BY 2, 1
    """, [pipeline, pipeline]).fetchall()
    return [WeeklyOutputRow(w, f, int(n), float(a), float(b), float(c))
            for w, f, n, a, b, c in rows]


@dataclass(frozen=True)
class AlertRow:
    seq: int
    occurred_at: datetime
    pipeline: str | None
    feature: str
    psi: float
    threshold: float
    window_start: str
    window_end: str


def drift_alerts(con: Con, pipeline: str | None = None) -> list[AlertRow]:
    where, params = ("AND pipeline = ?", [pipeline]) if pipeline else ("", [])
    rows = con.execute(f"""
        SELECT seq, occurred_at, pipeline, feature, psi, threshold, window_start, window_end
        FROM drift_alerts WHERE true {where} ORDER BY seq DESC
    """, params).fetchall()
    return [AlertRow(int(s), t, p, f, float(v), float(th), ws, we)
            for s, t, p, f, v, th, ws, we in rows]


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class PipelineChangeRow:
    seq: int
    occurred_at: datetime
    kind: str
    name: str
    version: str
    stage: str | None
    from_stage: str | None
    reason: str | None
    ae_title: str | None
    model_sha256: str | None


def pipeline_changes(con: Con, pipeline: str | None = None) -> list[PipelineChangeRow]:
    where, params = ("AND name = ?", [pipeline]) if pipeline else ("", [])
    rows = con.execute(f"""
        SELECT seq, occurred_at, kind, name, version, stage, from_stage, reason, ae_title,
               model_sha256
        FROM pipeline_changes WHERE true {where} ORDER BY seq
    """, params).fetchall()
    return [PipelineChangeRow(int(s), *rest) for s, *rest in rows]


@dataclass(frozen=True)
class ModelVersionRow:
    pipeline: str
    model_name: str
    model_version: str
    model_sha256: str | None
    runtime: str | None
    runs: int
    first_at: datetime
    last_at: datetime


def model_versions(con: Con, pipeline: str | None = None) -> list[ModelVersionRow]:
    """Which model versions actually ran (completed runs), when first and last."""
    where, params = ("AND pipeline = ?", [pipeline]) if pipeline else ("", [])
    rows = con.execute(f"""
        SELECT pipeline, model_name, model_version, any_value(model_sha256),
               string_agg(DISTINCT runtime, ', '), count(*), min(occurred_at), max(occurred_at)
        FROM inference WHERE kind = 'completed' {where}
        GROUP BY pipeline, model_name, model_version ORDER BY ALL
    """, params).fetchall()
    return [ModelVersionRow(p, m, v, h, r, int(n), a, b) for p, m, v, h, r, n, a, b in rows]
