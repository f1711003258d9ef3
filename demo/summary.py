"""The demo's closing summary, read from the DuckDB read model in a separate process (as
`lastmile metrics` and the pages read it) once the projector has caught up."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rich.table import Table

from demo.run import DemoError, DemoResult, out
from demo.studies import PIPELINES
from events.jetstream import EventBus
from lastmile.settings import Settings


def _read_in_child(path: str, what: str, unblinding: dict[str, str]) -> Any:
    """Runs in the reader process: one short read-only connection, then closed."""
    from projections.duckdb_store import read_only

    with read_only(path, wait_s=10.0) as con:
        if what == "checkpoint":
            row = con.execute("SELECT max(last_sequence) FROM checkpoint").fetchone()
            return int(row[0] or 0) if row else 0
        return summary_rows(con, unblinding)


class ReadModelReader:
    """Reads the DuckDB read model from a separate process, as `lastmile metrics` and the
    dashboards do. In this process the projector opens the file read-write per batch,
    and DuckDB refuses a second connection with another configuration in the same
    process (either side would fail); across processes the file lock arbitrates and the
    store's ``connect`` waits for it."""

    def __init__(self, settings: Settings) -> None:
        import concurrent.futures
        import multiprocessing

        self.path = str(settings.duckdb_path)
        self.pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"))

    async def read(self, what: str, unblinding: dict[str, str] | None = None,
                   timeout_s: float = 30.0) -> Any:
        import importlib

        from projections.errors import ProjectionsError

        # by module name, so it pickles the same when this file runs as __main__
        fn = importlib.import_module("demo.summary")._read_in_child
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return await loop.run_in_executor(self.pool, fn, self.path, what,
                                                  unblinding or {})
            except ProjectionsError as exc:
                if time.monotonic() > deadline:
                    raise DemoError(f"cannot read the read model {self.path}: {exc}") from None
                await asyncio.sleep(0.2)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


async def wait_projector(bus: EventBus, reader: ReadModelReader,
                         timeout_s: float = 60.0) -> int:
    """Wait until the read model's checkpoint covers the log's last event."""
    target = await bus.last_sequence()
    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline:
        seen = await reader.read("checkpoint", timeout_s=timeout_s)
        if seen >= target:
            return seen
        await asyncio.sleep(0.3)
    raise DemoError(f"the projector reached event #{seen}, not #{target}, in {timeout_s:.0f}s")


def _stat(s: Any, digits: int = 2) -> str:
    """A value with its 95% CI, or "n/a" (the reason goes to the notes)."""
    if s is None or s.value is None:
        return "n/a"
    ci = f" [{s.low:.{digits}f}, {s.high:.{digits}f}]" if s.low is not None else ""
    return f"{s.value:.{digits}f}{ci}"


def summary_rows(con: Any, unblinding: dict[str, str]) -> list[dict[str, str]]:
    """Per pipeline, from the read model through projections.metrics."""
    from projections import metrics

    rows = []
    outcomes = {r.pipeline: r for r in metrics.outcomes(con)}
    dice: dict[str, list[Any]] = {}
    for r in metrics.dice_summary(con):
        dice.setdefault(r.pipeline, []).append(r)
    for p in PIPELINES:
        studies = con.execute("SELECT count(DISTINCT study_uid) FROM study_timeline "
                              "WHERE pipeline = ?", [p]).fetchone()
        reviews = con.execute("SELECT count(*) FROM reviews WHERE pipeline = ?",
                              [p]).fetchone()
        o = outcomes.get(p)
        # metrics.turnaround's arrival_to_published, over all weeks rather than per week
        tat = con.execute(
            "SELECT count(*), quantile_cont(s, 0.5), quantile_cont(s, 0.9) FROM ("
            " SELECT date_diff('millisecond', first_instance_at, published_at) / 1000.0 AS s"
            " FROM study_timeline WHERE pipeline = ? AND first_instance_at IS NOT NULL"
            " AND published_at IS NOT NULL)", [p]).fetchone()
        tat_s = f"{tat[1]:.1f} / {tat[2]:.1f} s" if tat and tat[0] else "n/a"
        if p == "lts":
            blinded = metrics.blinded_reads(con, p, unblinding)
            kappa = "; ".join(f"{b.source} mask accepted {_stat(b.accepted)}"
                              for b in blinded) or "n/a"
        else:
            ag = metrics.agreement(con, p, positive="fracture" if p == "hfd"
                                   else "progression")
            # Fleiss' kappa needs three readers (HFD); with two (BTS), AI vs each reader
            pairs = "; ".join(f"AI–{r} κ {_stat(k)}" for r, k in ag.ai_vs_reader.items()
                              if k.value is not None)
            kappa = (f"Fleiss κ {_stat(ag.fleiss)}" if ag.fleiss.value is not None
                     else pairs or f"n/a ({ag.cases} cases read)")
        labels = dice.get(p, [])
        rows.append({
            "pipeline": p,
            "studies": str(int(studies[0]) if studies else 0),
            "results": f"{o.completed}/{o.failed}/{o.skipped}" if o else "0/0/0",
            "turnaround": tat_s,
            "reviews": str(int(reviews[0]) if reviews else 0),
            "agreement": kappa,
            "dice": "; ".join(f"{d.label} {_stat(d.mean)} (n={d.mean.n})" for d in labels)
            or ("n/a (no masks)" if p == "hfd" else "n/a (no edits)"),
        })
    return rows


def print_summary(rows: list[dict[str, str]], result: DemoResult, url: str | None) -> None:
    table = Table(title="lastmile demo: summary (from the read model)")
    for col in ("pipeline", "studies", "completed/failed/skipped",
                "arrival→published p50/p90", "reviews", "agreement (95% CI)",
                "Dice of edited masks (95% CI)"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["pipeline"], r["studies"], r["results"], r["turnaround"], r["reviews"],
                      r["agreement"], r["dice"])
    out.print(table)
    sent = sum(result.sent.values())
    out.print(f"sent {sent} studies in {result.seconds:.0f}s; simulated people: "
              f"{result.people_events_new} new events, {result.people_events_existing} "
              f"already in the log; {result.edits} masks edited and recomputed")
    if url:
        out.print(f"dashboard: [bold]{url}[/]")
