"""`lastmile bench dashboards`: fold N synthetic events, start the dashboard and time each
page's cold and warm load in Debian's headless Chromium (Playwright); also the browser
helpers the page tests use."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dashboards.process import PAGES, DashboardError, PagesProcess, page_url
from dashboards.report_pdf import CHROMIUM, CHROMIUM_ARGS  # one Chromium for tests and PDF
from events.base import Event
from events.jetstream import BusSettings, EventBus


async def publish_and_fold(bus: EventBus, events: Iterable[Event], duckdb_path: Path,
                           batch_size: int = 20_000) -> int:
    """Publish ``events`` to the bus and fold the whole stream into ``duckdb_path``
    (used by the browser tests and the benchmark: a known event set, end to end)."""
    from projections.duckdb_store import ProjectionStore
    from projections.projector import Projector

    await bus.publish_many(events)
    with ProjectionStore(duckdb_path, keep_open=True) as store:
        n = await Projector(store, batch_size=batch_size, fetch=5000,
                            threaded_writes=False).catch_up(bus)
    return n


@contextlib.contextmanager
def browser(headless: bool = True) -> Iterator[Any]:
    """Debian's Chromium driven by Playwright (never a downloaded browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=headless, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def wait_for_page(page: Any, timeout_ms: float = 60_000) -> None:
    """Wait until Streamlit has finished the script run and drawn its charts."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout_ms)
    page.wait_for_function(
        """() => {
            const app = document.querySelector('[data-testid="stApp"]');
            if (!app || app.getAttribute('data-test-script-state') !== 'notRunning') return false;
            if (document.querySelector('[data-testid="stStatusWidget"]')) return false;
            if (!document.querySelector('[data-testid="stCaptionContainer"]')) return false;
            const charts = document.querySelectorAll('[data-testid="stVegaLiteChart"]');
            for (const c of charts) { if (!c.querySelector('canvas, svg')) return false; }
            return true;
        }""", timeout=timeout_ms, polling=50)


@dataclass
class DashboardsBench:
    events: int
    fold_s: float
    duckdb_mb: float
    cold_ms: dict[str, float]
    warm_ms: dict[str, list[float]]
    warm_median_ms: dict[str, float]
    target: str = "warm load of each page < 1500 ms"
    verdict: str = ""
    browser: str = "Debian chromium, headless, via Playwright"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_pages(url: str, pages: Iterable[str] = PAGES, repeats: int = 3,
                  study_uid: str | None = None, screenshots: Path | None = None,
                  ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Cold (first) and warm (repeated) page loads in Chromium: navigation start to the
    last chart drawn with the script run finished (and no exception box)."""
    cold: dict[str, float] = {}
    warm: dict[str, list[float]] = {}
    with browser() as b:
        page = b.new_page(viewport={"width": 1600, "height": 1200})
        for name in pages:
            target = page_url(url, name) + (f"?study={study_uid}" if name == "audit" and
                                             study_uid else "")
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                page.goto(target, wait_until="commit")
                wait_for_page(page, timeout_ms=300_000)
                times.append(round((time.perf_counter() - t0) * 1000, 1))
            if page.locator('[data-testid="stException"]').count():
                raise DashboardError(f"page {name} shows an exception: "
                                     + page.locator('[data-testid="stException"]').first
                                     .inner_text()[:500])
            if screenshots is not None:
                screenshots.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshots / f"bench-{name}.png"))
            cold[name] = times[0]
            warm[name] = times[1:]
        page.close()
    return cold, warm


async def _bench_data(url: str, db: Path, count: int) -> tuple[int, float, BusSettings,
                                                               str | None]:
    from demo.synthetic import first_events, site_for_count

    settings = BusSettings(servers=(url,), stream="BENCHDASH")
    bus = await EventBus.connect(settings)
    try:
        site = site_for_count(count)
        t0 = time.perf_counter()
        n = await publish_and_fold(bus, first_events(site, count), db)
        fold_s = time.perf_counter() - t0
        study = None
        async for _, ev, _ in bus.read(filter_subject="lm.ev.*.ingest.study.completed"):
            if isinstance(ev, Event):
                study = ev.study_uid
                break
    finally:
        await bus.close()
    return n, fold_s, settings, study


def run_dashboards_bench(count: int = 1_000_000, repeats: int = 3,
                         screenshots: Path | None = None) -> DashboardsBench:
    """Always in a temp dir with its own nats-server: bench events never reach a site's log."""
    from events.nats_server import EmbeddedNats, free_port

    with tempfile.TemporaryDirectory(prefix="lastmile-bench-dash-") as d:
        tmp = Path(d)
        db = tmp / "bench.duckdb"
        with EmbeddedNats(tmp / "nats", port=free_port(), sync="2m") as server:
            n, fold_s, bus_settings, study = asyncio.run(_bench_data(server.url, db, count))
            # demo mode: the governance pages without a sign-in (what is measured here)
            with PagesProcess(db, bus_settings, free_port(),
                              log_path=tmp / "streamlit.log", state_dir=tmp,
                              extra_env={"LASTMILE_DEMO": "1"}) as proc:
                cold, warm = measure_pages(proc.url, repeats=repeats, study_uid=study,
                                           screenshots=screenshots)
        medians = {k: sorted(v)[len(v) // 2] for k, v in warm.items()}
        ok = max(medians.values()) < 1500
        return DashboardsBench(n, round(fold_s, 1), round(db.stat().st_size / 1e6, 1), cold,
                               warm, medians, verdict="met" if ok else "NOT met")
