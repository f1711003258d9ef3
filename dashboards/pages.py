"""The seven pages. Each reads the shared filters, loads its data through ``ui.load``
(cached per checkpoint) and draws charts, each with its CSV."""

from __future__ import annotations

from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from dashboards import data as D
from dashboards import ui
from dashboards.curves import thin
from dashboards.event_log import history_json, pipeline_events, study_history
from dashboards.queries import Filters
from dashboards.report import governance_report, report_scope
from dashboards.report_pdf import report_pdf
from dashboards.text import plain
from events.errors import ConfigError, EventsError
from projections import metrics as M
from projections.config import ProjectionsConfig
from projections.drift import LAST_COMPLETE_WEEK
from projections.metrics import INPUT_FEATURES, SUBGROUPS
from projections.report import DEFAULT_POSITIVE

SUBGROUP_CHOICES = [s for s in ("site", "scanner", "sex", "age_band") if s in SUBGROUPS]
STAGE_LABELS = {
    "arrival_to_complete": "1 arrival → study complete",
    "complete_to_inference": "2 complete → inference done",
    "inference_to_published": "3 inference → result in PACS",
    "published_to_first_review": "4 result → first review",
}


def _ctx() -> dict[str, Any]:
    ctx: dict[str, Any] = st.session_state["lm_ctx"]
    return ctx


def _filters() -> Filters:
    f: Filters = _ctx()["filters"]
    return f


def _projections_config() -> ProjectionsConfig | None:
    """The projections' settings (positive classes, unblinding key); a bad setting is
    shown once and the defaults are used, rather than blanking the page."""
    try:
        return ProjectionsConfig.from_env()
    except ConfigError as exc:
        st.warning(f"projections settings: {exc}")
        return None


def _positive() -> dict[str, str]:
    cfg = _projections_config()
    return cfg.positive if cfg else dict(DEFAULT_POSITIVE)


NOT_APPLICABLE_MASKS = "Not applicable: {p} draws no masks (its results are findings), " \
    "so there is no mask to correct."


def _pick_pipeline(choices: list[str], key: str, label: str) -> str | None:
    """The sidebar's pipeline, or (sidebar on "All") the page's own choice, labelled for
    what it picks ("Agreement of pipeline") so a page never shows two "Pipeline" boxes."""
    f = _filters()
    if f.pipeline is not None:
        return f.pipeline if f.pipeline in choices else None
    if not choices:
        return None
    return st.selectbox(label, choices, key=key)


# --------------------------------------------------------------------------- overview


def overview() -> None:
    f = _filters()
    st.title("Overview")
    o = ui.load(D.overview_data, f)
    if not o.headline:
        st.info("No inference has been requested yet for the current filters.")
    cols = st.columns(max(1, len(o.headline)))
    for col, (p, h) in zip(cols, o.headline.items(), strict=False):
        with col.container(border=True, key=f"pipeline-{p}"):
            st.subheader(p.upper())
            a, b = st.columns(2)
            a.metric("exams", f"{h['exams']:,}")
            sr = h["success_rate"]
            b.metric("success rate", "—" if sr.value is None else f"{100 * sr.value:.1f}%",
                     help=ui.stat_text(sr, pct=True))
            if h["runtime_p50_s"] is not None:
                tgt = h["runtime_target_s"]
                v = f" · v{h['runtime_version']}" if h["runtime_versions"] > 1 else ""
                a.metric(f"runtime p50{v}", f"{h['runtime_p50_s']:.1f} s")
                b.metric(f"runtime p90{v}", f"{h['runtime_p90_s']:.1f} s",
                         delta=f"target {tgt:.0f} s" if tgt is not None else "no target",
                         delta_color="normal" if tgt is None or h["runtime_p90_s"] <= tgt
                         else "inverse", delta_arrow="off")
            st.caption(f"{h['finished']:,} runs finished · success "
                       f"{ui.stat_text(sr, pct=True)}")

    left, right = st.columns(2)
    with left:
        st.subheader("Exams per week")
        c = alt.Chart(o.weekly).mark_line(point=True).encode(
            x=alt.X("week:T", title="week"), y=alt.Y("exams:Q", title="exams"),
            color=alt.Color("pipeline:N"), tooltip=["week:T", "pipeline:N", "exams:Q"],
        ).properties(height=260)
        ui.chart(c, o.weekly, "exams_per_week")
    with right:
        st.subheader("Runtime against target")
        rt = o.runtime.copy()
        if not rt.empty:
            rt["target_s"] = rt["threshold_s"]
            rt["label"] = rt["pipeline"] + " " + rt["model_version"]
            long = rt.rename(columns={"p50_s": "p50", "p90_s": "p90"}).melt(
                id_vars=["label", "pipeline"], value_vars=["p50", "p90"], var_name="quantile",
                value_name="seconds")
            c = _runtime_chart(long, rt)
            ui.chart(c, rt[["pipeline", "model_version", "n", "mean_s", "p50_s", "p90_s",
                            "target_s", "under_threshold", "under_threshold_low",
                            "under_threshold_high"]], "runtime",
                     "Red line: the pipeline's runtime target (its pipeline file's "
                     "targets.runtime_s).")
        else:
            st.info("No completed inference for the current filters.")

    left, right = st.columns(2)
    with left:
        st.subheader("Turnaround by stage (median)")
        stg = o.stages[o.stages["stage"].isin(list(STAGE_LABELS)[:3])].copy() if not \
            o.stages.empty else o.stages
        c = None
        if not stg.empty:
            stg["stage_label"] = stg["stage"].map(STAGE_LABELS)
            stg["p50_min"] = stg["p50_s"] / 60.0
            # the scale follows the stages, not the 10-minute target: stages of seconds
            # against a 10-minute axis were slivers nobody could tell apart
            longest = float(stg.groupby("pipeline")["p50_min"].sum().max())
            target_min = D.TURNAROUND_TARGET_S / 60
            off_scale = longest * 2 < target_min
            domain = [0, longest * 1.1 if off_scale else max(longest, target_min) * 1.05]
            bars = alt.Chart(stg).mark_bar().encode(
                y=alt.Y("pipeline:N", title=None), x=alt.X(
                    "sum(p50_min):Q", title="minutes (median per stage)",
                    scale=alt.Scale(domain=domain)),
                color=alt.Color("stage_label:N", title="stage",
                                legend=alt.Legend(labelLimit=260)),
                order=alt.Order("stage:N"),
                tooltip=["pipeline:N", "stage_label:N", alt.Tooltip("p50_min:Q", format=".2f"),
                         alt.Tooltip("p90_s:Q", format=".0f", title="p90 (s)"), "n:Q"])
            rule = alt.Chart(pd.DataFrame({"t": [target_min]})).mark_rule(
                color="#d62728", strokeDash=[5, 3]).encode(x="t:Q")
            c = (bars if off_scale else bars + rule).properties(height=alt.Step(44))
        review = o.stages[o.stages["stage"] == "published_to_first_review"] if not \
            o.stages.empty else o.stages
        cap = "Red dashed line: results within 10 min of the scan (readers' request)." \
            if stg.empty or not off_scale else (
                f"Every pipeline is well inside the readers' 10-minute request (longest: "
                f"{longest:.1f} min in all), so the axis shows the stages, not the target.")
        if not review.empty:
            cap += " Then to first review, median: " + ", ".join(
                f"{r.pipeline} {r.p50_s / 3600:.1f} h" for r in review.itertuples())
        ui.chart(c, o.stages, "turnaround_stages", cap)
    with right:
        st.subheader("Open worklists")
        wl = o.worklist
        c = None
        if not wl.empty:
            c = alt.Chart(wl).mark_bar().encode(
                x=alt.X("open_cases:Q", title="cases assigned, not yet reviewed"),
                y=alt.Y("reader:N", title=None), color="pipeline:N",
                tooltip=["pipeline:N", "reader:N", "open_cases:Q", "oldest_at:T"],
            ).properties(height=220)
        pending = ", ".join(f"{p}: {n}" for p, n in o.qc_pending.items()) or "none"
        if wl.empty:
            st.success("No open cases: every case assigned to a reader has been reviewed.")
            st.caption(f"Waiting for a QC decision: {pending}.")
        else:
            ui.chart(c, wl, "open_worklist", f"Waiting for a QC decision: {pending}.")

    st.subheader("Governance report")
    pipes = list(o.headline)
    if pipes:
        p = st.selectbox("Report for pipeline", pipes, key="report_pipeline")
        positive = _positive()
        agr = ui.load(D.agreement_data, f, pipeline=p, positive=positive[p]) \
            if p in positive else None
        dice = ui.load(D.dice_data, f, pipeline=p)
        html = governance_report(p, o, agr, f, _ctx()["seq"], dice=dice)
        st.caption(f"Report of {report_scope(p, f)}: headline figures and plots as of "
                   f"event #{_ctx()['seq']}.")
        name = f"governance-{p}-event{_ctx()['seq']}"
        a, b = st.columns(2)
        a.download_button("Download the governance report (HTML)", html.encode(),
                          file_name=f"{name}.html", mime="text/html", key="report-download",
                          on_click="ignore", icon=":material/description:")
        # printed by Chromium only when asked for (a deferred download)
        b.download_button("Download the governance report (PDF)",
                          lambda: report_pdf(html), file_name=f"{name}.pdf",
                          mime="application/pdf", key="report-pdf-download",
                          on_click="ignore", icon=":material/picture_as_pdf:")


def _runtime_chart(long: pd.DataFrame, rt: pd.DataFrame) -> alt.VConcatChart:
    rows = []
    for label, part in long.groupby("label", sort=True):
        t = rt.loc[rt["label"] == label, "target_s"].iloc[0]
        target = None if pd.isna(t) else float(t)
        bars = alt.Chart(part).mark_bar().encode(
            y=alt.Y("quantile:N", title=None),
            x=alt.X("seconds:Q", title="seconds", scale=alt.Scale(
                domain=[0, max(target or 0.0, part["seconds"].max()) * 1.1])),
            color=alt.Color("quantile:N", legend=None),
            tooltip=[alt.Tooltip("seconds:Q", format=".1f"), "quantile:N"])
        if target is None:
            rows.append(bars.properties(title=f"{label} (no runtime target)", height=50))
            continue
        rule = alt.Chart(pd.DataFrame({"t": [target]})).mark_rule(
            color="#d62728", strokeWidth=2).encode(x="t:Q")
        rows.append((bars + rule).properties(title=str(label), height=50))
    return alt.vconcat(*rows).resolve_scale(x="independent")


# --------------------------------------------------------------------------- agreement


def agreement() -> None:
    f = _filters()
    st.title("Agreement")
    positive = _positive()
    choices = ui.load(_agreement_choices, f, positive=tuple(sorted(positive.items())))
    p = _pick_pipeline(choices, "agr_pipeline", "Agreement of pipeline")
    if p is None:
        st.info("No pipeline with findings and a positive class for the current filters "
                f"(positive classes: {positive}).")
        _blinded(f)
        return
    c1, c2 = st.columns(2)
    subgroup = c1.selectbox("Subgroups by", SUBGROUP_CHOICES, key="agr_subgroup")
    ref_choices = ["consensus", *ui.load(_readers, f, pipeline=p)]
    reference = c2.selectbox("Reference standard", ref_choices, key="agr_reference",
                             help="consensus = strict majority of readers")
    a = ui.load(D.agreement_data, f, pipeline=p, positive=positive[p], subgroup=subgroup,
                reference=reference)
    ag = a.agreement
    st.caption(f"{ag.cases:,} cases (run × finding label), {ag.reference_cases:,} with a "
               f"reference read; readers: {', '.join(ag.readers) or 'none'}; positive class: "
               f"{a.positive}.")
    cols = st.columns(5)
    for col, row in zip(cols, a.accuracy.itertuples(), strict=False):
        pct = row.measure != "ROC AUC"
        value = "—" if pd.isna(row.value) else (f"{100 * row.value:.1f}%" if pct
                                                else f"{row.value:.3f}")
        col.metric(row.measure, value, help=row.note or (
            f"95% CI {row.low:.3f}–{row.high:.3f}, n={row.n}"))
        if not pd.isna(row.value) and not pd.isna(row.low):
            col.caption(f"95% CI {_fmt(row.low, pct)}–{_fmt(row.high, pct)} · n={row.n}")

    left, right = st.columns(2)
    with left:
        st.subheader("Kappa with 95% CI")
        k = a.kappas.dropna(subset=["value"]) if not a.kappas.empty else a.kappas
        c = None
        if not k.empty:
            base = alt.Chart(k).encode(y=alt.Y("pair:N", title=None, sort=None,
                                             axis=alt.Axis(labelLimit=240)),
                                       color=alt.Color("kind:N", title=None))
            c = (base.mark_rule(strokeWidth=2).encode(x=alt.X("low:Q", title="kappa",
                                                              scale=alt.Scale(domain=[-0.2, 1])),
                                                      x2="high:Q")
                 + base.mark_point(filled=True, size=80).encode(
                     x="value:Q", tooltip=["pair:N", alt.Tooltip("value:Q", format=".3f"),
                                           alt.Tooltip("low:Q", format=".3f"),
                                           alt.Tooltip("high:Q", format=".3f"), "n:Q"])
                 ).properties(height=alt.Step(34))
        ui.chart(c, a.kappas, f"kappa_{p}")
    with right:
        st.subheader("Confusion matrix")
        c = None
        if not a.confusion.empty:
            base = alt.Chart(a.confusion).encode(
                x=alt.X("ai:N", title="AI"), y=alt.Y("reference:N", title="reference"))
            c = (base.mark_rect().encode(color=alt.Color("n:Q", scale=alt.Scale(
                scheme="blues"), legend=None))
                 + base.mark_text(fontSize=16).encode(
                     text="n:Q", color=alt.condition(alt.datum.n > a.confusion["n"].max() / 2,
                                                     alt.value("white"), alt.value("black")))
                 ).properties(height=260)
        ui.chart(c, a.confusion, f"confusion_{p}")

    left, right = st.columns(2)
    with left:
        st.subheader("ROC curve")
        roc = pd.DataFrame([{"fpr": r.fpr, "tpr": r.tpr, "threshold": r.threshold}
                            for r in a.roc])
        c = None
        if not roc.empty:
            roc["threshold"] = roc["threshold"].replace(float("inf"), None)
            drawn = pd.DataFrame([{"fpr": r.fpr, "tpr": r.tpr} for r in thin(a.roc)])
            diag = alt.Chart(pd.DataFrame({"x": [0, 1], "y": [0, 1]})).mark_line(
                strokeDash=[4, 3], color="#999").encode(x="x:Q", y="y:Q")
            c = (diag + alt.Chart(drawn).mark_line(interpolate="step-after").encode(
                x=alt.X("fpr:Q", title="1 − specificity"), y=alt.Y("tpr:Q", title="sensitivity"),
                tooltip=["fpr:Q", "tpr:Q"])).properties(height=280)
        ui.chart(c, roc, f"roc_{p}", f"AUC {ui.stat_text(ag.auc)}")
    with right:
        st.subheader("Sensitivity, specificity, PPV, NPV")
        acc = a.accuracy.dropna(subset=["value"])
        c = None
        if not acc.empty:
            base = alt.Chart(acc).encode(y=alt.Y("measure:N", title=None, sort=None))
            c = (base.mark_rule(strokeWidth=2).encode(
                x=alt.X("low:Q", scale=alt.Scale(domain=[0, 1]), title="value (95% CI)"),
                x2="high:Q")
                 + base.mark_point(filled=True, size=80).encode(
                     x="value:Q", tooltip=["measure:N", alt.Tooltip("value:Q", format=".3f"),
                                           "n:Q"])).properties(height=280)
        ui.chart(c, a.accuracy, f"accuracy_{p}")

    st.subheader(f"Subgroups by {subgroup}")
    sub = a.subgroups
    c = None
    if not sub.empty and "sensitivity" in sub:
        long = pd.concat([
            sub[["value", m, f"{m}_low", f"{m}_high", f"{m}_n"]].set_axis(
                ["group", "estimate", "low", "high", "n"], axis=1).assign(measure=m)
            for m in ("sensitivity", "specificity")]).dropna(subset=["estimate"])
        if not long.empty:
            base = alt.Chart(long).encode(y=alt.Y("group:N", title=subgroup),
                                          color=alt.Color("measure:N", title=None),
                                          yOffset="measure:N")
            c = (base.mark_rule(strokeWidth=2).encode(
                x=alt.X("low:Q", scale=alt.Scale(domain=[0, 1]), title="95% CI"), x2="high:Q")
                 + base.mark_point(filled=True, size=60).encode(
                     x="estimate:Q", tooltip=["group:N", "measure:N",
                                              alt.Tooltip("estimate:Q", format=".3f"),
                                              "n:Q"])).properties(height=alt.Step(36))
    ui.chart(c, sub, f"subgroups_{p}_{subgroup}")

    left, right = st.columns(2)
    with left:
        st.subheader("Dice of edited masks")
        c = None
        if not a.dice.empty:
            c = alt.Chart(a.dice).mark_bar().encode(
                x=alt.X("dice:Q", bin=alt.Bin(step=0.025), title="Dice (edited vs AI mask)"),
                y=alt.Y("count():Q", title="edits"), color="label:N").properties(height=260)
        ui.chart(c, a.dice, f"dice_{p}", empty=NOT_APPLICABLE_MASKS.format(p=p.upper())
                 if not a.draws_masks else "No clinician has corrected an AI mask yet.")
    with right:
        st.subheader("Bland–Altman: edited − AI volume")
        ba = a.bland_altman
        c = None
        if not ba.empty:
            pts = alt.Chart(ba).mark_circle(size=40, opacity=0.6).encode(
                x=alt.X("mean:Q", title="mean of edited and AI volume"),
                y=alt.Y("difference:Q", title="edited − AI"), color="measurement:N",
                tooltip=["measurement:N", "mean:Q", "difference:Q"])
            layers: list[alt.Chart] = [pts]
            stats = a.bland_altman_stats.dropna(subset=["bias"]) if not \
                a.bland_altman_stats.empty else a.bland_altman_stats
            for col_name, dash in (("bias", []), ("lower", [5, 3]), ("upper", [5, 3])):
                if not stats.empty:
                    layers.append(alt.Chart(stats).mark_rule(color="#d62728",
                                                             strokeDash=dash).encode(
                        y=f"{col_name}:Q", tooltip=[f"{col_name}:Q"]))
            c = alt.layer(*layers).properties(height=260)
        cap = "; ".join(f"{r.measurement}: bias {r.bias:.2f} {r.unit}, limits "
                        f"{r.lower:.2f} to {r.upper:.2f} (n={r.pairs})"
                        for r in a.bland_altman_stats.dropna(subset=["bias"]).itertuples()) \
            if not a.bland_altman_stats.empty else None
        ui.chart(c, ba, f"bland_altman_{p}", cap,
                 empty=NOT_APPLICABLE_MASKS.format(p=p.upper()) if not a.draws_masks
                 else "No clinician has corrected an AI mask yet.")
    _blinded(f)


def _blinded(f: Filters) -> None:
    """Blinded reads (LTS): readers rated masks under salted labels; the key that maps a
    label back to AI / expert / novice is configuration, never in the log."""
    cfg = _projections_config()
    key = cfg.unblinding() if cfg else {}
    b = ui.load(_blinded_rows, f, unblinding=tuple(sorted(key.items())))
    if b.empty:
        return
    st.subheader("Blinded reads: share of masks rated acceptable, by source")
    if not key:
        st.info("No unblinding key is configured (LASTMILE_UNBLINDING_KEY), so every "
                "blinded label shows as '(unknown key)'.")
    shown = b.dropna(subset=["accepted"])
    c = None
    if not shown.empty:
        base = alt.Chart(shown).encode(y=alt.Y("source:N", title=None),
                                       color=alt.Color("pipeline:N"))
        c = (base.mark_rule(strokeWidth=2).encode(
            x=alt.X("accepted_low:Q", scale=alt.Scale(domain=[0, 1]),
                    title="accepted (95% CI)"), x2="accepted_high:Q")
             + base.mark_point(filled=True, size=80).encode(
                 x="accepted:Q", tooltip=["pipeline:N", "source:N", "reads:Q",
                                          alt.Tooltip("accepted:Q", format=".3f"),
                                          alt.Tooltip("confidence:Q", format=".2f")])
             ).properties(height=alt.Step(34))
    ui.chart(c, b, "blinded_reads")


def _blinded_rows(con: Any, f: Filters, unblinding: tuple[tuple[str, str], ...],
                  ) -> pd.DataFrame:
    pipes = [p for (p,) in con.execute(
        "SELECT DISTINCT pipeline FROM reviews WHERE blinded_label IS NOT NULL ORDER BY 1"
    ).fetchall() if f.pipeline in (None, p)]
    rows = [r for p in pipes for r in M.blinded_reads(con, p, dict(unblinding))]
    return D.frame(rows)


def _fmt(v: float, pct: bool) -> str:
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def _agreement_choices(con: Any, f: Filters, positive: tuple[tuple[str, str], ...]) -> list[str]:
    return D.agreement_pipelines(con, dict(positive))


def _readers(con: Any, f: Filters, pipeline: str) -> list[str]:
    return [r for (r,) in con.execute(
        "SELECT DISTINCT reader FROM review_reads WHERE pipeline = ? AND blinded_label IS NULL "
        "ORDER BY 1", [pipeline]).fetchall()]


# --------------------------------------------------------------------------- longitudinal


def longitudinal() -> None:
    f = _filters()
    st.title("Longitudinal")
    names = ui.load(lambda_measurements, f)
    if f.pipeline:
        names = [n for n in names if n[0] == f.pipeline]
    if not names:
        st.info("No AI volume measurements for the current filters.")
        return
    c1, c2 = st.columns(2)
    default = names.index(("bts", "lesion_volume")) if ("bts", "lesion_volume") in names else 0
    pipe, meas = c1.selectbox("Measurement", names, index=default, key="lon_meas",
                              format_func=lambda n: f"{n[0]} · {n[1]}")
    threshold = c2.number_input("Progression threshold (% increase from baseline)",
                                min_value=1.0, max_value=500.0, value=25.0, step=5.0,
                                key="lon_threshold")
    df = ui.load(D.longitudinal_data, f, pipeline=pipe, measurement=meas)
    unit = ui.load(D.measurement_unit, f, pipeline=pipe, measurement=meas)
    axis = f"{meas.replace('_', ' ')} ({unit})" if unit else meas.replace("_", " ")
    if df.empty:
        st.info("No patient has this measurement for the current filters.")
        return
    counts = df.groupby("patient_pseudonym").size().sort_values(ascending=False)
    repeat = [p for p, n in counts.items() if n >= 2]
    st.caption(f"{df['patient_pseudonym'].nunique():,} patients (pseudonyms), "
               f"{len(repeat):,} with two or more exams; {len(df):,} exams.")
    chosen = st.multiselect("Patients (pseudonym)", repeat or list(counts.index),
                            default=(repeat or list(counts.index))[:4], key="lon_patients",
                            format_func=lambda p: p[:12])
    sel = df[df["patient_pseudonym"].isin(chosen)].copy()
    sel["patient"] = sel["patient_pseudonym"].str[:12]
    left, right = st.columns(2)
    with left:
        st.subheader("Volume trajectories")
        c = None
        if not sel.empty:
            base = sel.groupby("patient", as_index=False).first()[["patient", "value"]]
            base["threshold_value"] = base["value"] * (1 + threshold / 100)
            lines = alt.Chart(sel).mark_line(point=True).encode(
                x=alt.X("at:T", title="exam date (UTC)", axis=alt.Axis(format="%d %b %Y")),
                y=alt.Y("value:Q", title=axis),
                color=alt.Color("patient:N", legend=alt.Legend(orient="bottom")),
                tooltip=["patient:N", "at:T", "value:Q", "from_baseline_pct:Q",
                         "from_prior_pct:Q", "progression:N"])
            flags = alt.Chart(sel[sel["progression"] == True]).mark_point(  # noqa: E712
                shape="triangle-up", size=140, color="#d62728", filled=True).encode(
                x="at:T", y="value:Q", tooltip=["patient:N", "at:T", "value:Q"])
            rb = alt.Chart(base).mark_rule(strokeDash=[2, 2]).encode(
                y="value:Q", color="patient:N")
            rt = alt.Chart(base).mark_rule(strokeDash=[6, 3], opacity=0.7).encode(
                y="threshold_value:Q", color="patient:N")
            c = (rb + rt + lines + flags).properties(height=320)
        ui.chart(c, sel.drop(columns=["patient"]), f"trajectories_{pipe}_{meas}",
                 "Dotted: each patient's baseline; dashed: baseline + threshold; red "
                 "triangles: the AI flagged progression.")
    with right:
        st.subheader("Change from baseline and prior")
        c = None
        if not sel.empty:
            long = sel.melt(id_vars=["patient", "exam"], value_vars=[
                "from_baseline_pct", "from_prior_pct"], var_name="against",
                value_name="pct").dropna()
            c = (alt.Chart(long).mark_line(point=True).encode(
                x=alt.X("exam:O", title="exam number"), y=alt.Y("pct:Q", title="% change"),
                color="patient:N", strokeDash="against:N",
                tooltip=["patient:N", "exam:O", "against:N", alt.Tooltip("pct:Q", format=".1f")])
                 + alt.Chart(pd.DataFrame({"t": [threshold]})).mark_rule(
                     color="#d62728", strokeDash=[5, 3]).encode(y="t:Q")).properties(height=320)
        ui.chart(c, sel.drop(columns=["patient"]), f"change_{pipe}_{meas}",
                 f"Red dashed: progression threshold +{threshold:.0f}%.")
    st.subheader("All exams")
    ui.table(df, f"longitudinal_{pipe}_{meas}")


def lambda_measurements(con: Any, f: Filters) -> list[tuple[str, str]]:
    return D.measurement_names(con)


# --------------------------------------------------------------------------- drift


def drift() -> None:
    f = _filters()
    st.title("Drift")
    opts = _ctx()["options"]
    p = _pick_pipeline(list(opts.pipelines), "drift_pipeline", "Drift of pipeline")
    if p is None:
        st.info("No pipeline for the current filters.")
        return
    c1, c2, c3 = st.columns(3)
    feature = c1.selectbox("Input feature", INPUT_FEATURES, index=1, key="drift_feature")
    threshold = c2.number_input("PSI alert threshold", 0.05, 2.0, 0.2, 0.05, key="drift_thr")
    weeks = int(c3.number_input("Baseline weeks", 1, 26, 4, 1, key="drift_weeks"))
    d = ui.load(D.drift_data, f, pipeline=p, feature=feature, threshold=threshold,
                baseline_weeks=weeks)
    if d.note:  # the last complete week held no data: say so, and what is shown instead
        st.info(d.note)
    if d.window and d.baseline and d.basis == LAST_COMPLETE_WEEK:
        st.caption(f"Window: week of {d.window[0]:%Y-%m-%d}; baseline: "
                   f"{d.baseline[0]:%Y-%m-%d} to {d.baseline[1]:%Y-%m-%d} (the last complete "
                   "week against the weeks before it).")
    elif d.window and d.baseline:
        st.caption(f"Window: {d.window[0]:%Y-%m-%d %H:%M:%S} to {d.window[1]:%H:%M:%S} UTC; "
                   f"baseline: {d.baseline[0]:%Y-%m-%d %H:%M:%S} to "
                   f"{d.baseline[1]:%H:%M:%S} UTC (the latest arrivals against the ones "
                   "before them).")
    left, right = st.columns(2)
    with left:
        st.subheader("PSI per feature")
        psi = d.psi
        c = None
        if not psi.empty:
            shown = psi.dropna(subset=["psi"])
            if not shown.empty:
                c = (alt.Chart(shown).mark_bar().encode(
                    y=alt.Y("feature:N", title=None, axis=alt.Axis(labelLimit=220)),
                    x=alt.X("psi:Q", title="PSI"),
                    color=alt.Color("alert:N", scale=alt.Scale(domain=[False, True],
                                                               range=["#4c78a8", "#d62728"])),
                    tooltip=["feature:N", alt.Tooltip("psi:Q", format=".3f"), "baseline_n:Q",
                             "window_n:Q"])
                     + alt.Chart(pd.DataFrame({"t": [threshold]})).mark_rule(
                         color="#d62728", strokeDash=[5, 3]).encode(x="t:Q")
                     ).properties(height=260)
        missing = psi[psi["psi"].isna()] if not psi.empty else psi
        why = "; ".join(f"{r.feature}: {r.reason}" for r in missing.itertuples())
        ui.chart(c, psi, f"psi_{p}", why or None,
                 empty=f"No PSI could be computed for {p.upper()}: {why}." if why else
                 f"No PSI could be computed for {p.upper()}: no exams in the window.")
    with right:
        st.subheader(f"Input: {feature} per week")
        c = None
        if not d.inputs.empty:
            bars = alt.Chart(d.inputs).mark_bar().encode(
                x=alt.X("week:T", title="week"), y=alt.Y("n:Q", stack="normalize",
                                                         title="share of instances"),
                color=alt.Color("value:N", legend=alt.Legend(orient="bottom", columns=3)),
                tooltip=["week:T", "value:N", "n:Q"])
            layers: list[Any] = []
            if d.baseline and d.window:
                spans = pd.DataFrame([
                    {"start": d.baseline[0], "end": d.baseline[1], "span": "baseline"},
                    {"start": d.window[0], "end": d.window[1], "span": "window"}])
                layers.append(alt.Chart(spans).mark_rect(opacity=0.15).encode(
                    x="start:T", x2="end:T", color=alt.Color(
                        "span:N", scale=alt.Scale(range=["#999", "#d62728"]), legend=None)))
            c = alt.layer(bars, *layers).resolve_scale(color="independent").properties(
                height=260)
        ui.chart(c, d.inputs, f"input_{p}_{feature}", "Shaded: baseline (grey) and window "
                 "(red).")
    st.subheader("Outputs per week (p10–p90 band, median line)")
    out = d.outputs
    c = None
    if not out.empty:
        feats = sorted(out["feature"].unique())
        of = st.selectbox("Output", feats, key="drift_output")
        o1 = out[out["feature"] == of]
        c = (alt.Chart(o1).mark_area(opacity=0.25).encode(
            x=alt.X("week:T", title="week"), y=alt.Y("p10:Q", title=of), y2="p90:Q")
             + alt.Chart(o1).mark_line(point=True).encode(
                 x="week:T", y="p50:Q", tooltip=["week:T", "n:Q", "p10:Q", "p50:Q", "p90:Q"])
             ).properties(height=240)
    ui.chart(c, out, f"outputs_{p}")
    st.subheader("Drift alerts raised")
    ui.table(d.alerts, f"drift_alerts_{p}")


# --------------------------------------------------------------------------- reliability


def reliability() -> None:
    f = _filters()
    st.title("Reliability")
    r = ui.load(D.reliability_data, f)
    o = r.outcomes
    if not o.empty:
        cols = st.columns(4)
        cols[0].metric("runs finished", f"{int(o['finished'].sum()):,}")
        cols[1].metric("final failures", f"{int(o['failed'].sum()):,}")
        cols[2].metric("redeliveries", f"{int(o['redeliveries'].sum()):,}")
        cols[3].metric("dead letters", f"{int(o['dead_letters'].sum()):,}")
    left, right = st.columns(2)
    with left:
        st.subheader("Outcomes per pipeline")
        c = None
        if not o.empty:
            long = o.melt(id_vars=["pipeline"], value_vars=["completed", "failed", "skipped",
                                                            "in_flight"],
                          var_name="outcome", value_name="runs")
            c = alt.Chart(long).mark_bar().encode(
                y=alt.Y("pipeline:N", title=None), x=alt.X("runs:Q", stack="normalize",
                                                          title="share of runs"),
                color=alt.Color("outcome:N", scale=alt.Scale(
                    domain=["completed", "failed", "skipped", "in_flight"],
                    range=["#54a24b", "#d62728", "#f58518", "#bab0ac"]),
                    legend=alt.Legend(orient="bottom")),
                tooltip=["pipeline:N", "outcome:N", "runs:Q"]).properties(height=200)
        ui.chart(c, o, "outcomes")
    with right:
        st.subheader("Failures by operator and reason")
        fails = r.reasons[r.reasons["kind"] == "failed"] if not r.reasons.empty else r.reasons
        c = None
        if not fails.empty:
            c = alt.Chart(fails).mark_bar().encode(
                y=alt.Y("operator:N", title="operator"), x=alt.X("n:Q", title="failures"),
                color=alt.Color("reason:N", legend=alt.Legend(orient="bottom", columns=1)),
                tooltip=["pipeline:N", "operator:N", "reason:N", "n:Q"]).properties(height=200)
        ui.chart(c, fails, "failures")
    left, right = st.columns(2)
    with left:
        st.subheader("Study completion: reasons and latency")
        lat = r.latency
        c = None
        if not lat.empty:
            c = alt.Chart(lat).mark_bar().encode(
                y=alt.Y("reason:N", title=None, axis=alt.Axis(labelLimit=220)),
                x=alt.X("n:Q", title="studies"),
                color="pipeline:N",
                tooltip=["pipeline:N", "reason:N", "n:Q", alt.Tooltip("p50_s:Q", format=".1f"),
                         alt.Tooltip("p90_s:Q", format=".1f")]).properties(height=220)
        ui.chart(c, lat, "completion_latency",
                 "Latency: last instance to study completion (hover for p50/p90).")
    with right:
        st.subheader("Throughput per source AE")
        t = r.throughput
        c = None
        if not t.empty:
            c = alt.Chart(t).mark_line(point=True).encode(
                x=alt.X("week:T", title="week"), y=alt.Y("instances:Q", title="instances"),
                color=alt.Color("calling_ae:N", title="source AE"),
                tooltip=["week:T", "calling_ae:N", "instances:Q", "studies:Q",
                         alt.Tooltip("megabytes:Q", format=".0f"), "rejected:Q",
                         "duplicated:Q"]).properties(height=220)
        ui.chart(c, t, "throughput")
    st.subheader("Operator timings")
    op = r.operators
    c = None
    if not op.empty:
        c = alt.Chart(op).mark_bar().encode(
            y=alt.Y("operator:N", sort=None, title=None), x=alt.X("p50_s:Q", title="p50 (s)"),
            color="pipeline:N", yOffset="pipeline:N",
            tooltip=["pipeline:N", "operator:N", "n:Q", alt.Tooltip("p50_s:Q", format=".2f"),
                     alt.Tooltip("p90_s:Q", format=".2f")]).properties(height=260)
    ui.chart(c, op, "operator_timings")
    st.subheader("Studies completed with no runnable pipeline")
    not_run = (r.reasons[r.reasons["kind"] == "not_run"] if not r.reasons.empty
               else r.reasons)
    st.caption("Nothing ran for these: deploy the pipeline (or re-deploy its file where "
               "the worker can read it), then `lastmile study rerun UID --pipeline P --why`. "
               "`no_route`: sent to the general AE title and matched by no routing rule "
               "(add a rule, or send to the pipeline's own AE title).")
    ui.table(not_run.rename(columns={"operator": "reason_code"}), "not_run")
    st.subheader("Other reasons (skips, dead letters, publish failures, QC rejections)")
    other = (r.reasons[~r.reasons["kind"].isin(["failed", "not_run"])]
             if not r.reasons.empty else r.reasons)
    ui.table(other, "reasons")


# --------------------------------------------------------------------------- audit


def audit() -> None:
    st.title("Audit")
    ctx = _ctx()
    initial = st.query_params.get("study", "")
    uid = st.text_input("StudyInstanceUID", value=initial, key="audit_uid",
                        placeholder="e.g. 1.2.840.113619.2.55.3...").strip()
    if uid != initial:
        if uid:
            st.query_params["study"] = uid
        else:
            st.query_params.pop("study", None)
    if not uid:
        st.caption("Type a StudyInstanceUID, or link here with ?study=<UID>. Recent studies:")
        recent = ui.load(D.recent_studies, _filters())
        if not recent.empty:
            recent["link"] = "/audit?study=" + recent["study_uid"]
            st.dataframe(recent, hide_index=True, column_config={
                "link": st.column_config.LinkColumn("open", display_text="audit")})
        return
    known = ui.load(_study_summary, Filters(), study_uid=uid)
    if known:
        st.caption(" · ".join(f"{k.replace('_', ' ')}: {plain(v)}" for k, v in known.items()
                              if v is not None))
    bus = ctx["bus"]
    if bus is None:
        st.error("The event log is not configured for this dashboard.")
        return
    try:
        events = _history(bus, uid, ctx["seq"])
    except EventsError as exc:
        st.error(f"The event log cannot be read: {exc}")
        return
    if not events:
        st.warning(f"No events for study {plain(uid)} in the log.")
        return
    st.subheader(f"{len(events)} events")
    tl = pd.DataFrame([{"sequence": e.sequence, "occurred_at": e.occurred_at, "type": e.type,
                        "actor": e.actor, "pipeline": e.pipeline} for e in events])
    tl["occurred_at"] = pd.to_datetime(tl["occurred_at"])
    c = alt.Chart(tl).mark_circle(size=70).encode(
        x=alt.X("occurred_at:T", title="occurred (UTC)"),
        y=alt.Y("type:N", sort=None, title=None, axis=alt.Axis(labelLimit=320)),
        color=alt.Color("actor:N"),
        tooltip=["sequence:Q", "occurred_at:T", "type:N", "actor:N"]).properties(
        height=alt.Step(22))
    ui.chart(c, tl, "audit_timeline")
    st.download_button("Download this study's event history (JSON)",
                       history_json(uid, events).encode(), file_name=f"study-{uid}.json",
                       mime="application/json", key="audit-json", on_click="ignore",
                       icon=":material/download:")
    for e in events:
        with st.expander(f"#{e.sequence} · {plain(e.occurred_at)} · {plain(e.type)} · "
                         f"{plain(e.actor)}"):
            st.json(e.body)


@st.cache_data(ttl=30, show_spinner=False, max_entries=64)
def _history(_bus: Any, uid: str, seq: int) -> list[Any]:
    return study_history(_bus, uid)


def _study_summary(con: Any, f: Filters, study_uid: str) -> dict[str, Any]:
    return D.study_exists(con, study_uid)


# --------------------------------------------------------------------------- models


def models() -> None:
    f = _filters()
    ctx = _ctx()
    st.title("Models")
    m = ui.load(D.models_data, f)
    events = None
    if ctx["bus"] is not None:
        try:
            events = _pipeline_events(ctx["bus"], ctx["seq"])
        except EventsError as exc:
            st.warning(f"The event log cannot be read ({exc}); who deployed and model cards "
                       "are not shown.")
    if events is not None:
        ev = pd.DataFrame([vars(e) for e in events])
        if f.pipeline and not ev.empty:
            ev = ev[ev["name"] == f.pipeline]
    else:
        ev = m.changes
    st.subheader("Deployed now")
    if ev.empty:
        st.info("No pipeline has been deployed.")
    else:
        current = []
        for name, part in ev.groupby("name", sort=True):
            last = part.iloc[-1]
            dep = part[part["kind"] == "deployed"].iloc[-1] if (part["kind"] == "deployed").any() \
                else last
            current.append({"pipeline": name, "version": dep["version"],
                            "stage": "retired" if last["kind"] == "retired" else last["stage"],
                            "deployed_at": dep["occurred_at"],
                            "deployed_by": dep.get("actor", None),
                            "since": last["occurred_at"], "last_reason": last["reason"]})
        ui.table(pd.DataFrame(current), "pipelines_now")
        st.subheader("History: deployments, stage changes, retirements")
        hist = ev.drop(columns=[c for c in ("model_card",) if c in ev.columns])
        hist = hist.copy()
        hist["occurred_at"] = pd.to_datetime(hist["occurred_at"])
        c = alt.Chart(hist).mark_point(filled=True, size=120).encode(
            x=alt.X("occurred_at:T", title="when"), y=alt.Y("name:N", title=None),
            color=alt.Color("stage:N"), shape="kind:N",
            tooltip=[c for c in ("occurred_at:T", "name:N", "version:N", "kind:N", "stage:N",
                                 "actor:N", "reason:N") if c.split(":")[0] in hist.columns]
        ).properties(height=alt.Step(40))
        ui.chart(c, hist, "pipeline_history")
        st.dataframe(hist, hide_index=True)
    st.subheader("Model versions that ran")
    ui.table(m.versions, "model_versions")
    st.subheader("Model cards")
    if events is None:
        st.info("Model cards are named by the deployment events in the log, which is not "
                "reachable.")
        return
    cards = [e for e in events if e.kind == "deployed" and (not f.pipeline or
                                                             e.name == f.pipeline)]
    if not cards:
        st.info("No deployment for the current filters.")
    for e in cards:
        title = (f"{plain(e.name)} {plain(e.version)} · deployed {plain(e.occurred_at[:19])} "
                 f"by {plain(e.actor)}")
        with st.expander(title, expanded=len(cards) == 1):
            if e.model_card:
                st.text(e.model_card)  # as written: text from the log is never rendered
            elif e.model_card_path:
                st.caption(f"model card {plain(e.model_card_path)} is not readable from this "
                           "host")
            else:
                st.caption("this deployment names no model card")
            st.caption(f"model sha256 {plain(e.model_sha256 or '—')}")


@st.cache_data(ttl=30, show_spinner=False, max_entries=16)
def _pipeline_events(_bus: Any, seq: int) -> list[Any]:
    return pipeline_events(_bus, seq)
