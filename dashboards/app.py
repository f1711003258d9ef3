"""The Streamlit entry point: ``streamlit run dashboards/app.py`` (``lastmile up`` does it).

Shared sidebar filters (pipeline, model version, source AE, arrival dates) are drawn
here, before the page runs, so they keep their values from page to page; the
freshness line ("data as of event #N, T seconds ago") is on every page.
"""

from __future__ import annotations

from datetime import date

import streamlit as st

from dashboards import pages, ui
from dashboards import queries as Q
from dashboards.queries import Filters
from projections.errors import ProjectionsError

ALL = "(all)"

st.set_page_config(page_title="Lastmile governance", page_icon=":material/monitoring:",
                   layout="wide")


@st.cache_data(ttl=30, show_spinner=False)
def _options(db: str, seq: int) -> tuple[Q.Options, Q.Freshness]:
    from projections.duckdb_store import read_only

    with read_only(db, wait_s=ui.READ_WAIT_S) as con:
        return Q.options(con), Q.freshness(con)


def _filters(opts: Q.Options) -> Filters:
    sb = st.sidebar
    sb.header("Filters")
    pipeline = sb.selectbox("Pipeline", (ALL, *opts.pipelines), key="f_pipeline")
    version = sb.selectbox("Model version", (ALL, *opts.model_versions), key="f_version")
    ae = sb.selectbox("Site / source AE", (ALL, *opts.source_aes), key="f_ae")
    start: date | None = None
    end: date | None = None
    if opts.first_day and opts.last_day:
        picked = sb.date_input("Arrival dates (UTC)", value=(opts.first_day, opts.last_day),
                               min_value=opts.first_day, max_value=opts.last_day,
                               key="f_dates")
        if isinstance(picked, tuple) and len(picked) == 2:
            start = picked[0] if picked[0] != opts.first_day else None
            end = picked[1] if picked[1] != opts.last_day else None
    return Filters(None if pipeline == ALL else pipeline, None if version == ALL else version,
                   None if ae == ALL else ae, start, end)


def main() -> None:
    cfg = ui.config()
    try:
        seq = ui.checkpoint(cfg.duckdb_path)
    except ProjectionsError as exc:
        st.error(f"The read model cannot be read: {exc}")
        st.stop()
    opts, fresh = _options(str(cfg.duckdb_path), seq)
    filters = _filters(opts)
    st.session_state["lm_ctx"] = {"db": cfg.duckdb_path, "seq": seq, "filters": filters,
                                  "options": opts, "bus": cfg.bus}
    nav = st.navigation([
        st.Page(pages.overview, title="Overview", url_path="overview", default=True,
                icon=":material/dashboard:"),
        st.Page(pages.agreement, title="Agreement", url_path="agreement",
                icon=":material/fact_check:"),
        st.Page(pages.longitudinal, title="Longitudinal", url_path="longitudinal",
                icon=":material/timeline:"),
        st.Page(pages.drift, title="Drift", url_path="drift", icon=":material/ssid_chart:"),
        st.Page(pages.reliability, title="Reliability", url_path="reliability",
                icon=":material/build:"),
        st.Page(pages.audit, title="Audit", url_path="audit", icon=":material/history:"),
        st.Page(pages.models, title="Models", url_path="models", icon=":material/model_training:"),
    ])
    st.sidebar.caption(f"Showing {filters.describe()}.")
    ui.freshness_line(seq, fresh, ui.modified_at(cfg.duckdb_path))
    nav.run()


main()
