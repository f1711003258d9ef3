"""The one-page governance report of one pipeline, as a self-contained HTML file (and,
printed by ``dashboards.report_pdf``, as PDF).

Headline figures (exams, success rate, runtime against the pipeline's target, agreement
and Dice with CIs) and plots as inline SVG, with the data's provenance (event number,
filters) in the header, so the page a board files is traceable to the log it came from.
Pure: values in, HTML text out.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from html import escape

import pandas as pd

from dashboards import svg
from dashboards.data import TURNAROUND_TARGET_S, AgreementData, Overview
from dashboards.queries import Filters
from projections.metrics import DiceRow
from projections.stats import Stat

CSS = """body{font-family:sans-serif;max-width:1180px;margin:24px auto;color:#222}
h1{font-size:22px;margin-bottom:2px}.meta{color:#666;font-size:12px;margin-bottom:14px}
.figs{display:flex;flex-wrap:wrap;gap:10px}.fig{border:1px solid #ddd;border-radius:6px;
padding:8px 12px;min-width:150px}.fig b{font-size:20px;display:block}.fig span{color:#666;
font-size:12px}.plots{display:flex;flex-wrap:wrap;gap:8px}table{border-collapse:collapse;
font-size:12px}td,th{border:1px solid #ddd;padding:3px 6px;text-align:right}
.plots svg{break-inside:avoid}
@media print{body{margin:0;max-width:none}.plots svg{width:49%;height:auto}
.figs,.fig,table{break-inside:avoid}}"""


def _stat(s: Stat | None, pct: bool = True) -> str:
    if s is None:
        return "—"
    if s.value is None:
        return escape(s.reason or "not enough data")
    f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.3f}")
    ci = f" [{f(s.low)}–{f(s.high)}]" if s.low is not None and s.high is not None else ""
    return f"{f(s.value)}{ci} <span>n={s.n}</span>"


def _duration(seconds: float) -> str:
    """Seconds as a person reads them: 42 s, 7.5 min, 23.4 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _week(w: object) -> str:
    """A week's first day as a reader writes it ("1 Jun 2026")."""
    ts = pd.Timestamp(w)  # type: ignore[arg-type]
    return f"{ts.day} {ts:%b %Y}"


def _fig(label: str, value: str) -> str:
    return f'<div class="fig"><span>{escape(label)}</span><b>{value}</b></div>'


def report_scope(pipeline: str, filters: Filters) -> str:
    """What the report covers: its own pipeline plus the sidebar's other filters (the
    sidebar's "all pipelines" never describes a one-pipeline report)."""
    return replace(filters, pipeline=pipeline).describe()


def governance_report(pipeline: str, overview: Overview, agreement: AgreementData | None,
                      filters: Filters, as_of_event: int, generated: datetime | None = None,
                      dice: list[DiceRow] | None = None) -> str:
    """One pipeline's report (HTML). ``agreement`` is None for pipelines without a
    positive class (e.g. LTS, read blinded); ``dice`` holds the Dice of clinicians'
    corrected masks against the AI's, per label (none: the pipeline draws no masks or
    none was corrected, said in the report)."""
    when = (generated or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    h = overview.headline.get(pipeline, {})
    figs = [
        _fig("exams", f"{h.get('exams', 0):,}"),
        _fig("success rate (95% CI)", _stat(h.get("success_rate"))),
    ]
    p50, p90 = h.get("runtime_p50_s"), h.get("runtime_p90_s")
    target = h.get("runtime_target_s")
    if p50 is not None and p90 is not None:
        figs.append(_fig("runtime p50 / p90", f"{p50:.1f} s / {p90:.1f} s"))
        figs.append(_fig(f"runs ≤ target {target:.0f} s" if target is not None else
                         "runs ≤ target", _stat(h.get("runtime_under_target"))))
    if agreement is not None and agreement.agreement.accuracy is not None:
        acc = agreement.agreement.accuracy
        figs.append(_fig("sensitivity", _stat(acc.sensitivity)))
        figs.append(_fig("specificity", _stat(acc.specificity)))
        figs.append(_fig("ROC AUC", _stat(agreement.agreement.auc, pct=False)))
        for pair, s in agreement.agreement.ai_vs_reader.items():
            figs.append(_fig(f"kappa AI vs {pair}", _stat(s, pct=False)))
    for d in dice or []:
        figs.append(_fig(f"Dice {d.label}, mean (95% CI)", _stat(d.mean, pct=False)))
    if not dice:
        figs.append(_fig("Dice (corrected vs AI mask)", "no corrected masks"))
    plots = []
    weekly = overview.weekly[overview.weekly["pipeline"] == pipeline]
    plots.append(svg.bar_chart("exams per week (from)", [_week(w) for w in weekly["week"]],
                               [("exams", list(weekly["exams"]))], "exams"))
    st = overview.stages[overview.stages["pipeline"] == pipeline] if not \
        overview.stages.empty else pd.DataFrame(columns=["stage", "p50_s", "p90_s"])
    # the 10-minute target is scan to result; a reader's first look (hours) is a figure,
    # not a bar that would flatten the machine's stages to nothing
    human = st[st["stage"].str.endswith("review")]
    for _, r in human.iterrows():
        figs.append(_fig(f"{str(r['stage']).replace('_', ' ')}, p50 / p90",
                         f"{_duration(r['p50_s'])} / {_duration(r['p90_s'])}"))
    st = st[~st["stage"].str.endswith("review")]
    if not st.empty:
        plots.append(svg.bar_chart(
            "turnaround by stage (s)", list(st["stage"]),
            [("p50", list(st["p50_s"])), ("p90", list(st["p90_s"]))], "seconds",
            target=TURNAROUND_TARGET_S))
    rt = overview.runtime[overview.runtime["pipeline"] == pipeline] if not \
        overview.runtime.empty else pd.DataFrame()
    if not rt.empty:
        plots.append(svg.bar_chart(
            "runtime per model version (s)", list(rt["model_version"]),
            [("p50", list(rt["p50_s"])), ("p90", list(rt["p90_s"]))], "seconds",
            target=float(target or 0) or None))
    if agreement is not None and agreement.roc:
        plots.append(svg.line_chart(
            "ROC (AI vs reference)", [p.fpr for p in agreement.roc],
            [("AI", [p.tpr for p in agreement.roc])], "sensitivity", "1 - specificity",
            diagonal=True, ymax=1.0))
    table = ""
    if agreement is not None and not agreement.confusion.empty:
        c = agreement.confusion.pivot(index="reference", columns="ai", values="n")
        table = ("<h3>Confusion matrix (rows: reference, columns: AI)</h3>"
                 + c.to_html(border=0))
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>Governance report: {escape(pipeline)}</title><style>{CSS}</style></head><body>
<h1>Governance report: pipeline {escape(pipeline)}</h1>
<div class="meta">data as of event #{as_of_event} · {escape(report_scope(pipeline, filters))} ·
generated {when} by Lastmile</div>
<div class="figs">{"".join(figs)}</div>
<h3>Plots</h3><div class="plots">{"".join(plots)}</div>{table}
<p class="meta">Intervals are 95% (Wilson for proportions; see the README's Metrics section).
Reference standard: strict majority of readers.</p></body></html>"""
