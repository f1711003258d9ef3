"""The Streamlit entry point: ``streamlit run dashboards/app.py`` (``lastmile up`` does it).

Every page needs a user signed in at the pages' front (``dashboards.front``; checked in
``dashboards.review.session``): governance pages the
governance role, the worklist, case and blinded pages the reader role, the QC gate the
qc role. All pages are routed (so a PACS deep link such as ``/case?study=UID`` survives
sign-in); the sidebar lists only the pages the user's roles open.

Shared sidebar filters (pipeline, model version, source AE, arrival dates) are drawn
here, before the page runs, so they keep their values from page to page; the
freshness line ("data as of event #N, T seconds ago") is on every page.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import date

import streamlit as st

from dashboards import pages, ui
from dashboards import queries as Q
from dashboards.queries import Filters
from dashboards.review import blinded_page, session
from dashboards.review import pages as review
from dashboards.review.auth import Role, User
from dashboards.text import plain
from projections.errors import ProjectionsError

ALL = "(all)"
REVIEW_PAGES = (
    (review.worklist_page, "Worklist", "worklist", ":material/inbox:"),
    (review.case_page, "Case", "case", ":material/radiology:"),
    (review.qc_page, "QC gate", "qc", ":material/rule:"),
    (blinded_page.blinded_page, "Blinded reading", "blinded", ":material/visibility_off:"),
)
PAGE_ROLES: dict[str, Role] = {  # in the order the sidebar lists them
    **dict.fromkeys(("overview", "agreement", "longitudinal", "drift", "reliability", "audit",
                     "models"), Role.GOVERNANCE),
    "worklist": Role.READER, "case": Role.READER, "qc": Role.QC, "blinded": Role.READER,
}

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


GOVERNANCE_PAGES = (
    (pages.overview, "Overview", "overview", ":material/dashboard:"),
    (pages.agreement, "Agreement", "agreement", ":material/fact_check:"),
    (pages.longitudinal, "Longitudinal", "longitudinal", ":material/timeline:"),
    (pages.drift, "Drift", "drift", ":material/ssid_chart:"),
    (pages.reliability, "Reliability", "reliability", ":material/build:"),
    (pages.audit, "Audit", "audit", ":material/history:"),
    (pages.models, "Models", "models", ":material/model_training:"),
)


def _governance(fn: Callable[[], None], title: str) -> Callable[[], None]:
    """A governance page, shown only to the governance role (or admin)."""

    @functools.wraps(fn)
    def page() -> None:
        ctx = st.session_state["lm_ctx"]
        user: User = ctx["user"]
        if not user.has(Role.GOVERNANCE):
            st.title(title)
            session.require(user, Role.GOVERNANCE, f"The {title} page")
        fn()

    return page


def home(user: User | None) -> str:
    """The page a user lands on at the root URL: the Overview for governance, else the
    worklist (readers) or the QC gate (qc)."""
    if user is not None and not user.has(Role.GOVERNANCE):
        return "worklist" if user.has(Role.READER) else "qc" if user.has(Role.QC) \
            else "overview"
    return "overview"


def _pages(user: User | None) -> tuple[dict[str, st.Page], list[str]]:
    """Every page (so any URL resolves and a wrong role gets a clear message) and, in
    order, the ones this user's roles open (the navigation shown).

    The default page is always the Overview, whoever signs in: Streamlit serves its
    default page at the root only (its ``url_path`` is ""), so a user-dependent default
    made ``/qc`` or ``/worklist`` "Page not found" for the very user whose home it is (a
    modal dialog that left the page's buttons inert). ``main`` sends a user without the
    governance role from the root to ``home(user)`` instead."""
    out: dict[str, st.Page] = {}
    # Streamlit serves the default page at the root and answers its own path ("/overview")
    # with "Page not found": the root is a page of its own ("home") that draws the Overview
    for fn, title, path, icon in GOVERNANCE_PAGES:
        out[path] = st.Page(_governance(fn, title), title=title, url_path=path, icon=icon,
                            default=False)
        if path == "overview":
            out["home"] = st.Page(_governance(fn, title), title=title, url_path="home",
                                  icon=icon, default=True)
    for fn, title, path, icon in REVIEW_PAGES:
        out[path] = st.Page(fn, title=title, url_path=path, icon=icon, default=False)
    if user is None:
        return out, []
    allowed = [p for p, role in PAGE_ROLES.items() if user.has(role)]
    return out, allowed


def main() -> None:
    cfg = ui.config()
    rcfg = session.review_config()
    user = session.current_user(rcfg)  # the front signed them in; stops the page otherwise
    all_pages, allowed = _pages(user)
    nav = st.navigation(list(all_pages.values()), position="hidden")
    if nav is all_pages["home"] and home(user) != "overview":
        st.switch_page(all_pages[home(user)], query_params=dict(st.query_params))
    try:
        seq = ui.checkpoint(cfg.duckdb_path)
    except ProjectionsError as exc:
        st.error(f"The read model cannot be read: {exc}")
        st.stop()
    opts, fresh = _options(str(cfg.duckdb_path), seq)
    governance_page = any(nav is all_pages[p] for _, _, p, _ in GOVERNANCE_PAGES) or \
        nav is all_pages.get("home")
    sb = st.sidebar
    sb.markdown(f"Signed in as **{plain(user.name)}** "
                f"({', '.join(sorted(r.value for r in user.roles))})")
    for path in allowed:
        sb.page_link(all_pages[path])
    if user is not session.DEMO_VIEWER and not rcfg.proxy_header:  # the front's own pages
        sb.markdown(f"[Sign out]({session.SIGNOUT_URL}) · "
                    f"[Change password]({session.PASSWORD_URL})")
    filters = _filters(opts) if governance_page else Filters()
    st.session_state["lm_ctx"] = {"db": cfg.duckdb_path, "seq": seq, "filters": filters,
                                  "options": opts, "bus": cfg.bus, "user": user,
                                  "pages": all_pages}
    if governance_page:
        st.sidebar.caption(f"Showing {filters.describe()}.")
    ui.freshness_line(seq, fresh, ui.modified_at(cfg.duckdb_path))
    nav.run()


main()
