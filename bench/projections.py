"""`lastmile bench projections`: fold N synthetic events from a real JetStream stream into
DuckDB, time every metric query over the result, and measure the projector's lag
while events keep arriving.

Always on a fresh embedded nats-server and a fresh DuckDB file in a temp dir: bench
events never enter a site's real log or read model.

Figures reported, so nothing is hidden in one number:
- ``fold_events_per_s``: entries / (fold + Arrow + DuckDB commit time), i.e. what the
  projector itself costs per event, NATS reading excluded;
- ``end_to_end_events_per_s``: entries / wall time of the catch-up from the stream
  (JetStream fetch + decode + fold + write), the figure a rebuild sees;
- ``queries_ms``: each metric query, warm (second run), over the folded result;
- ``lag_*``: from a publish being acknowledged to the commit that contains it, while
  events are published at ``live_rate`` per second, with the projector configured as
  `lastmile up` runs it (DuckDB file opened per batch, writes on a thread).
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from demo.synthetic import SyntheticConfig, SyntheticSite, first_events, site_for_count
from events.jetstream import BusSettings, EventBus
from events.nats_server import EmbeddedNats, free_port
from projections import metrics as M
from projections.drift import drift_windows
from projections.duckdb_store import ProjectionStore
from projections.projector import Projector


@dataclass
class ProjectionsBench:
    events: int
    publish_s: float
    fold_s: float
    write_s: float
    catch_up_s: float
    fold_events_per_s: float
    end_to_end_events_per_s: float
    rows: int
    duckdb_mb: float
    queries_ms: dict[str, float] = field(default_factory=dict)
    queries_cold_ms: dict[str, float] = field(default_factory=dict)
    live_rate: float = 0.0
    live_events: int = 0
    lag_p50_s: float | None = None
    lag_p99_s: float | None = None
    lag_max_s: float | None = None
    targets: dict[str, str] = field(default_factory=dict)
    server: str = "embedded nats-server, JetStream file store (sync 2m) in a fresh temp dir"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def metric_queries(con: Any, unblinding: dict[str, str]) -> dict[str, Callable[[], object]]:
    """Every metric the dashboards and `lastmile metrics` run, by name."""
    last = con.execute("SELECT max(occurred_at) FROM instances").fetchone()
    baseline, window = drift_windows(last[0]) if last and last[0] else (None, None)
    queries: dict[str, Callable[[], object]] = {
        "turnaround": lambda: M.turnaround(con),
        "runtime": lambda: M.runtime(con),
        "operator_timings": lambda: M.operator_timings(con),
        "outcomes": lambda: M.outcomes(con),
        "reasons": lambda: M.reasons(con),
        "volume": lambda: M.volume(con),
        "reviewer_time": lambda: M.reviewer_time(con),
        "qc_rates": lambda: M.qc_rates(con),
        "agreement_hfd": lambda: M.agreement(con, "hfd", positive="fracture"),
        "agreement_bts": lambda: M.agreement(con, "bts", positive="progression"),
        "agreement_hfd_by_scanner": lambda: M.agreement_by_subgroup(
            con, "hfd", "scanner", positive="fracture"),
        "agreement_hfd_by_age_band": lambda: M.agreement_by_subgroup(
            con, "hfd", "age_band", positive="fracture"),
        "blinded_reads_lts": lambda: M.blinded_reads(con, "lts", unblinding),
        "dice": lambda: M.dice_summary(con),
        "volume_agreement": lambda: M.volume_agreement(con),
        "longitudinal_bts": lambda: M.longitudinal(con),
        "weekly_distribution": lambda: M.weekly_distribution(con, "manufacturer_model", "bts"),
    }
    if baseline and window:
        queries["drift"] = lambda: M.drift(con, baseline=baseline, window=window)
    return queries


async def run_projections_bench(count: int = 1_000_000, *, live_rate: float = 2000.0,
                                live_s: float = 10.0, batch_size: int = 20_000,
                                ) -> ProjectionsBench:
    with tempfile.TemporaryDirectory(prefix="lastmile-bench-proj-") as tmp:
        with EmbeddedNats(Path(tmp) / "nats", port=free_port(), sync="2m") as server:
            bus = await EventBus.connect(BusSettings(servers=(server.url,), stream="BENCH"))
            try:
                return await _bench(bus, Path(tmp), count, live_rate, live_s, batch_size)
            finally:
                await bus.close()


async def _bench(bus: EventBus, tmp: Path, count: int, live_rate: float, live_s: float,
                 batch_size: int) -> ProjectionsBench:
    site = site_for_count(count)
    t0 = time.perf_counter()
    stored = await bus.publish_many(first_events(site, count))
    publish_s = time.perf_counter() - t0
    if stored != count:
        raise RuntimeError(f"stream stored {stored} of {count} bench events")

    # the generator's state (patients, ground truth) is long-lived garbage-collector work
    # that a real projector process does not carry: freeze it out of the timings
    gc.collect()
    gc.freeze()
    db = tmp / "bench.duckdb"
    store = ProjectionStore(db, keep_open=True)
    # writes inline (not on a thread) so fold/write times are not inflated by the GIL
    # while the reader decodes the next messages
    projector = Projector(store, batch_size=batch_size, fetch=5000, threaded_writes=False)
    t0 = time.perf_counter()
    folded = await projector.catch_up(bus)
    catch_up_s = time.perf_counter() - t0
    st = projector.stats
    counts = store.counts()

    cold: dict[str, float] = {}
    warm: dict[str, float] = {}
    with store.connection() as con:
        for name, query in metric_queries(con, site.unblinding).items():
            for target in (cold, warm):
                q0 = time.perf_counter()
                query()
                target[name] = round((time.perf_counter() - q0) * 1000, 1)

    store.close()
    # the lag is measured as `lastmile up` runs the projector: the file opened per batch
    # (so that readers can get in between), writes on a thread
    live_store = ProjectionStore(db, keep_open=False)
    lag = await _live_lag(bus, live_store, live_rate, live_s)
    live_store.close()
    gc.unfreeze()
    fold_total = st.fold_s + st.write_s
    result = ProjectionsBench(
        events=folded, publish_s=round(publish_s, 2), fold_s=round(st.fold_s, 2),
        write_s=round(st.write_s, 2), catch_up_s=round(catch_up_s, 2),
        fold_events_per_s=round(folded / fold_total) if fold_total else 0.0,
        end_to_end_events_per_s=round(folded / catch_up_s) if catch_up_s else 0.0,
        rows=sum(counts.values()), duckdb_mb=round(db.stat().st_size / 1e6, 1),
        queries_ms=warm, queries_cold_ms=cold, live_rate=live_rate,
        live_events=lag[0], lag_p50_s=lag[1], lag_p99_s=lag[2], lag_max_s=lag[3],
    )
    result.targets = {
        "fold >= 100,000 events/s": _verdict(result.fold_events_per_s >= 100_000),
        "every metric query < 200 ms (warm)": _verdict(max(warm.values()) < 200),
        "projector lag under live load < 1 s (p99)": _verdict(
            result.lag_p99_s is not None and result.lag_p99_s < 1.0),
    }
    return result


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


async def _live_lag(bus: EventBus, store: ProjectionStore, rate: float, seconds: float,
                    ) -> tuple[int, float | None, float | None, float | None]:
    """Publish at ``rate`` events/s in 50 ms ticks while the projector follows; lag of each
    tick = commit time of the batch holding its last event - its publish ack time."""
    commits: list[tuple[int, float]] = []
    projector = Projector(store, batch_size=5000, idle_s=0.05,
                          on_commit=lambda seq, wall: commits.append((seq, wall)))
    stop = asyncio.Event()
    follower = asyncio.create_task(projector.follow(bus, stop))
    site = SyntheticSite(SyntheticConfig(seed=99, studies=int(rate * seconds / 30) + 20))
    events = site.events()
    per_tick = max(1, int(rate * 0.05))
    acked: list[tuple[int, float]] = []
    sent = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    next_tick = loop.time()
    while loop.time() < end:
        chunk = [e for _, e in zip(range(per_tick), events, strict=False)]
        if not chunk:
            break
        await bus.publish_many(chunk)
        acked.append((await bus.last_sequence(), time.time()))
        sent += len(chunk)
        next_tick += 0.05
        await asyncio.sleep(max(0.0, next_tick - loop.time()))
    deadline = loop.time() + 30
    while acked and (not commits or commits[-1][0] < acked[-1][0]) and loop.time() < deadline:
        await asyncio.sleep(0.02)
    stop.set()
    await follower
    lags = []
    for seq, at in acked:
        done = next((wall for s, wall in commits if s >= seq), None)
        if done is not None:
            lags.append(max(0.0, done - at))
    if not lags:
        return sent, None, None, None
    lags.sort()
    p99 = lags[min(len(lags) - 1, int(round(0.99 * (len(lags) - 1))))]
    return sent, round(statistics.median(lags), 3), round(p99, 3), round(lags[-1], 3)
