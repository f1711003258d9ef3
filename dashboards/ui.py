"""Streamlit plumbing shared by the pages: cached loading keyed on the checkpoint, the
freshness line, charts with their CSV download.

Caching: every load is ``st.cache_data`` keyed on (database, checkpoint, filters,
arguments) with a short TTL, so a page re-run is served from memory until the
projector commits a new batch. A miss opens the DuckDB file read-only, runs the
query and closes it at once: no connection outlives a rerun, so the projector can
always take its write lock again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import altair as alt
import pandas as pd
import streamlit as st

from dashboards import queries as Q
from dashboards.config import DashboardConfig
from dashboards.queries import Filters
from projections.duckdb_store import read_only
from projections.stats import Stat

T = TypeVar("T")
AltairChart = (alt.Chart | alt.LayerChart | alt.VConcatChart | alt.HConcatChart | alt.FacetChart
               | alt.ConcatChart)
READ_WAIT_S = 5.0


@st.cache_resource
def config() -> DashboardConfig:
    return DashboardConfig.from_env()


def checkpoint(db: Path) -> int:
    """The last stream sequence folded (one tiny query; not cached: it IS the cache key)."""
    with read_only(db, wait_s=READ_WAIT_S) as con:
        row = con.execute("SELECT max(last_sequence) FROM checkpoint").fetchone()
    return int(row[0] or 0) if row else 0


def modified_at(db: Path) -> float:
    """When the read model last changed on disk (the database file or its WAL)."""
    times = [p.stat().st_mtime for p in (db, db.with_name(db.name + ".wal")) if p.exists()]
    return max(times) if times else time.time()


@st.cache_data(ttl=30, show_spinner=False, max_entries=512)
def _cached(fn_name: str, db: str, seq: int, filters: Filters, kwargs: tuple[tuple[str, Any],
            ...]) -> Any:
    fn = LOADERS[fn_name]
    with read_only(db, wait_s=READ_WAIT_S) as con:
        Q.apply_filters(con, filters)
        return fn(con, filters, **dict(kwargs))


LOADERS: dict[str, Callable[..., Any]] = {}


def loader(fn: Callable[..., T]) -> Callable[..., T]:
    LOADERS[fn.__name__] = fn
    return fn


def load(fn: Callable[..., T], filters: Filters, **kwargs: Any) -> T:
    """``fn(con, filters, **kwargs)`` on the read model, cached per checkpoint."""
    ctx = st.session_state["lm_ctx"]
    if fn.__name__ not in LOADERS:
        loader(fn)
    result: T = _cached(fn.__name__, str(ctx["db"]), ctx["seq"], filters,
                        tuple(sorted(kwargs.items())))
    return result


def freshness_line(seq: int, fresh: Q.Freshness, changed_at: float) -> None:
    ago = max(0, int(time.time() - changed_at))
    when = f" (it happened {fresh.last_event_at:%Y-%m-%d %H:%M} UTC)" if \
        fresh.last_event_at else ""
    st.caption(f"data as of event #{seq}, {ago} seconds ago · {fresh.events:,} events "
               f"folded{when}", help="Event #N is the last event of the log folded into "
               "the read model; 'seconds ago' is when the read model last changed.")


def stat_text(s: Stat | None, pct: bool = False) -> str:
    if s is None:
        return "—"
    if s.value is None:
        return s.reason or "not enough data"

    def f(v: float) -> str:
        return f"{100 * v:.1f}%" if pct else f"{v:.3f}"

    if s.low is None or s.high is None:
        return f"{f(s.value)} (n={s.n})"
    return f"{f(s.value)} [{f(s.low)}, {f(s.high)}] (n={s.n})"


TIME_AXIS_FORMAT = {"milliseconds": "%H:%M:%S.%L", "seconds": "%H:%M:%S", "minutes": "%H:%M",
                    "hours": "%H:%M", "date": "%d %b", "week": "%d %b", "month": "%b %Y",
                    "quarter": "%b %Y", "year": "%Y"}
NOT_ENOUGH = "Not enough data for the current filters to draw this."


def chart(c: AltairChart | None, df: pd.DataFrame, name: str,
          caption: str | None = None, empty: str = NOT_ENOUGH) -> None:
    """A chart, and the data behind it as a CSV download (every chart has one). ``name``
    is the CSV's file name, never shown; ``empty`` is the sentence shown instead of a
    chart without data (under the chart's own heading)."""
    if df is None or df.empty or c is None:
        st.info(empty)
        return
    # Vega's default labels a minute axis "03:15" on a 12-hour clock without am/pm: every
    # time axis reads on the 24-hour clock, days as "27 Jan"
    c = c.configure_axisTemporal(format=TIME_AXIS_FORMAT)
    st.altair_chart(c, width="stretch")
    cols = st.columns([1, 4])
    cols[0].download_button("CSV", df.to_csv(index=False).encode(), file_name=f"{name}.csv",
                            mime="text/csv", key=f"csv-{name}", on_click="ignore",
                            help=f"the data of this chart ({len(df)} rows)",
                            icon=":material/download:")
    if caption:
        cols[1].caption(caption)


_MISSING = "—"


def readable(df: pd.DataFrame) -> Any:
    """The table as a reader sees it: decimals to two places, missing values as "—"
    (never "None" or "nan"), times as 2026-01-27 14:05 (24-hour, UTC); the CSV keeps
    full precision."""
    out = df.copy()
    for col in out.columns:
        if pd.api.types.is_datetime64_any_dtype(out[col]):
            out[col] = out[col].dt.strftime("%Y-%m-%d %H:%M")
        # Streamlit's grid draws a missing cell as "None" whatever the Styler says: a
        # column with gaps is shown as text
        if out[col].isna().any():
            out[col] = [_MISSING if pd.isna(v) else f"{v:,.2f}" if isinstance(v, float)
                        else v for v in out[col]]
    return out.style.format(precision=2, na_rep=_MISSING)


def table(df: pd.DataFrame, name: str) -> None:
    if df is None or df.empty:
        st.info("No rows for the current filters.")
        return
    st.dataframe(readable(df), hide_index=True)
    st.download_button("CSV", df.to_csv(index=False).encode(), file_name=f"{name}.csv",
                       mime="text/csv", key=f"csv-{name}", on_click="ignore",
                       icon=":material/download:")


def now_utc() -> datetime:
    return datetime.now(UTC)
