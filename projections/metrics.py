"""Named metric queries over the read model, shared by dashboards, `lastmile metrics` and tests.

Each function takes a DuckDB connection (from ``ProjectionStore.connection()`` or
``duckdb_store.read_only(path)``) and optional filters, and returns typed rows.
Statistics come from ``projections.stats`` and carry 95% CIs and their counts;
where a number would be wrong or meaningless they say "not enough data" and why.

Definitions (README, "Metrics", repeats them for the board):

- turnaround: per study and pipeline, seconds between first instance received,
  study completed, inference completed, first result published and first review;
  p50/p90 per pipeline per week of first arrival.
- runtime: InferenceCompleted.duration_s per pipeline and model version (mean,
  p50, p90, share of runs under a threshold with a Wilson CI).
- outcomes: finished runs (completed, final failure, skipped) and their rates;
  runs still in flight; redeliveries (InferenceStarted with attempt > 1); dead
  letters; reasons: skip reasons, failing operator and error, completion reasons.
- agreement: per finding label, a case is (run, label). AI class from the finding,
  readers' classes from ReviewSubmitted.reads (or the AI class where the reader
  agreed without a read of their own); a reader's latest review counts. Reference:
  the strict majority of readers ("consensus"; ties are no reference) or one named
  reader. The AI score for ROC is P(positive): the finding's probability if it
  called the positive class, else 1 - probability.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import date, datetime
from enum import Enum
from typing import Any

import duckdb
import numpy as np
from numpy.typing import NDArray

from projections.schema import SUPERSEDED_SQL
from projections.stats import (
    Accuracy,
    BlandAltman,
    Confusion,
    Stat,
    accuracy_from_counts,
    bland_altman,
    cohen_kappa_codes,
    fleiss_kappa,
    mean_ci,
    mean_ci_moments,
    psi,
    roc_auc,
    wilson,
)

Con = duckdb.DuckDBPyConnection

MIN_DRIFT_N = 30  # fewer observations in either window: PSI is noise, say so


def _where(pipeline: str | None, column: str = "pipeline") -> tuple[str, list[Any]]:
    if pipeline is None:
        return "", []
    return f" AND {column} = ?", [pipeline]


def jsonable(obj: Any) -> Any:
    """Dataclasses, Stats, dates -> plain JSON values (for --json and dashboards)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, datetime | date):
        return obj.isoformat()
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, float) and obj != obj:  # NaN
        return None
    return obj


# --------------------------------------------------------------------------- turnaround

STAGES = (
    ("arrival_to_complete", "first_instance_at", "completed_at"),
    ("complete_to_inference", "completed_at", "inference_completed_at"),
    ("inference_to_published", "inference_completed_at", "published_at"),
    ("published_to_first_review", "published_at", "first_review_at"),
    ("arrival_to_published", "first_instance_at", "published_at"),
)


@dataclass(frozen=True)
class TurnaroundRow:
    pipeline: str
    week: date
    stage: str
    n: int
    p50_s: float
    p90_s: float


def turnaround(con: Con, pipeline: str | None = None) -> list[TurnaroundRow]:
    where, params = _where(pipeline)
    parts = " UNION ALL ".join(
        f"SELECT pipeline, first_instance_at, '{name}' AS stage, "
        f"date_diff('millisecond', {a}, {b}) / 1000.0 AS s FROM t "
        f"WHERE {a} IS NOT NULL AND {b} IS NOT NULL"
        for name, a, b in STAGES
    )
    sql = f"""
        WITH t AS MATERIALIZED (
                SELECT * FROM study_timeline WHERE first_instance_at IS NOT NULL {where}),
             u AS ({parts})
        SELECT pipeline, CAST(date_trunc('week', first_instance_at) AS DATE) AS week, stage,
               count(*), quantile_cont(s, 0.5), quantile_cont(s, 0.9)
        FROM u GROUP BY ALL ORDER BY pipeline, week, stage
    """
    return [TurnaroundRow(p, w, s, int(n), float(a), float(b))
            for p, w, s, n, a, b in con.execute(sql, params).fetchall()]


# --------------------------------------------------------------------------- runtime


NO_RUNTIME_TARGET = "no runtime target: the pipeline file has no targets.runtime_s"


@dataclass(frozen=True)
class RuntimeRow:
    pipeline: str
    model_version: str
    n: int
    mean_s: float
    p50_s: float
    p90_s: float
    inference_mean_s: float
    under_threshold: Stat  # share of runs with duration <= threshold_s
    threshold_s: float | None  # the pipeline's target (s); None when its file names none


def runtime_targets(con: Con) -> dict[str, float]:
    """Each pipeline's runtime target (seconds) from its latest deployment: the
    pipeline file's ``targets.runtime_s``, carried by ``PipelineDeployed``. Pipelines
    whose latest deployment names no target are absent."""
    rows = con.execute("""
        SELECT name, arg_max(runtime_target_s, seq) FROM pipeline_changes
        WHERE kind = 'deployed' GROUP BY name
    """).fetchall()
    return {str(n): float(t) for n, t in rows if t is not None}


def runtime(con: Con, pipeline: str | None = None, threshold_s: float | None = None,
            ) -> list[RuntimeRow]:
    """Runtime (seconds, per completed run) per pipeline and model version, with the
    share of runs at or under the target: ``threshold_s`` when given, else each
    pipeline's own target (``runtime_targets``); without one the share is a Stat
    saying why there is none."""
    where, params = _where(pipeline)
    targets = runtime_targets(con)
    rows = con.execute(f"""
        SELECT pipeline, model_version, count(*), avg(duration_s),
               quantile_cont(duration_s, 0.5), quantile_cont(duration_s, 0.9),
               avg(inference_s), list(duration_s)
        FROM inference WHERE kind = 'completed' {where}
        GROUP BY ALL ORDER BY ALL
    """, params).fetchall()
    out = []
    for p, v, n, m, a, b, i, durations in rows:
        target = threshold_s if threshold_s is not None else targets.get(p)
        share = (wilson(sum(1 for d in durations if d is not None and d <= target), int(n))
                 if target is not None else Stat(None, n=int(n), reason=NO_RUNTIME_TARGET))
        out.append(RuntimeRow(p, v, int(n), float(m), float(a), float(b), float(i or 0.0),
                              share, target))
    return out


@dataclass(frozen=True)
class OperatorRow:
    pipeline: str
    operator: str
    n: int
    mean_s: float
    p50_s: float
    p90_s: float


def operator_timings(con: Con, pipeline: str | None = None) -> list[OperatorRow]:
    where, params = _where(pipeline)
    rows = con.execute(f"""
        SELECT pipeline, operator, count(*), avg(duration_s), quantile_cont(duration_s, 0.5),
               quantile_cont(duration_s, 0.9), min(idx)
        FROM operators WHERE true {where} GROUP BY pipeline, operator ORDER BY pipeline, 7
    """, params).fetchall()
    return [OperatorRow(p, o, int(n), float(m), float(a), float(b))
            for p, o, n, m, a, b, _ in rows]


# --------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class OutcomeRow:
    pipeline: str
    requested: int
    finished: int
    in_flight: int
    completed: int
    failed: int
    skipped: int
    success_rate: Stat
    failure_rate: Stat
    skip_rate: Stat
    redeliveries: int
    dead_letters: int


def outcomes(con: Con, pipeline: str | None = None) -> list[OutcomeRow]:
    where, params = _where(pipeline)
    rows = con.execute(f"""
        WITH runs AS (
            SELECT pipeline, run_key,
                   bool_or(kind = 'requested') AS req,
                   bool_or(kind = 'completed') AS ok,
                   bool_or(kind = 'failed' AND final) AS bad,
                   bool_or(kind = 'skipped') AS skip,
                   count(*) FILTER (kind = 'started' AND attempt > 1) AS redelivered
            FROM inference WHERE true {where} GROUP BY pipeline, run_key
        ), dead AS (
            SELECT pipeline, count(*) AS n FROM dead_letters WHERE true {where} GROUP BY ALL
        )
        SELECT r.pipeline, count(*) FILTER (req),
               count(*) FILTER (ok), count(*) FILTER (bad AND NOT ok),
               count(*) FILTER (skip AND NOT ok AND NOT bad),
               sum(redelivered), any_value(coalesce(d.n, 0))
        FROM runs r LEFT JOIN dead d USING (pipeline)
        GROUP BY r.pipeline ORDER BY r.pipeline
    """, params + params).fetchall()
    out = []
    for p, req, ok, bad, skip, redelivered, dead in rows:
        finished = int(ok + bad + skip)
        out.append(OutcomeRow(
            p, int(req), finished, max(0, int(req) - finished), int(ok), int(bad), int(skip),
            wilson(int(ok), finished), wilson(int(bad), finished), wilson(int(skip), finished),
            int(redelivered or 0), int(dead or 0)))
    return out


@dataclass(frozen=True)
class ReasonRow:
    pipeline: str | None
    kind: str  # skipped | failed | completion | dead_letter | publish_failed | qc_rejected
    #          | not_run (a completed study with no runnable pipeline; operator: the code,
    #            ``no_route`` for a study no routing rule matched, counted once per study)
    operator: str | None
    reason: str
    n: int


def reasons(con: Con, pipeline: str | None = None) -> list[ReasonRow]:
    where, params = _where(pipeline)
    # a study no routing rule matched has no pipeline: listed only when not filtering
    where_route, route_params = _where(pipeline, "route_pipeline")
    rows = con.execute(f"""
        SELECT pipeline, 'skipped', NULL, reason, count(*) FROM inference
            WHERE kind = 'skipped' {where} GROUP BY ALL
        UNION ALL
        SELECT pipeline, 'failed', operator, reason, count(*) FROM inference
            WHERE kind = 'failed' {where} GROUP BY ALL
        UNION ALL
        SELECT pipeline, 'completion', NULL, reason, count(*) FROM study_completions
            WHERE true {where} GROUP BY ALL
        UNION ALL
        SELECT pipeline, 'dead_letter', consumer, reason, count(*) FROM dead_letters
            WHERE true {where} GROUP BY ALL
        UNION ALL
        SELECT pipeline, 'publish_failed', destination, error, count(*) FROM publications
            WHERE NOT ok {where} GROUP BY ALL
        UNION ALL
        SELECT pipeline, 'qc_rejected', NULL, reason, count(*) FROM qc
            WHERE NOT passed {where} GROUP BY ALL
        UNION ALL
        SELECT pipeline, 'not_run', reason_code, reason, count(*) FROM study_runs_by_hand
            WHERE kind = 'not_run' {where} GROUP BY ALL
        UNION ALL
        SELECT NULL, 'not_run', 'no_route', reason, count(DISTINCT study_uid) FROM routes
            WHERE NOT matched {where_route} GROUP BY ALL
        ORDER BY 1, 2, 5 DESC
    """, params * 7 + route_params).fetchall()
    return [ReasonRow(p, k, o, r or "", int(n)) for p, k, o, r, n in rows]


# --------------------------------------------------------------------------- volume, readers, QC


@dataclass(frozen=True)
class VolumeRow:
    week: date
    pipeline: str
    calling_ae: str
    instances: int
    studies: int
    rejected: int
    duplicated: int
    megabytes: float


def volume(con: Con, pipeline: str | None = None) -> list[VolumeRow]:
    where, params = _where(pipeline, "pl")
    rows = con.execute(f"""
        WITH routed AS (
            SELECT DISTINCT study_uid, route_pipeline FROM routes WHERE matched
        ), i AS (
            SELECT i.*, coalesce(i.pipeline, r.route_pipeline, '(unrouted)') AS pl
            FROM instances i LEFT JOIN routed r USING (study_uid)
        )
        SELECT CAST(date_trunc('week', occurred_at) AS DATE), pl, calling_ae,
               count(*) FILTER (kind = 'stored'), count(DISTINCT study_uid) FILTER
               (kind = 'stored'), count(*) FILTER (kind = 'rejected'),
               count(*) FILTER (kind = 'duplicated'),
               coalesce(sum(size_bytes) FILTER (kind = 'stored'), 0) / 1e6
        FROM i WHERE true {where} GROUP BY ALL ORDER BY 1, 2, 3
    """, params).fetchall()
    return [VolumeRow(w, p, ae or "", int(a), int(b), int(c), int(d), float(mb))
            for w, p, ae, a, b, c, d, mb in rows]


@dataclass(frozen=True)
class ReaderTimeRow:
    pipeline: str
    reader: str
    reviews: int
    mean_s: Stat
    p50_s: float | None
    p90_s: float | None


def reviewer_time(con: Con, pipeline: str | None = None) -> list[ReaderTimeRow]:
    where, params = _where(pipeline)
    rows = con.execute(f"""
        SELECT pipeline, reader, count(*), list(seconds_on_case) FILTER
               (seconds_on_case IS NOT NULL),
               quantile_cont(seconds_on_case, 0.5), quantile_cont(seconds_on_case, 0.9)
        FROM reviews WHERE true {where} GROUP BY ALL ORDER BY ALL
    """, params).fetchall()
    return [ReaderTimeRow(p, r, int(n), mean_ci(xs or []),
                          None if a is None else float(a), None if b is None else float(b))
            for p, r, n, xs, a, b in rows]


@dataclass(frozen=True)
class QcRow:
    pipeline: str
    decisions: int
    rejected: int
    rejection_rate: Stat


def qc_rates(con: Con, pipeline: str | None = None) -> list[QcRow]:
    where, params = _where(pipeline)
    rows = con.execute(f"""
        WITH last AS (
            SELECT pipeline, run_key, arg_max(passed, seq) AS passed FROM qc
            WHERE true {where} GROUP BY ALL
        )
        SELECT pipeline, count(*), count(*) FILTER (NOT passed) FROM last
        GROUP BY ALL ORDER BY ALL
    """, params).fetchall()
    return [QcRow(p, int(n), int(k), wilson(int(k), int(n))) for p, n, k in rows]


# --------------------------------------------------------------------------- agreement

SUBGROUPS = {
    "scanner": "manufacturer_model",
    "manufacturer": "manufacturer",
    "site": "institution",
    "sex": "patient_sex",
    "age_band": "age_band",
}


@dataclass(frozen=True)
class AgreementData:
    """The cases of one pipeline as arrays: case i has the AI class ``ai[i]`` (a code into
    ``classes``), its probability, and ``reads[i, j]``, reader j's class code or -1."""

    classes: tuple[str, ...]
    readers: tuple[str, ...]
    ai: NDArray[np.int64]
    probability: NDArray[np.float64]  # NaN where the finding had none
    reads: NDArray[np.int64]  # cases x readers
    groups: NDArray[np.object_] | None = None
    run_keys: NDArray[np.object_] | None = None
    labels: NDArray[np.object_] | None = None

    def subset(self, mask: NDArray[np.bool_]) -> AgreementData:
        def pick(a: NDArray[np.object_] | None) -> NDArray[np.object_] | None:
            return None if a is None else a[mask]

        return AgreementData(self.classes, self.readers, self.ai[mask], self.probability[mask],
                             self.reads[mask], pick(self.groups), pick(self.run_keys),
                             pick(self.labels))

    def cases(self) -> list[Case]:
        """One ``Case`` per (run, label): for per-case views (ROC curves, case lists)."""
        out = []
        for i in range(self.ai.size):
            p = float(self.probability[i])
            out.append(Case(
                str(self.run_keys[i]) if self.run_keys is not None else str(i),
                str(self.labels[i]) if self.labels is not None else "",
                self.classes[int(self.ai[i])], None if p != p else p,
                {self.readers[j]: self.classes[int(c)]
                 for j, c in enumerate(self.reads[i]) if c >= 0},
                None if self.groups is None else str(self.groups[i])))
        return out

    @classmethod
    def from_cases(cls, cases: Sequence[Case]) -> AgreementData:
        classes = tuple(sorted({c.ai for c in cases} | {
            r for c in cases for r in c.reads.values()}))
        readers = tuple(sorted({r for c in cases for r in c.reads}))
        ci = {c: i for i, c in enumerate(classes)}
        matrix = np.full((len(cases), len(readers)), -1, dtype=np.int64)
        for i, case in enumerate(cases):
            for j, reader in enumerate(readers):
                if reader in case.reads:
                    matrix[i, j] = ci[case.reads[reader]]
        return cls(classes, readers,
                   np.array([ci[c.ai] for c in cases], dtype=np.int64),
                   np.array([np.nan if c.probability is None else c.probability
                             for c in cases], dtype=float), matrix,
                   None if not cases or cases[0].subgroup is None else
                   np.array([c.subgroup for c in cases], dtype=object),
                   np.array([c.run_key for c in cases], dtype=object),
                   np.array([c.label for c in cases], dtype=object))


@dataclass(frozen=True)
class Case:
    """One (run, finding label): the AI's class and probability, each reader's class."""

    run_key: str
    label: str
    ai: str
    probability: float | None
    reads: dict[str, str]
    subgroup: str | None = None


@dataclass(frozen=True)
class Agreement:
    pipeline: str
    label: str | None
    positive: str
    reference: str
    cases: int
    readers: tuple[str, ...]
    ai_vs_reader: dict[str, Stat]
    between_readers: dict[str, Stat]
    fleiss: Stat
    reference_cases: int
    confusion: Confusion | None
    accuracy: Accuracy | None
    auc: Stat
    subgroup: str | None = None
    subgroup_value: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


_CASES_SQL = f"""
    WITH f AS (
        SELECT run_key, label, arg_max(classification, seq) AS ai,
               arg_max(probability, seq) AS p, any_value(study_uid) AS study_uid
        FROM findings WHERE pipeline = $pipeline AND ($label IS NULL OR label = $label)
              AND run_key NOT IN {SUPERSEDED_SQL}
        GROUP BY run_key, label
    ), c AS (
        SELECT row_number() OVER (ORDER BY run_key, label) - 1 AS case_id, * FROM f
    )
"""


def load_agreement_data(con: Con, pipeline: str, label: str | None = None,
                        subgroup: str | None = None) -> AgreementData:
    """AI findings and each reader's latest unblinded read of the same label, as arrays.
    A reader who agreed without a read of their own is taken to have read the AI class."""
    column = None
    if subgroup is not None:
        if subgroup not in SUBGROUPS:
            raise ValueError(f"unknown subgroup {subgroup!r}: one of {sorted(SUBGROUPS)}")
        column = SUBGROUPS[subgroup]
    params = {"pipeline": pipeline, "label": label}
    group_sql = f"coalesce(d.{column}, '(unknown)')" if column else "NULL"
    cases = con.execute(_CASES_SQL + f"""
        SELECT c.ai, coalesce(c.p, 'NaN'::DOUBLE), {group_sql}, c.run_key, c.label
        FROM c LEFT JOIN study_demographics d USING (study_uid) ORDER BY c.case_id
    """, params).fetchnumpy()
    reads = con.execute(_CASES_SQL + """
        , r AS (
            SELECT run_key, label, reader, arg_max(read, seq) AS read,
                   arg_max(agree, seq) AS agree
            FROM review_reads
            WHERE pipeline = $pipeline AND ($label IS NULL OR label = $label)
                  AND blinded_label IS NULL
            GROUP BY ALL
        )
        SELECT c.case_id, r.reader, coalesce(r.read, CASE WHEN r.agree THEN c.ai END) AS cls
        FROM r JOIN c USING (run_key, label)
        WHERE coalesce(r.read, CASE WHEN r.agree THEN c.ai END) IS NOT NULL
    """, params).fetchnumpy()
    ai_names = np.asarray(list(cases.values())[0], dtype=object)
    read_names = np.asarray(reads["cls"], dtype=object)
    classes, codes = np.unique(np.concatenate([ai_names, read_names]).astype(str),
                               return_inverse=True)
    readers, reader_codes = np.unique(np.asarray(reads["reader"], dtype=str),
                                      return_inverse=True)
    n = ai_names.size
    matrix = np.full((n, len(readers)), -1, dtype=np.int64)
    if read_names.size:
        matrix[np.asarray(reads["case_id"], dtype=np.int64), reader_codes] = codes[n:]
    values = list(cases.values())
    return AgreementData(
        tuple(str(c) for c in classes), tuple(str(r) for r in readers),
        codes[:n].astype(np.int64), np.asarray(values[1], dtype=float), matrix,
        np.asarray(values[2], dtype=object) if column else None,
        np.asarray(values[3], dtype=object), np.asarray(values[4], dtype=object))


def load_cases(con: Con, pipeline: str, label: str | None = None,
               subgroup: str | None = None) -> list[Case]:
    """The same data as ``load_agreement_data``, one ``Case`` per (run, label)."""
    return load_agreement_data(con, pipeline, label, subgroup).cases()


def agreement_of(data: AgreementData | Sequence[Case], *, pipeline: str, positive: str,
                 reference: str = "consensus", label: str | None = None,
                 subgroup: str | None = None, subgroup_value: str | None = None,
                 ) -> Agreement:
    """All agreement statistics of one set of cases (pure: arrays or cases in, statistics
    out)."""
    if not isinstance(data, AgreementData):
        data = AgreementData.from_cases(data)
    k = len(data.classes)
    has = data.reads >= 0
    active = [j for j in range(len(data.readers)) if has[:, j].any()]
    readers = tuple(data.readers[j] for j in active)
    notes: list[str] = []
    ai_vs = {data.readers[j]: cohen_kappa_codes(data.ai[has[:, j]], data.reads[has[:, j], j], k)
             for j in active}
    between: dict[str, Stat] = {}
    for j1, j2 in itertools.combinations(active, 2):
        both = has[:, j1] & has[:, j2]
        between[f"{data.readers[j1]} vs {data.readers[j2]}"] = cohen_kappa_codes(
            data.reads[both, j1], data.reads[both, j2], k)
    counts = np.zeros((data.ai.size, max(k, 1)), dtype=np.int64)
    rows = np.nonzero(has)
    np.add.at(counts, (rows[0], data.reads[rows]), 1)
    if len(active) > 2:
        full = has[:, active].all(axis=1)
        fleiss = fleiss_kappa(counts[full]) if full.any() else Stat.missing(
            "no case was read by every reader")
    else:
        fleiss = Stat.missing(f"Fleiss' kappa needs more than two readers ({len(active)})")
    if reference == "consensus":
        n_reads = has.sum(axis=1)
        ref = counts.argmax(axis=1) if k else np.zeros(data.ai.size, dtype=np.int64)
        ok = (n_reads >= 2) & (counts.max(axis=1, initial=0) * 2 > n_reads)
    elif reference in data.readers and data.readers.index(reference) in active:
        ref = data.reads[:, data.readers.index(reference)]
        ok = ref >= 0
    else:
        notes.append(f"reference reader {reference!r} has no reads here")
        ref, ok = np.zeros(data.ai.size, dtype=np.int64), np.zeros(data.ai.size, dtype=bool)
    conf = acc = None
    auc = Stat.missing("no case has a reference read")
    n_ref = int(ok.sum())
    if n_ref:
        r, a = ref[ok], data.ai[ok]
        matrix = np.bincount(r * k + a, minlength=k * k).reshape(k, k)
        conf = Confusion(data.classes, tuple(tuple(int(x) for x in row) for row in matrix))
        pos = data.classes.index(positive) if positive in data.classes else -1
        rp, ap = r == pos, a == pos
        acc = accuracy_from_counts(positive, int((rp & ap).sum()), int((~rp & ap).sum()),
                                   int((rp & ~ap).sum()), int((~rp & ~ap).sum()))
        prob = data.probability[ok]
        scored = np.isfinite(prob)
        auc = roc_auc(rp[scored], np.where(ap, prob, 1.0 - prob)[scored]) if scored.any() \
            else Stat.missing("no AI probabilities")
    return Agreement(pipeline, label, positive, reference, int(data.ai.size), readers, ai_vs,
                     between, fleiss, n_ref, conf, acc, auc, subgroup, subgroup_value,
                     tuple(notes))


def agreement(con: Con, pipeline: str, *, positive: str, reference: str = "consensus",
              label: str | None = None) -> Agreement:
    """AI vs readers, readers vs each other, AI vs the reference standard (see module)."""
    return agreement_of(load_agreement_data(con, pipeline, label), pipeline=pipeline,
                        positive=positive, reference=reference, label=label)


def agreement_by_subgroup(con: Con, pipeline: str, by: str, *, positive: str,
                          reference: str = "consensus", label: str | None = None,
                          ) -> list[Agreement]:
    """The same statistics per scanner, site, sex or age band (``SUBGROUPS``)."""
    data = load_agreement_data(con, pipeline, label, subgroup=by)
    assert data.groups is not None
    return [agreement_of(data.subset(data.groups == value), pipeline=pipeline,
                         positive=positive, reference=reference, label=label, subgroup=by,
                         subgroup_value=str(value))
            for value in sorted(set(data.groups.tolist()))]


@dataclass(frozen=True)
class BlindedSourceRow:
    pipeline: str
    source: str  # e.g. ai | expert | novice, from the unblinding key; "(unknown key)"
    reads: int
    accepted: Stat
    confidence: Stat


def blinded_reads(con: Con, pipeline: str, unblinding: Mapping[str, str], *,
                  label: str = "mask", accept: str = "acceptable") -> list[BlindedSourceRow]:
    """Blinded comparison (LTS): readers rate masks under salted labels; the key (from
    configuration, never from the log) maps each label back to its source."""
    rows = con.execute("""
        WITH rd AS (
            SELECT event_id, read FROM review_reads
            WHERE pipeline = $pipeline AND blinded_label IS NOT NULL AND label = $label
        )
        SELECT r.blinded_label, count(*), count(rd.read), count(*) FILTER (rd.read = $accept),
               count(r.confidence), coalesce(sum(r.confidence), 0),
               coalesce(sum(r.confidence * r.confidence), 0)
        FROM reviews r LEFT JOIN rd USING (event_id)
        WHERE r.pipeline = $pipeline AND r.blinded_label IS NOT NULL
        GROUP BY r.blinded_label
    """, {"pipeline": pipeline, "label": label, "accept": accept}).fetchall()
    per: dict[str, list[int]] = defaultdict(lambda: [0] * 6)
    for blinded, *sums in rows:
        acc = per[unblinding.get(blinded, "(unknown key)")]
        for i, v in enumerate(sums):
            acc[i] += int(v)
    return [BlindedSourceRow(pipeline, source, n, wilson(accepted, rated),
                             mean_ci_moments(nc, sc, scc))
            for source, (n, rated, accepted, nc, sc, scc) in sorted(per.items())]


# --------------------------------------------------------------------------- masks, volumes


@dataclass(frozen=True)
class DiceRow:
    pipeline: str
    label: str
    mean: Stat
    median: float


#: edits by clinicians correcting the AI (our review pages, XNAT); masks drawn by the
#: reference readers of a blinded study ("expert", "novice") are not corrections
CLINICIAN_EDIT_SOURCES = ("lastmile", "xnat")
CLINICIAN_EDITS_SQL = ("(SELECT event_id FROM edits WHERE source IN ("
                       + ", ".join(f"'{s}'" for s in CLINICIAN_EDIT_SOURCES) + "))")


def dice_values(con: Con, pipeline: str | None = None) -> list[tuple[str, str, float]]:
    """(pipeline, label, dice) of every clinician's corrected mask, in log order: the
    distribution behind ``dice_summary`` (the dashboards plot it)."""
    where, params = _where(pipeline)
    return [(p, lb, float(d)) for p, lb, d in con.execute(f"""
        SELECT pipeline, label, dice FROM dice
        WHERE dice IS NOT NULL AND edit_event_id IN {CLINICIAN_EDITS_SQL} {where}
        ORDER BY seq
    """, params).fetchall()]


def dice_summary(con: Con, pipeline: str | None = None) -> list[DiceRow]:
    """Dice of each clinician's corrected mask against the AI mask, per label."""
    groups: defaultdict[tuple[str, str], list[float]] = defaultdict(list)
    for p, lb, d in dice_values(con, pipeline):
        groups[(p, lb)].append(d)
    return [DiceRow(p, lb, mean_ci(xs, bounds=(0.0, 1.0)), float(np.median(xs)))
            for (p, lb), xs in sorted(groups.items())]


@dataclass(frozen=True)
class VolumeAgreementRow:
    pipeline: str
    measurement: str
    unit: str
    pairs: int
    agreement: BlandAltman | Stat  # edited - AI; Stat when not enough data


def volume_pairs(con: Con, pipeline: str | None = None,
                 ) -> list[tuple[str, str, str, float, float]]:
    """(pipeline, measurement, unit, edited, AI) for every clinician's corrected mask, in
    log order: the pairs behind ``volume_agreement`` (the dashboards plot them)."""
    where, params = _where(pipeline, "e.pipeline")
    rows = con.execute(f"""
        WITH ai AS (
            SELECT run_key, name, arg_max(value, seq) AS value FROM measurements
            WHERE source = 'ai' GROUP BY ALL
        )
        SELECT e.pipeline, e.name, e.unit, e.value, ai.value
        FROM measurements e JOIN ai ON ai.run_key = e.run_key AND ai.name = e.name
        WHERE e.source = 'edit' AND e.edit_event_id IN {CLINICIAN_EDITS_SQL} {where}
        ORDER BY e.seq
    """, params).fetchall()
    return [(p, n, u or "", float(a), float(b)) for p, n, u, a, b in rows]


def volume_agreement(con: Con, pipeline: str | None = None) -> list[VolumeAgreementRow]:
    """Bland-Altman of the volume recomputed from each edited mask against the AI volume."""
    groups: dict[tuple[str, str], tuple[str, list[float], list[float]]] = {}
    for p, name, unit, edited, ai in volume_pairs(con, pipeline):
        _, e, a = groups.setdefault((p, name), (unit, [], []))
        e.append(edited)
        a.append(ai)
    return [VolumeAgreementRow(p, name, unit, len(e), bland_altman(e, a))
            for (p, name), (unit, e, a) in sorted(groups.items())]


# --------------------------------------------------------------------------- longitudinal


@dataclass(frozen=True)
class LongitudinalRow:
    patient_pseudonym: str
    study_uid: str
    at: datetime
    value: float
    from_baseline_pct: float | None
    from_prior_pct: float | None
    progression: bool | None


def longitudinal(con: Con, pipeline: str = "bts", measurement: str = "lesion_volume",
                 patient: str | None = None) -> list[LongitudinalRow]:
    """Per patient pseudonym, the AI measurement per exam with % change against the first
    (baseline) and the previous exam, and the AI's progression flag. Exams are ordered by
    study date where the result carries one (a prior imported late still sorts first),
    else by when the result was computed."""
    extra, params = ("", [pipeline, measurement])
    if patient is not None:
        extra = " AND patient_pseudonym = ?"
        params.append(patient)
    rows = con.execute(f"""
        WITH m AS (
            SELECT run_key, any_value(study_uid) AS study_uid, min(occurred_at) AS measured_at,
                   arg_max(value, seq) AS value
            FROM measurements WHERE source = 'ai' AND pipeline = ? AND name = ?
                  AND run_key NOT IN {SUPERSEDED_SQL}
            GROUP BY run_key
        ), ic AS (
            SELECT run_key, arg_max(patient_pseudonym, seq) AS ic_patient,
                   arg_max(study_date, seq) AS study_date
            FROM inference WHERE kind = 'completed' GROUP BY run_key
        ), p AS (
            SELECT study_uid, any_value(patient_pseudonym) AS patient_pseudonym
            FROM study_completions WHERE patient_pseudonym IS NOT NULL GROUP BY study_uid
        ), j AS (
            SELECT coalesce(ic.ic_patient, p.patient_pseudonym, d.patient_pseudonym)
                       AS patient_pseudonym,
                   coalesce(try_strptime(ic.study_date, '%Y%m%d'), m.measured_at) AS exam_at,
                   m.*, r.progression
            FROM m LEFT JOIN ic USING (run_key) LEFT JOIN p USING (study_uid)
            LEFT JOIN study_demographics d USING (study_uid)
            LEFT JOIN inference_runs r USING (run_key)
        )
        SELECT patient_pseudonym, study_uid, exam_at, value,
               first_value(value) OVER w AS base, lag(value) OVER w AS prior, progression
        FROM j WHERE patient_pseudonym IS NOT NULL {extra}
        WINDOW w AS (PARTITION BY patient_pseudonym ORDER BY exam_at, measured_at)
        ORDER BY patient_pseudonym, exam_at, measured_at
    """, params).fetchall()

    def pct(v: float, ref: float | None) -> float | None:
        return None if ref is None or ref == 0 else 100.0 * (v - ref) / ref

    out = []
    for pseud, study, at, value, base, prior, prog in rows:
        first = prior is None
        out.append(LongitudinalRow(pseud, study, at, float(value),
                                   None if first else pct(value, base),
                                   pct(value, prior), prog))
    return out


# --------------------------------------------------------------------------- drift

INPUT_FEATURES = ("manufacturer", "manufacturer_model", "modality", "series_description",
                  "pixel_spacing_mm")
OUTPUT_FEATURES = ("score",)  # plus every AI volume measurement, as "volume:<name>"


@dataclass(frozen=True)
class DriftRow:
    pipeline: str
    feature: str
    psi: float | None
    threshold: float
    alert: bool
    baseline_n: int
    window_n: int
    reason: str | None = None


#: the pipeline(s) a study's instances went to: a routing rule's match, or the study's
#: completion for a pipeline (instances sent to a pipeline's own AE title, as scanners
#: and the demo send them, have no routing decision); one row per (study, pipeline)
ROUTED_SQL = ("SELECT study_uid, route_pipeline AS pl FROM routes WHERE matched "
              "UNION SELECT study_uid, pipeline FROM study_completions "
              "WHERE pipeline IS NOT NULL")


def _categorical(con: Con, start: datetime, end: datetime,
                 ) -> dict[tuple[str, str], Counter[str]]:
    """Counts of every input feature's values per pipeline in [start, end): one scan."""
    parts = " UNION ALL ".join(
        f"SELECT pl, '{f}', coalesce({f}, '(none)'), count(*) FROM w GROUP BY ALL"
        for f in INPUT_FEATURES)
    rows = con.execute(f"""
        WITH routed AS ({ROUTED_SQL}),
        w AS MATERIALIZED (
            SELECT r.pl, manufacturer, manufacturer_model, modality,
                   series_description,
                   CAST(round(pixel_spacing_mm, 2) AS VARCHAR) AS pixel_spacing_mm
            FROM instances i JOIN routed r USING (study_uid)
            WHERE i.kind = 'stored' AND i.occurred_at >= ? AND i.occurred_at < ?
        )
        {parts}
    """, [start, end]).fetchall()
    out: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for pl, feature, value, n in rows:
        out[(pl, feature)][str(value)] += int(n)
    return out


def arrivals(con: Con, pipeline: str | None = None, start: datetime | None = None,
             end: datetime | None = None) -> tuple[int, datetime | None, datetime | None]:
    """(count, first, last) of the instances stored for ``pipeline`` (routed to it; None:
    any) with arrival time in [start, end) (None: unbounded); the drift windows are
    chosen from these, so a window is never one without data by accident."""
    row = con.execute(f"""
        WITH routed AS (SELECT DISTINCT study_uid FROM ({ROUTED_SQL})
                        WHERE $p IS NULL OR pl = $p)
        SELECT count(*), min(occurred_at), max(occurred_at)
        FROM instances i JOIN routed USING (study_uid)
        WHERE i.kind = 'stored' AND ($start IS NULL OR i.occurred_at >= $start)
          AND ($end IS NULL OR i.occurred_at < $end)
    """, {"p": pipeline, "start": start, "end": end}).fetchone()
    return (int(row[0]), row[1], row[2]) if row else (0, None, None)


def _numeric(con: Con, feature: str, pipeline: str, start: datetime, end: datetime,
             ) -> list[float]:
    if feature == "score":
        sql = ("SELECT score FROM inference WHERE kind = 'completed' AND score IS NOT NULL "
               f"AND run_key NOT IN {SUPERSEDED_SQL} "
               "AND pipeline = ? AND occurred_at >= ? AND occurred_at < ?")
        params: list[Any] = [pipeline, start, end]
    else:
        sql = ("SELECT value FROM measurements WHERE source = 'ai' AND name = ? "
               f"AND run_key NOT IN {SUPERSEDED_SQL} "
               "AND pipeline = ? AND occurred_at >= ? AND occurred_at < ?")
        params = [feature.removeprefix("volume:"), pipeline, start, end]
    return [float(v) for (v,) in con.execute(sql, params).fetchall()]


def _bins(baseline: list[float], window: list[float], k: int = 10) -> tuple[list[int], list[int]]:
    """Counts per decile of the baseline (edges from the baseline only)."""
    edges = np.unique(np.quantile(np.asarray(baseline), np.linspace(0, 1, k + 1))[1:-1])
    b = np.bincount(np.searchsorted(edges, baseline, side="right"), minlength=len(edges) + 1)
    w = np.bincount(np.searchsorted(edges, window, side="right"), minlength=len(edges) + 1)
    return b.tolist(), w.tolist()


def drift(con: Con, *, baseline: tuple[datetime, datetime], window: tuple[datetime, datetime],
          threshold: float = 0.2, pipeline: str | None = None) -> list[DriftRow]:
    """PSI of each input and output feature in ``window`` against ``baseline``."""
    pipelines = [pipeline] if pipeline else [p for (p,) in con.execute(
        f"SELECT DISTINCT pl FROM ({ROUTED_SQL}) ORDER BY 1").fetchall()]
    out: list[DriftRow] = []
    base_counts = _categorical(con, *baseline)
    window_counts = _categorical(con, *window)
    for p in pipelines:
        for feature in INPUT_FEATURES:
            b = base_counts.get((p, feature), Counter())
            w = window_counts.get((p, feature), Counter())
            keys = sorted(set(b) | set(w))
            out.append(_drift_row(p, feature, [b[k] for k in keys], [w[k] for k in keys],
                                  sum(b.values()), sum(w.values()), threshold))
        volumes = [f"volume:{n}" for (n,) in con.execute(
            "SELECT DISTINCT name FROM measurements WHERE source = 'ai' AND pipeline = ? "
            "AND unit = 'mL' ORDER BY 1", [p]).fetchall()]
        for feature in (*OUTPUT_FEATURES, *volumes):
            bv = _numeric(con, feature, p, *baseline)
            wv = _numeric(con, feature, p, *window)
            if not bv and not wv:
                continue
            if len(bv) < MIN_DRIFT_N or len(wv) < MIN_DRIFT_N:
                out.append(_drift_row(p, feature, [], [], len(bv), len(wv), threshold))
                continue
            bc, wc = _bins(bv, wv)
            out.append(_drift_row(p, feature, bc, wc, len(bv), len(wv), threshold))
    return out


def _drift_row(pipeline: str, feature: str, b: list[int], w: list[int], bn: int, wn: int,
               threshold: float) -> DriftRow:
    if bn < MIN_DRIFT_N or wn < MIN_DRIFT_N:
        return DriftRow(pipeline, feature, None, threshold, False, bn, wn,
                        f"not enough data: fewer than {MIN_DRIFT_N} observations in the "
                        f"baseline ({bn}) or the window ({wn})")
    value = psi(b, w)
    return DriftRow(pipeline, feature, value, threshold, value >= threshold, bn, wn)


@dataclass(frozen=True)
class WeeklyValueRow:
    week: date
    value: str
    n: int


def weekly_distribution(con: Con, feature: str, pipeline: str) -> list[WeeklyValueRow]:
    """Counts per week of one categorical input feature (for drift charts)."""
    if feature not in INPUT_FEATURES:
        raise ValueError(f"unknown input feature {feature!r}: one of {INPUT_FEATURES}")
    value = (f"CAST(round({feature}, 2) AS VARCHAR)" if feature == "pixel_spacing_mm"
             else feature)
    rows = con.execute(f"""
        WITH routed AS ({ROUTED_SQL})
        SELECT CAST(date_trunc('week', occurred_at) AS DATE), coalesce({value}, '(none)'),
               count(*)
        FROM instances i JOIN routed r USING (study_uid)
        WHERE i.kind = 'stored' AND r.pl = ? GROUP BY ALL ORDER BY 1, 2
    """, [pipeline]).fetchall()
    return [WeeklyValueRow(w, str(v), int(n)) for w, v, n in rows]
