"""Every metric at once, as `lastmile metrics` prints it and the dashboards read it."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from projections import metrics as M
from projections.drift import windows_following_data

DEFAULT_POSITIVE: dict[str, str] = {"hfd": "fracture", "bts": "progression"}
AGREEMENT_SUBGROUPS = ("scanner", "site", "sex", "age_band")


def all_metrics(con: M.Con, *, pipeline: str | None = None,
                positive: Mapping[str, str] = DEFAULT_POSITIVE,
                unblinding: Mapping[str, str] | None = None,
                now: datetime | None = None, drift_threshold: float = 0.2,
                baseline_weeks: int = 4, subgroups: bool = True) -> dict[str, Any]:
    """Named metric results (dataclasses). Agreement runs for pipelines with a positive
    class; blinded reads for pipelines whose reviews carry blinded labels."""
    out: dict[str, Any] = {
        "checkpoint": con.execute("SELECT last_sequence, events FROM checkpoint").fetchall(),
        "outcomes": M.outcomes(con, pipeline),
        "runtime": M.runtime(con, pipeline),
        "operator_timings": M.operator_timings(con, pipeline),
        "turnaround": M.turnaround(con, pipeline),
        "reasons": M.reasons(con, pipeline),
        "volume": M.volume(con, pipeline),
        "reviewer_time": M.reviewer_time(con, pipeline),
        "qc": M.qc_rates(con, pipeline),
        "dice": M.dice_summary(con, pipeline),
        "volume_agreement": M.volume_agreement(con, pipeline),
    }
    pipelines = [p for (p,) in con.execute(
        "SELECT DISTINCT pipeline FROM findings WHERE pipeline IS NOT NULL ORDER BY 1"
    ).fetchall() if pipeline in (None, p)]
    agreement: dict[str, Any] = {}
    for p in pipelines:
        if p not in positive:
            continue
        agreement[p] = {"overall": M.agreement(con, p, positive=positive[p])}
        if subgroups:
            for by in AGREEMENT_SUBGROUPS:
                agreement[p][by] = M.agreement_by_subgroup(con, p, by, positive=positive[p])
    out["agreement"] = agreement
    blinded = [p for (p,) in con.execute(
        "SELECT DISTINCT pipeline FROM reviews WHERE blinded_label IS NOT NULL ORDER BY 1"
    ).fetchall() if pipeline in (None, p)]
    out["blinded_reads"] = {p: M.blinded_reads(con, p, unblinding or {}) for p in blinded}
    out["longitudinal"] = M.longitudinal(con) if pipeline in (None, "bts") else []
    last = now or (con.execute("SELECT max(occurred_at) FROM instances").fetchone() or
                   (None,))[0]
    if last is not None:  # the same windows as the Drift page: they follow the data
        chosen = windows_following_data(con, last, baseline_weeks, pipeline)
        out["drift"] = {"baseline": chosen.baseline, "window": chosen.window,
                        "basis": chosen.basis, "note": chosen.note,
                        "rows": M.drift(con, baseline=chosen.baseline, window=chosen.window,
                                        threshold=drift_threshold, pipeline=pipeline)
                        if chosen.baseline and chosen.window else []}
    return out
