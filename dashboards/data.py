"""What each page shows, as plain values and DataFrames, computed on one short-lived
read-only connection through ``projections.metrics`` (plus ``dashboards.queries``).

Each ``*_data(con, filters, ...)`` function is free of Streamlit so tests and the
report can call it; ``dashboards.ui.load`` runs it with caching keyed on the read
model's checkpoint, opening and closing the DuckDB file around each miss so the
projector is never kept waiting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pandas as pd

from dashboards import queries as Q
from dashboards.curves import BlandAltmanPoint, RocPoint, bland_altman_points, roc_of_cases
from dashboards.queries import Filters
from projections import metrics as M
from projections.drift import DriftWindows, windows_following_data
from projections.stats import Stat

# Runtime targets come from each pipeline file (``targets.runtime_s``, through
# ``PipelineDeployed`` and ``projections.metrics.runtime_targets``), the one place
# ``lastmile metrics`` also reads. Readers asked for results within 10 minutes of the scan.
TURNAROUND_TARGET_S = 600.0
TARGET_SHARE = 0.9


def stat_cols(prefix: str, s: Stat) -> dict[str, Any]:
    return {prefix: s.value, f"{prefix}_low": s.low, f"{prefix}_high": s.high,
            f"{prefix}_n": s.n, f"{prefix}_note": s.reason}


def frame(rows: list[Any]) -> pd.DataFrame:
    """Dataclass rows -> a DataFrame (Stats flattened into value/low/high/n columns)."""
    records = []
    for r in rows:
        rec: dict[str, Any] = {}
        for k, v in vars(r).items():
            if isinstance(v, Stat):
                rec.update(stat_cols(k, v))
            else:
                rec[k] = v
        records.append(rec)
    return pd.DataFrame.from_records(records)


# --------------------------------------------------------------------------- overview


@dataclass
class Overview:
    outcomes: pd.DataFrame
    runtime: pd.DataFrame
    weekly: pd.DataFrame  # week, pipeline, exams
    stages: pd.DataFrame  # pipeline, stage, p50_s, p90_s, n
    turnaround_weekly: pd.DataFrame
    worklist: pd.DataFrame
    qc_pending: dict[str, int]
    headline: dict[str, dict[str, Any]] = field(default_factory=dict)


def overview_data(con: M.Con, f: Filters) -> Overview:
    outcomes = M.outcomes(con, f.pipeline)
    runtime_rows: list[M.RuntimeRow] = []
    pipes = sorted({o.pipeline for o in outcomes})
    for p in pipes:
        runtime_rows += M.runtime(con, p)
    targets = M.runtime_targets(con)
    volume = frame(M.volume(con, f.pipeline))
    if volume.empty:
        weekly = pd.DataFrame(columns=["week", "pipeline", "exams"])
    else:
        weekly = (volume[volume["pipeline"] != "(unrouted)"]
                  .groupby(["week", "pipeline"], as_index=False)["studies"].sum()
                  .rename(columns={"studies": "exams"}))
    stages = frame(Q.turnaround_overall(con, f.pipeline))
    headline: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        rt = [r for r in runtime_rows if r.pipeline == o.pipeline]
        n = sum(r.n for r in rt)
        latest = max(rt, key=lambda r: _version_key(r.model_version)) if rt else None
        headline[o.pipeline] = {
            "exams": int(weekly.loc[weekly["pipeline"] == o.pipeline, "exams"].sum())
            if not weekly.empty else 0,
            "finished": o.finished, "completed": o.completed, "success_rate": o.success_rate,
            "runtime_version": latest.model_version if latest else None,
            "runtime_versions": len(rt),
            "runtime_p50_s": latest.p50_s if latest else None,
            "runtime_p90_s": latest.p90_s if latest else None,
            "runtime_target_s": targets.get(o.pipeline),
            "runtime_under_target": latest.under_threshold if latest else None,
            "runs_with_runtime": n,
        }
    return Overview(frame(outcomes), frame(runtime_rows), weekly, stages,
                    frame(M.turnaround(con, f.pipeline)), frame(Q.open_worklist(con, f.pipeline)),
                    Q.qc_pending(con, f.pipeline), headline)


def _version_key(v: str) -> tuple[tuple[int, int | str], ...]:
    """Order "1.10.0" after "1.9.2" (numeric parts numerically)."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in v.split("."))  # type: ignore[misc]


def dice_data(con: M.Con, f: Filters, pipeline: str) -> list[M.DiceRow]:
    """Dice of clinicians' corrected masks against the AI's, per label (the report)."""
    return M.dice_summary(con, pipeline)


# --------------------------------------------------------------------------- agreement


@dataclass
class AgreementData:
    pipeline: str
    positive: str
    agreement: M.Agreement
    kappas: pd.DataFrame  # pair, kind, kappa, low, high, n, note
    accuracy: pd.DataFrame  # measure, value, low, high, n, note
    confusion: pd.DataFrame  # reference, ai, n
    roc: list[RocPoint]
    subgroups: pd.DataFrame
    dice: pd.DataFrame  # pipeline, label, dice
    bland_altman: pd.DataFrame  # pipeline, measurement, unit, mean, difference
    bland_altman_stats: pd.DataFrame
    draws_masks: bool = True  # False: no AI volume (a detection pipeline): Dice does not apply


def draws_masks(con: M.Con, pipeline: str) -> bool:
    """Whether the pipeline's AI results carry a volume (mL), i.e. it draws masks, so the
    Dice and Bland–Altman of corrected masks apply to it (detection pipelines: no)."""
    row = con.execute("SELECT count(*) FROM measurements WHERE pipeline = ? AND source = 'ai' "
                      "AND unit = 'mL'", [pipeline]).fetchone()
    return bool(row and row[0])


def agreement_data(con: M.Con, f: Filters, pipeline: str, positive: str,
                   subgroup: str = "scanner", reference: str = "consensus") -> AgreementData:
    cases = M.load_agreement_data(con, pipeline)
    a = M.agreement_of(cases, pipeline=pipeline, positive=positive, reference=reference)
    kap = [{"pair": f"AI vs {r}", "kind": "AI vs reader", **_s(s)}
           for r, s in a.ai_vs_reader.items()]
    kap += [{"pair": k, "kind": "between readers", **_s(s)} for k, s in a.between_readers.items()]
    if len(a.readers) > 2:
        kap.append({"pair": "all readers (Fleiss)", "kind": "between readers", **_s(a.fleiss)})
    acc_rows = []
    if a.accuracy is not None:
        for name in ("sensitivity", "specificity", "ppv", "npv"):
            acc_rows.append({"measure": name.upper() if len(name) == 3 else name,
                             **_s(getattr(a.accuracy, name))})
    acc_rows.append({"measure": "ROC AUC", **_s(a.auc)})
    conf_rows = []
    if a.confusion is not None:
        labs = a.confusion.labels
        for i, ref in enumerate(labs):
            for j, ai in enumerate(labs):
                conf_rows.append({"reference": ref, "ai": ai, "n": a.confusion.matrix[i][j]})
    sub_rows = []
    for g in M.agreement_by_subgroup(con, pipeline, subgroup, positive=positive,
                                     reference=reference):
        row: dict[str, Any] = {"subgroup": subgroup, "value": g.subgroup_value,
                               "cases": g.cases, "reference_cases": g.reference_cases}
        first = next(iter(g.ai_vs_reader.values()), Stat.missing("no reader"))
        kappas = [s.value for s in g.ai_vs_reader.values() if s.value is not None]
        row["mean_ai_kappa"] = sum(kappas) / len(kappas) if kappas else None
        row.update(stat_cols("ai_kappa_first_reader", first))
        if g.accuracy is not None:
            row.update(stat_cols("sensitivity", g.accuracy.sensitivity))
            row.update(stat_cols("specificity", g.accuracy.specificity))
        row.update(stat_cols("auc", g.auc))
        sub_rows.append(row)
    dice = pd.DataFrame(M.dice_values(con, pipeline), columns=["pipeline", "label", "dice"])
    pairs = M.volume_pairs(con, pipeline)
    ba = pd.DataFrame(
        [(p, n, u, pt.mean, pt.difference) for (p, n, u, e, i) in pairs
         for pt in _ba(e, i)],
        columns=["pipeline", "measurement", "unit", "mean", "difference"])
    ba_stats = []
    for v in M.volume_agreement(con, pipeline):
        if isinstance(v.agreement, Stat):
            ba_stats.append({"measurement": v.measurement, "unit": v.unit, "pairs": v.pairs,
                             "bias": None, "lower": None, "upper": None,
                             "note": v.agreement.reason})
        else:
            b = v.agreement
            ba_stats.append({"measurement": v.measurement, "unit": v.unit, "pairs": v.pairs,
                             "bias": b.bias.value, "bias_low": b.bias.low,
                             "bias_high": b.bias.high, "lower": b.lower.value,
                             "upper": b.upper.value, "note": None})
    return AgreementData(pipeline, positive, a, pd.DataFrame(kap), pd.DataFrame(acc_rows),
                         pd.DataFrame(conf_rows), roc_of_cases(cases.cases(), positive, reference),
                         pd.DataFrame(sub_rows), dice, ba, pd.DataFrame(ba_stats),
                         draws_masks(con, pipeline))


def _ba(edited: float, ai: float) -> list[BlandAltmanPoint]:
    return bland_altman_points([edited], [ai])


def _s(s: Stat) -> dict[str, Any]:
    return {"value": s.value, "low": s.low, "high": s.high, "n": s.n, "note": s.reason}


def agreement_pipelines(con: M.Con, positive: dict[str, str]) -> list[str]:
    return [p for (p,) in con.execute(
        "SELECT DISTINCT pipeline FROM findings WHERE pipeline IS NOT NULL ORDER BY 1"
    ).fetchall() if p in positive]


# --------------------------------------------------------------------------- longitudinal


def longitudinal_data(con: M.Con, f: Filters, pipeline: str = "bts",
                      measurement: str = "lesion_volume") -> pd.DataFrame:
    df = frame(M.longitudinal(con, pipeline, measurement))
    if df.empty:
        return pd.DataFrame(columns=["patient_pseudonym", "study_uid", "at", "value",
                                     "from_baseline_pct", "from_prior_pct", "progression",
                                     "exam"])
    df["exam"] = df.groupby("patient_pseudonym").cumcount() + 1
    return df


def measurement_unit(con: M.Con, f: Filters, pipeline: str, measurement: str) -> str | None:
    """The unit (UCUM, as the AI result carries it: mL, %) of a pipeline's measurement."""
    row = con.execute("SELECT any_value(unit) FROM measurements WHERE pipeline = ? AND "
                      "name = ? AND source = 'ai'", [pipeline, measurement]).fetchone()
    return str(row[0]) if row and row[0] else None


def measurement_names(con: M.Con) -> list[tuple[str, str]]:
    return [(p, n) for p, n in con.execute(
        "SELECT DISTINCT pipeline, name FROM measurements WHERE source = 'ai' AND unit = 'mL' "
        "ORDER BY 1, 2").fetchall()]


# --------------------------------------------------------------------------- drift


@dataclass
class DriftData:
    pipeline: str
    baseline: tuple[datetime, datetime] | None
    window: tuple[datetime, datetime] | None
    psi: pd.DataFrame
    inputs: pd.DataFrame  # week, value, n (the chosen input feature)
    outputs: pd.DataFrame  # week, feature, n, p10, p50, p90
    alerts: pd.DataFrame
    basis: str | None = None  # projections.drift.LAST_COMPLETE_WEEK or LATEST_DATA
    note: str | None = None  # the last complete week held no data: what is shown instead


def drift_data(con: M.Con, f: Filters, pipeline: str, feature: str, threshold: float,
               baseline_weeks: int) -> DriftData:
    last = con.execute("SELECT max(occurred_at) FROM instances").fetchone()
    chosen = DriftWindows(None, None, None)
    psi = pd.DataFrame()
    if last and last[0] is not None:
        chosen = windows_following_data(con, last[0], baseline_weeks, pipeline)
        if chosen.baseline and chosen.window:
            psi = frame(M.drift(con, baseline=chosen.baseline, window=chosen.window,
                                threshold=threshold, pipeline=pipeline))
    return DriftData(pipeline, chosen.baseline, chosen.window, psi,
                     frame(M.weekly_distribution(con, feature, pipeline)),
                     frame(Q.weekly_output(con, pipeline)),
                     frame(Q.drift_alerts(con, pipeline)), chosen.basis, chosen.note)


# --------------------------------------------------------------------------- reliability


@dataclass
class ReliabilityData:
    outcomes: pd.DataFrame
    reasons: pd.DataFrame
    operators: pd.DataFrame
    latency: pd.DataFrame
    throughput: pd.DataFrame  # week, calling_ae, instances, studies, megabytes
    runtime: pd.DataFrame


def reliability_data(con: M.Con, f: Filters) -> ReliabilityData:
    volume = frame(M.volume(con, f.pipeline))
    if volume.empty:
        through = pd.DataFrame(columns=["week", "calling_ae", "instances", "studies",
                                        "rejected", "duplicated", "megabytes"])
    else:
        through = volume.groupby(["week", "calling_ae"], as_index=False)[
            ["instances", "studies", "rejected", "duplicated", "megabytes"]].sum()
    return ReliabilityData(frame(M.outcomes(con, f.pipeline)), frame(M.reasons(con, f.pipeline)),
                           frame(M.operator_timings(con, f.pipeline)),
                           frame(Q.completion_latency(con, f.pipeline)), through,
                           frame(M.runtime(con, f.pipeline)))


# --------------------------------------------------------------------------- models


@dataclass
class ModelsData:
    changes: pd.DataFrame
    versions: pd.DataFrame


def models_data(con: M.Con, f: Filters) -> ModelsData:
    return ModelsData(frame(Q.pipeline_changes(con, f.pipeline)),
                      frame(Q.model_versions(con, f.pipeline)))


def study_exists(con: M.Con, study_uid: str) -> dict[str, Any]:
    """What the read model knows about one study (shown above its event timeline)."""
    row = con.execute("""
        SELECT any_value(pipeline), min(first_instance_at), min(completed_at),
               min(inference_completed_at), min(published_at), min(first_review_at)
        FROM study_timeline WHERE study_uid = ?
    """, [study_uid]).fetchone()
    keys = ("pipeline", "first_instance_at", "completed_at", "inference_completed_at",
            "published_at", "first_review_at")
    return dict(zip(keys, row, strict=True)) if row and row[0] is not None else {}


def recent_studies(con: M.Con, f: Filters, limit: int = 50) -> pd.DataFrame:
    where, params = ("AND pipeline = ?", [f.pipeline]) if f.pipeline else ("", [])
    return con.execute(f"""
        SELECT study_uid, pipeline, completed_at FROM study_timeline WHERE true {where}
        ORDER BY completed_at DESC NULLS LAST LIMIT {int(limit)}
    """, params).df()
