"""Dashboards in the composition root: the Streamlit process `lastmile up` runs, the
`lastmile dashboard` command, and `lastmile bench dashboards`.

Register (one line each):

    # lastmile/cli.py
    from lastmile.dashboards_wiring import bench_dashboards_command, dashboard_command
    app.command("dashboard")(dashboard_command)
    bench_app.command("dashboards")(bench_dashboards_command)

    # lastmile/services.py, in services_for()
    from lastmile.dashboards_wiring import DashboardService
    services.append(DashboardService(settings))

The dashboard is a separate ``streamlit run`` process bound to 127.0.0.1 on
``settings.dashboard_port``; it reads the DuckDB file read-only between the
projector's batches and the event log for audits. Its location settings travel in
its environment (``LASTMILE_DASHBOARD_DUCKDB``, ``LASTMILE_DASHBOARD_BUS``), never on
its command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from dashboards.config import ENV_BUS, ENV_DUCKDB, ENV_STATE_DIR, bus_to_json
from events.base import Event
from events.jetstream import BusSettings, EventBus
from lastmile.runtime import Service
from lastmile.settings import Settings

log = logging.getLogger("lastmile.dashboards")
out = Console()
err = Console(stderr=True)

APP = Path(__file__).resolve().parent.parent / "dashboards" / "app.py"
PAGES = ("overview", "agreement", "longitudinal", "drift", "reliability", "audit", "models")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]


def page_url(base: str, page: str) -> str:
    """The URL of a page (the Overview is the app's default page, served at the root)."""
    return f"{base}/" if page == PAGES[0] else f"{base}/{page}"


class DashboardError(Exception):
    """The dashboard process could not be started or did not become healthy."""


def streamlit_command(port: int, host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(APP),
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.address", host, "--server.port", str(port),
            "--server.fileWatcherType", "none", "--global.developmentMode", "false",
            "--client.toolbarMode", "viewer"]


def dashboard_env(duckdb_path: Path, bus: BusSettings | None,
                  base: dict[str, str] | None = None,
                  state_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env[ENV_DUCKDB] = str(duckdb_path)
    if state_dir is not None:  # users, the session key, instances and results
        env[ENV_STATE_DIR] = str(state_dir)
    if bus is not None:
        env[ENV_BUS] = bus_to_json(bus)
    return env


@dataclass
class DashboardProcess:
    """``streamlit run dashboards/app.py`` as a child process, stopped cleanly."""

    duckdb_path: Path
    bus: BusSettings | None
    port: int
    host: str = "127.0.0.1"
    log_path: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    state_dir: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> DashboardProcess:
        with contextlib.ExitStack() as files:
            sink: Any = subprocess.DEVNULL
            if self.log_path is not None:
                sink = files.enter_context(open(self.log_path, "ab"))  # noqa: SIM115
            self.proc = subprocess.Popen(
                streamlit_command(self.port, self.host),
                env={**dashboard_env(self.duckdb_path, self.bus, state_dir=self.state_dir),
                     **self.extra_env}, stdout=sink,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DashboardError(f"streamlit exited with {self.proc.returncode}"
                                     + (f"; see {self.log_path}" if self.log_path else ""))
            if self.healthy():
                return self
            time.sleep(0.2)
        self.stop()
        raise DashboardError(f"streamlit did not answer on {self.url} within {timeout_s:.0f}s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def __enter__(self) -> DashboardProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex((host, port)) != 0


class DashboardService(Service):
    """Runs the Streamlit dashboard beside the other services of `lastmile up`; restarts
    it if it dies (through the supervisor), stops it when `up` stops."""

    name = "dashboard"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def run(self, bus: EventBus, stop: asyncio.Event) -> None:
        s = self.settings
        if not _port_free("127.0.0.1", s.dashboard_port):
            raise DashboardError(f"port {s.dashboard_port} is in use: set "
                                 "LASTMILE_DASHBOARD_PORT to a free one")
        process = DashboardProcess(s.duckdb_path, bus.settings, s.dashboard_port,
                                   log_path=s.state_dir / "dashboard.log",
                                   state_dir=s.state_dir)
        await asyncio.to_thread(process.start)
        log.info("dashboard on %s (log %s)", process.url, process.log_path)
        try:
            while not stop.is_set():
                if process.proc is not None and process.proc.poll() is not None:
                    raise DashboardError(f"streamlit exited with {process.proc.returncode}; "
                                         f"see {process.log_path}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
        finally:
            await asyncio.to_thread(process.stop)


# --------------------------------------------------------------------------- data


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


# --------------------------------------------------------------------------- bench


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
            with DashboardProcess(db, bus_settings, free_port(),
                                  log_path=tmp / "streamlit.log", state_dir=tmp,
                                  extra_env={"LASTMILE_DEMO": "1"}) as proc:
                cold, warm = measure_pages(proc.url, repeats=repeats, study_uid=study,
                                           screenshots=screenshots)
        medians = {k: sorted(v)[len(v) // 2] for k, v in warm.items()}
        ok = max(medians.values()) < 1500
        return DashboardsBench(n, round(fold_s, 1), round(db.stat().st_size / 1e6, 1), cold,
                               warm, medians, verdict="met" if ok else "NOT met")


# --------------------------------------------------------------------------- commands


def dashboard_command(ctx: typer.Context) -> None:
    """Run only the governance dashboard (Streamlit) on the read model, until Ctrl-C."""
    settings: Settings = ctx.obj
    if not settings.duckdb_path.exists():
        err.print(f"no read model at {settings.duckdb_path}: run `lastmile up` or "
                  "`lastmile projections rebuild` first")
        raise typer.Exit(5)
    proc = DashboardProcess(settings.duckdb_path, settings.bus(), settings.dashboard_port,
                            state_dir=settings.state_dir)
    try:
        proc.start()
    except DashboardError as exc:
        err.print(f"[red]dashboard:[/] {exc}")
        raise typer.Exit(1) from None
    out.print(f"dashboard on {proc.url} (Ctrl-C stops)")
    try:
        while proc.proc is not None and proc.proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        proc.stop()


def bench_dashboards_command(
    count: Annotated[int, typer.Option(min=1000, help="Synthetic events to fold.")] = 1_000_000,
    repeats: Annotated[int, typer.Option(min=1, help="Warm loads per page.")] = 3,
    screenshots: Annotated[Path | None, typer.Option(
        help="Save a screenshot of each page (after its last load) here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Fold N synthetic events, start the dashboard, and time each page's warm load in
    headless Chromium (target: < 1.5 s per page)."""
    result = run_dashboards_bench(count, repeats, screenshots)
    if as_json:
        print(json.dumps(result.as_dict(), indent=1))
        return
    t = Table(title=f"bench dashboards: {result.events:,} events folded in {result.fold_s} s "
                    f"({result.duckdb_mb} MB)")
    for col in ("page", "cold (ms)", "warm median (ms)", "warm runs (ms)"):
        t.add_column(col)
    for name in result.warm_ms:
        t.add_row(name, f"{result.cold_ms[name]:.0f}", f"{result.warm_median_ms[name]:.0f}",
                  ", ".join(f"{v:.0f}" for v in result.warm_ms[name]))
    out.print(t)
    out.print(f"{result.target}: {result.verdict}")
