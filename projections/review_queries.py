"""Read-model queries for the review pages: a reader's worklist, the QC queue, and a
patient's prior results (BTS longitudinal).

The pages read DuckDB only through this module. A case is one completed inference run
(one per ``run_key``); a run superseded by a later completion of the same study and
pipeline (``engine.result.superseded``) is no longer offered; a partial or stale current
result is listed with that flag. The authoritative checks at submit time (stale, already
reviewed) are made on the event log by the pages; these queries only decide what to list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import duckdb

from projections.schema import SUPERSEDED_SQL

Con = duckdb.DuckDBPyConnection

_CURRENT = f"""
    WITH done AS (
        SELECT run_key, study_uid, pipeline, occurred_at, model_version, study_date,
               patient_pseudonym, seq,
               row_number() OVER (PARTITION BY study_uid, pipeline ORDER BY seq DESC) AS rn
        FROM inference WHERE kind = 'completed' AND run_key NOT IN {SUPERSEDED_SQL}
    ), current AS (
        SELECT d.* EXCLUDE (rn), coalesce(r.partial, false) AS partial,
               coalesce(r.stale, false) AS stale
        FROM done d LEFT JOIN current_results r USING (run_key) WHERE d.rn = 1
    ),
    qc_last AS (
        SELECT run_key, arg_max(passed, seq) AS passed FROM qc GROUP BY run_key
    )
"""


@dataclass(frozen=True)
class WorklistRow:
    run_key: str
    study_uid: str
    pipeline: str
    completed_at: datetime
    model_version: str | None
    study_date: str | None
    blinded_label: str | None
    partial: bool = False  # computed on a study completed at its maximum wait, incomplete
    stale: bool = False  # pixels changed after the result; the pipeline does not re-run


def worklist(con: Con, reader: str, pipelines: Sequence[str] = (),
             qc_pipelines: Sequence[str] = ("hfd",), limit: int = 200) -> list[WorklistRow]:
    """Cases assigned to ``reader`` (of ``pipelines``; empty = all), not yet reviewed by
    them, current, released by QC where the pipeline is gated; newest first."""
    rows = con.execute(_CURRENT + """
        SELECT c.run_key, c.study_uid, c.pipeline, c.occurred_at, c.model_version,
               c.study_date, any_value(a.blinded_label), c.partial, c.stale
        FROM current c
        JOIN assignments a ON a.run_key = c.run_key AND a.reader = $reader
        LEFT JOIN qc_last q ON q.run_key = c.run_key
        WHERE (len($pipelines) = 0 OR list_contains($pipelines, c.pipeline))
          AND (NOT list_contains($gated, c.pipeline) OR coalesce(q.passed, false))
          AND NOT EXISTS (SELECT 1 FROM reviews r
                          WHERE r.run_key = c.run_key AND r.reader = $reader)
        GROUP BY ALL
        ORDER BY c.occurred_at DESC, c.run_key
        LIMIT $limit
    """, {"reader": reader, "pipelines": list(pipelines), "gated": list(qc_pipelines),
          "limit": limit}).fetchall()
    return [WorklistRow(*r) for r in rows]


@dataclass(frozen=True)
class QcRow:
    run_key: str
    study_uid: str
    pipeline: str
    completed_at: datetime
    model_version: str | None
    partial: bool = False
    stale: bool = False


def qc_queue(con: Con, pipelines: Sequence[str] = ("hfd",), limit: int = 200) -> list[QcRow]:
    """Current results of gated pipelines without a QC decision, oldest first (first in,
    first out, as a QC desk works)."""
    rows = con.execute(_CURRENT + """
        SELECT c.run_key, c.study_uid, c.pipeline, c.occurred_at, c.model_version,
               c.partial, c.stale
        FROM current c LEFT JOIN qc_last q USING (run_key)
        WHERE list_contains($pipelines, c.pipeline) AND q.passed IS NULL
        ORDER BY c.occurred_at, c.run_key LIMIT $limit
    """, {"pipelines": list(pipelines), "limit": limit}).fetchall()
    return [QcRow(*r) for r in rows]


@dataclass(frozen=True)
class PriorRow:
    """One earlier (or this) result of the same patient, with a measurement and its
    change from the patient's first result and from the one before."""

    run_key: str
    study_uid: str
    study_date: str | None
    measurement: str
    value: float
    unit: str
    change_from_baseline_pct: float | None
    change_from_previous_pct: float | None


def priors(con: Con, patient_pseudonym: str, pipeline: str, *, up_to_date: str | None = None,
           measurement: str | None = None) -> list[PriorRow]:
    """The patient's results of ``pipeline`` up to ``up_to_date`` (YYYYMMDD), oldest
    first, with % change of each measurement against baseline and the previous exam.
    Uses the latest run per study and the AI's measurements (an edit's recomputed
    volume is shown by the case itself)."""
    rows = con.execute("""
        WITH runs AS (
            SELECT run_key, study_uid, study_date,
                   row_number() OVER (PARTITION BY study_uid ORDER BY seq DESC) AS rn
            FROM inference
            WHERE kind = 'completed' AND pipeline = $pipeline
              AND patient_pseudonym = $patient
              AND ($up_to IS NULL OR study_date <= $up_to)
        )
        SELECT r.run_key, r.study_uid, r.study_date, m.name, m.value, m.unit
        FROM runs r JOIN measurements m ON m.run_key = r.run_key AND m.source = 'ai'
        WHERE r.rn = 1 AND ($measurement IS NULL OR m.name = $measurement)
          AND m.unit <> '%'
        ORDER BY m.name, r.study_date NULLS LAST, r.study_uid
    """, {"pipeline": pipeline, "patient": patient_pseudonym, "up_to": up_to_date,
          "measurement": measurement}).fetchall()
    out: list[PriorRow] = []
    base: dict[str, float] = {}
    prev: dict[str, float] = {}
    for run_key, study, date, name, value, unit in rows:
        b, p = base.setdefault(name, value), prev.get(name)
        out.append(PriorRow(run_key, study, date, name, float(value), unit,
                            _pct(value, b) if name in prev else None,
                            _pct(value, p) if p is not None else None))
        prev[name] = value
    return out


def _pct(value: float, ref: float) -> float | None:
    return None if ref == 0 else round(100.0 * (value - ref) / ref, 1)


def reviewed_runs(con: Con, reader: str) -> list[tuple[str, str, datetime]]:
    """(run_key, study_uid, when) of the reader's own submitted reviews, newest first."""
    return [(r[0], r[1], r[2]) for r in con.execute("""
        SELECT run_key, study_uid, max(occurred_at) FROM reviews WHERE reader = ?
        GROUP BY ALL ORDER BY 3 DESC LIMIT 100
    """, [reader]).fetchall()]


@dataclass(frozen=True)
class BlindedRow:
    run_key: str
    study_uid: str
    completed_at: datetime
    rated: int  # masks this reader already rated


def blinded_worklist(con: Con, reader: str, pipeline: str, limit: int = 200) -> list[BlindedRow]:
    """Current runs of the blinded pipeline assigned to ``reader``, with how many masks
    they have rated (the page knows how many masks exist); newest first."""
    rows = con.execute(_CURRENT + """
        SELECT c.run_key, c.study_uid, c.occurred_at,
               (SELECT count(DISTINCT r.blinded_label) FROM reviews r
                WHERE r.run_key = c.run_key AND r.reader = $reader
                  AND r.blinded_label IS NOT NULL) AS rated
        FROM current c
        WHERE c.pipeline = $pipeline
          AND EXISTS (SELECT 1 FROM assignments a WHERE a.run_key = c.run_key
                      AND a.reader = $reader)
        ORDER BY c.occurred_at DESC, c.run_key LIMIT $limit
    """, {"reader": reader, "pipeline": pipeline, "limit": limit}).fetchall()
    return [BlindedRow(*r) for r in rows]
