"""The read-model tables: one append-only fact table per kind of fact.

Every table starts with the same envelope columns (stream sequence, event id, when,
study, pipeline), so any row can be traced back to the event that made it and a
rebuild reproduces it exactly. Tables hold no wall-clock columns of their own
(nothing like "projected_at"): the same log always folds to the same content.

Derived views (one row per study, per inference run) are defined in SQL on top of
the facts, so they can never disagree with them.

Times are stored as naive ``TIMESTAMP`` in UTC (Arrow normalises aware datetimes
to UTC on the way in), so week boundaries never depend on the session time zone.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

S = pa.string()
I64 = pa.int64()
I32 = pa.int32()
F64 = pa.float64()
B = pa.bool_()
TS = pa.timestamp("us")

ENVELOPE: tuple[tuple[str, pa.DataType], ...] = (
    ("seq", I64),
    ("event_id", S),
    ("occurred_at", TS),
    ("study_uid", S),
    ("pipeline", S),
)


@dataclass(frozen=True)
class Table:
    """A fact table: its name, what one row means, and its columns after the envelope."""

    name: str
    doc: str
    columns: tuple[tuple[str, pa.DataType], ...]
    envelope: bool = True

    @property
    def all_columns(self) -> tuple[tuple[str, pa.DataType], ...]:
        return (ENVELOPE + self.columns) if self.envelope else self.columns

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema(list(self.all_columns))

    def ddl(self) -> str:
        cols = ", ".join(f'"{n}" {_SQL[t]}' for n, t in self.all_columns)
        return f"CREATE TABLE IF NOT EXISTS {self.name} ({cols})"


_SQL: dict[pa.DataType, str] = {
    S: "VARCHAR",
    I64: "BIGINT",
    I32: "INTEGER",
    F64: "DOUBLE",
    B: "BOOLEAN",
    TS: "TIMESTAMP",
}

TABLES: tuple[Table, ...] = (
    Table("instances", "one row per instance stored, rejected or duplicated", (
        ("kind", S),  # stored | rejected | duplicated
        ("sop_instance_uid", S),
        ("series_uid", S),
        ("calling_ae", S),
        ("called_ae", S),
        ("modality", S),
        ("series_description", S),
        ("manufacturer", S),
        ("manufacturer_model", S),
        ("institution", S),
        ("station_name", S),
        ("patient_pseudonym", S),
        ("patient_sex", S),
        ("age_band", S),
        ("size_bytes", I64),
        ("version", I32),
        ("pixel_spacing_mm", F64),
        ("reason", S),
        ("status_name", S),
    )),
    Table("series", "one row per series completed", (
        ("series_uid", S),
        ("reason", S),
        ("instance_count", I32),
        ("modality", S),
        ("series_description", S),
    )),
    Table("study_completions", "one row per study completed (per pipeline)", (
        ("reason", S),
        ("series_count", I32),
        ("instance_count", I32),
        ("latency_s", F64),
        ("first_instance_at", TS),
        ("last_instance_at", TS),
        ("patient_pseudonym", S),
    )),
    Table("study_amendments", "one row per study amended after completion", (
        ("new_instance_count", I32),
        ("series_count", I32),
        ("rerun", B),
    )),
    Table("routes", "one row per (route decision, pipeline); unmatched: pipeline null", (
        ("matched", B),
        ("route_pipeline", S),
        ("rule_ids", S),
        ("called_ae", S),
        ("reason", S),
    )),
    Table("pipeline_changes", "one row per pipeline deployed, stage changed or retired", (
        ("kind", S),  # deployed | stage_changed | retired
        ("name", S),
        ("version", S),
        ("stage", S),
        ("from_stage", S),
        ("reason", S),
        ("file_sha256", S),
        ("model_sha256", S),
        ("ae_title", S),
        ("runtime_target_s", F64),  # deployed: the pipeline file's targets.runtime_s
    )),
    Table("inference", "one row per inference requested, started, completed, skipped, failed", (
        ("run_key", S),
        ("kind", S),  # requested | started | completed | skipped | failed
        ("attempt", I32),
        ("worker_id", S),
        ("runtime", S),
        ("model_name", S),
        ("model_version", S),
        ("model_sha256", S),
        ("stage", S),
        ("duration_s", F64),
        ("inference_s", F64),
        ("score", F64),
        ("progression", B),
        ("operator", S),
        ("reason", S),  # skip reason, failure error, or what triggered a request
        ("final", B),
        ("patient_pseudonym", S),  # on completions: for longitudinal comparison
        ("study_date", S),  # on completions: YYYYMMDD, orders a patient's exams
    )),
    Table("operators", "one row per operator finished (timing)", (
        ("run_key", S),
        ("operator", S),
        ("idx", I32),
        ("duration_s", F64),
    )),
    Table("measurements", "one row per measurement: by the AI, or recomputed after an edit", (
        ("run_key", S),
        ("source", S),  # ai | edit
        ("edit_event_id", S),
        ("name", S),
        ("value", F64),
        ("unit", S),
        ("label", S),
    )),
    Table("findings", "one row per AI finding (label, class, probability)", (
        ("run_key", S),
        ("label", S),
        ("classification", S),
        ("probability", F64),
    )),
    Table("dice", "one row per (edit, label): Dice of the edited mask against the AI mask", (
        ("run_key", S),
        ("edit_event_id", S),
        ("label", S),
        ("dice", F64),
    )),
    Table("publications", "one row per result published or publish failed", (
        ("run_key", S),
        ("ok", B),
        ("destination", S),
        ("kind", S),
        ("attempt", I32),
        ("will_retry", B),
        ("error", S),
    )),
    Table("qc", "one row per QC decision", (
        ("run_key", S),
        ("passed", B),
        ("reason", S),
        ("seconds_on_case", F64),
    )),
    Table("assignments", "one row per case assigned to a reader", (
        ("run_key", S),
        ("reader", S),
        ("blinded_label", S),
    )),
    Table("reviews", "one row per review submitted", (
        ("run_key", S),
        ("reader", S),
        ("confidence", I32),
        ("seconds_on_case", F64),
        ("blinded_label", S),
        ("source", S),
    )),
    Table("review_reads", "one row per (review, finding label): the reader's read and verdict", (
        ("run_key", S),
        ("reader", S),
        ("label", S),
        ("read", S),
        ("agree", B),
        ("blinded_label", S),
    )),
    Table("edits", "one row per edit submitted (a corrected mask)", (
        ("run_key", S),
        ("reader", S),
        ("store_key", S),
        ("sha256", S),
        ("source", S),
    )),
    Table("drift_alerts", "one row per drift alert raised", (
        ("feature", S),
        ("psi", F64),
        ("threshold", F64),
        ("window_start", S),
        ("window_end", S),
        ("baseline_start", S),
        ("baseline_end", S),
    )),
    Table("dead_letters", "one row per delivery failed (dead letter)", (
        ("consumer", S),
        ("subject", S),
        ("stream_sequence", I64),
        ("deliveries", I32),
        ("reason", S),
        ("original_type", S),
    )),
    # ------------------------------------------------ completion evidence, one current result
    Table("associations", "one row per association opened, released or aborted (per study)", (
        ("association_id", S),
        ("kind", S),  # opened | released | aborted
        ("calling_ae", S),
        ("called_ae", S),
        ("aborted_by", S),
        ("instance_count", I32),
        ("duration_s", F64),
    )),
    Table("completion_evidence", "one row per study completed or amended: the evidence", (
        ("kind", S),  # completed | amended
        ("reason", S),
        ("partial", B),
        ("instance_count", I32),
        ("rerun", B),
        ("stale", B),
        ("pixels_changed", I32),
        ("evidence", S),  # one line per item
    )),
    Table("result_changes", "one row per result superseded, marked stale or withdrawn", (
        ("run_key", S),
        ("kind", S),  # superseded | stale | withdrawn
        ("superseded_by", S),
        ("reason", S),
        ("partial", B),
        ("destination", S),
    )),
    # ------------------------------------------------ live deployment, re-runs (issue 16)
    Table("study_runs_by_hand", "one row per study not run (no runnable pipeline) or "
          "re-run by hand", (
              ("kind", S),  # not_run | rerun_requested
              ("reason_code", S),  # not_run: not_deployed | retired | file_unavailable
              ("reason", S),  # not_run: why; rerun_requested: the why given
              ("actor", S),
          )),
    # issue 18: who signed in to the pages, who failed to, and which cases readers opened
    Table("access", "one row per sign-in, failed sign-in, session ended, password change "
          "or case viewed", (
              ("kind", S),  # signin | signin_failed | session_ended | password_changed | viewed
              ("user", S),  # null for a failed sign-in under a name that is not a user
              ("address", S),
              ("reason", S),  # the failure or end reason; the sign-in method; the page viewed
              ("run_key", S),
          )),
    Table("undecodable", "one row per message in the log that is not a valid event", (
        ("seq", I64),
        ("reason", S),
    ), envelope=False),
)

TABLE_BY_NAME: dict[str, Table] = {t.name: t for t in TABLES}

CHECKPOINT_DDL = (
    "CREATE TABLE IF NOT EXISTS checkpoint ("
    "projection VARCHAR PRIMARY KEY, last_sequence BIGINT NOT NULL, events BIGINT NOT NULL)"
)

#: run keys a later result replaced: metrics and worklists count only the current result
SUPERSEDED_SQL = "(SELECT run_key FROM result_changes WHERE kind = 'superseded')"

# Derived views: facts re-read, never stored twice.
VIEWS: tuple[tuple[str, str], ...] = (
    (
        "current_results",
        f"""
        WITH done AS (
            SELECT run_key, study_uid, pipeline, seq, occurred_at,
                   row_number() OVER (PARTITION BY study_uid, pipeline ORDER BY seq DESC) AS rn
            FROM inference
            WHERE kind = 'completed' AND run_key NOT IN {SUPERSEDED_SQL}
        ), trig AS (
            SELECT study_uid, pipeline, arg_max(partial, seq) AS partial
            FROM completion_evidence GROUP BY ALL
        ), before AS (
            SELECT study_uid, pipeline, count(*) AS superseded
            FROM result_changes WHERE kind = 'superseded' GROUP BY ALL
        )
        SELECT d.run_key, d.study_uid, d.pipeline, d.occurred_at AS completed_at,
               coalesce(t.partial, false) AS partial,
               d.run_key IN (SELECT run_key FROM result_changes WHERE kind = 'stale') AS stale,
               coalesce(b.superseded, 0) AS superseded_results
        FROM done d LEFT JOIN trig t USING (study_uid, pipeline)
        LEFT JOIN before b USING (study_uid, pipeline)
        WHERE d.rn = 1
        """,
    ),
    (
        "study_timeline",
        """
        WITH done AS (
            SELECT study_uid, pipeline, min(occurred_at) AS completed_at,
                   min(first_instance_at) AS first_instance_at,
                   any_value(patient_pseudonym) AS patient_pseudonym
            FROM study_completions GROUP BY ALL
        ), firsts AS (
            SELECT study_uid, min(occurred_at) AS first_stored_at
            FROM instances WHERE kind = 'stored' GROUP BY ALL
        ), inf AS (
            SELECT study_uid, pipeline, min(occurred_at) AS inference_completed_at
            FROM inference WHERE kind = 'completed' GROUP BY ALL
        ), pub AS (
            SELECT study_uid, pipeline, min(occurred_at) AS published_at
            FROM publications WHERE ok GROUP BY ALL
        ), rev AS (
            SELECT study_uid, pipeline, min(occurred_at) AS first_review_at
            FROM reviews GROUP BY ALL
        )
        SELECT d.study_uid, d.pipeline, d.patient_pseudonym,
               coalesce(d.first_instance_at, f.first_stored_at) AS first_instance_at,
               d.completed_at, i.inference_completed_at, p.published_at, r.first_review_at
        FROM done d
        LEFT JOIN firsts f USING (study_uid)
        LEFT JOIN inf i USING (study_uid, pipeline)
        LEFT JOIN pub p USING (study_uid, pipeline)
        LEFT JOIN rev r USING (study_uid, pipeline)
        """,
    ),
    (
        "inference_runs",
        """
        SELECT run_key, any_value(study_uid) AS study_uid, any_value(pipeline) AS pipeline,
               min(occurred_at) FILTER (kind = 'requested') AS requested_at,
               max(attempt) FILTER (kind = 'started') AS attempts,
               bool_or(kind = 'completed') AS completed,
               bool_or(kind = 'skipped') AS skipped,
               bool_or(kind = 'failed' AND final) AS failed,
               any_value(model_version) FILTER (kind = 'completed') AS model_version,
               any_value(duration_s) FILTER (kind = 'completed') AS duration_s,
               any_value(inference_s) FILTER (kind = 'completed') AS inference_s,
               any_value(score) FILTER (kind = 'completed') AS score,
               any_value(progression) FILTER (kind = 'completed') AS progression
        FROM inference GROUP BY run_key
        """,
    ),
    (
        "study_demographics",
        """
        SELECT study_uid,
               arg_min(patient_pseudonym, seq) AS patient_pseudonym,
               arg_min(patient_sex, seq) AS patient_sex,
               arg_min(age_band, seq) AS age_band,
               arg_min(manufacturer, seq) AS manufacturer,
               arg_min(manufacturer_model, seq) AS manufacturer_model,
               arg_min(institution, seq) AS institution,
               arg_min(calling_ae, seq) AS calling_ae,
               arg_min(called_ae, seq) AS called_ae
        FROM instances WHERE kind = 'stored' GROUP BY study_uid
        """,
    ),
)
