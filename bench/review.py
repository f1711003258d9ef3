"""`lastmile bench review`: a seeded review site (three reference pipelines' results, a
reader) behind the real pages; times sign-in and case opening in headless Chromium. Also
the site seeding and browser steps the review page tests use."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dashboards.config import (
    ENV_DEMO,
    ENV_STATE_DIR,
    ENV_USERS,
)
from dashboards.review.auth import (
    User,
    hash_password,
    load_users,
    parse_roles,
    save_users,
    with_user,
)
from dashboards.review.policy import (
    QC_PIPELINES,
    assignments,
)
from events.catalogue import InferenceCompleted, QcPassed
from events.jetstream import BusSettings, EventBus


@dataclass
class SeededSite:
    """Real pipeline runs (phantom studies through the engine) ready for review."""

    state_dir: Path
    results: dict[str, list[InferenceCompleted]] = field(default_factory=dict)


async def _wait_completed(bus: EventBus, study_uid: str, timeout_s: float) -> InferenceCompleted:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for _, ev in await bus.history(study_uid):
            if isinstance(ev, InferenceCompleted):
                return ev
        await asyncio.sleep(0.2)
    raise TimeoutError(f"no inference result for {study_uid} within {timeout_s:.0f}s")


async def seed_review_site(bus: EventBus, state_dir: Path, secret: bytes, *,
                           bts_exams: int = 2, hfd_exams: int = 1, lts_exams: int = 0,
                           timeout_s: float = 120.0) -> SeededSite:
    """Deploy the reference pipelines, put phantom studies into the instance store and
    the log as ingest does, and let a real engine worker produce their results (SEG,
    SR, findings). BTS exams are one patient's follow-ups (priors)."""
    from demo.phantoms import abdomen_ct_study, brain_mr_study, fake_patient, pelvis_study
    from engine.feed import feed_study
    from engine.registry import deployed_event
    from engine.spec import REFERENCE_DIR, load_pipeline
    from engine.worker import EngineWorker, WorkerConfig
    from events.catalogue import Stage

    wanted = {"bts": bts_exams, "hfd": hfd_exams, "lts": lts_exams}
    loaded = {p: load_pipeline(REFERENCE_DIR / f"{p}.yaml") for p, n in wanted.items() if n}
    for p in loaded.values():
        await bus.publish(deployed_event(p, actor="seed", stage=Stage.VALIDATION))
    config = WorkerConfig(instances_dir=state_dir / "instances",
                          results_dir=state_dir / "results", secret=secret,
                          worker_id="review-seed", max_attempts=2, ack_wait_s=30.0,
                          heartbeat_s=2.0)
    studies: list[tuple[str, Any]] = []
    patient = fake_patient(9001)
    for i in range(bts_exams):
        studies.append(("bts", brain_mr_study(9100 + i, patient=patient,
                                              study_date=f"2026{i + 1:02d}10",
                                              lesion_radius_mm=12.0 + 2.0 * i)))
    for i in range(hfd_exams):
        studies.append(("hfd", pelvis_study(9200 + i, images=2, size=512,
                                            classes=("fracture", "normal"))))
    for i in range(lts_exams):
        studies.append(("lts", abdomen_ct_study(9300 + i)))
    site = SeededSite(state_dir)
    stop = asyncio.Event()
    worker = EngineWorker(loaded, config)
    task = asyncio.create_task(worker.run(bus, stop))
    try:
        for pipeline, study in studies:  # one at a time: follow-ups need their priors
            await feed_study(bus, study.datasets, config.instances_dir, secret,
                             pipeline=pipeline, called_ae=f"LM_{pipeline.upper()}")
            done = await _wait_completed(bus, study.study_uid, timeout_s)
            site.results.setdefault(pipeline, []).append(done)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    return site


@dataclass
class ReviewBench:
    case_loads: int
    warm_p50_ms: float
    warm_p90_ms: float
    cold_ms: float
    agree_clicks: int
    target: str = "warm case load < 1500 ms; agree in <= 3 clicks"
    verdict: str = ""
    peer: str = ("the paper (XNAT + OHIF): clinicians spent about one minute per case; "
                 "no per-load figure is published")
    browser: str = "Debian chromium, headless, via Playwright"
    warm_ms: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_user(users_file: Path, name: str, password: str, roles: Sequence[str],
               pipelines: Sequence[str] = ()) -> None:
    users = load_users(users_file)
    save_users(users_file, with_user(users, User(name, parse_roles(roles), tuple(pipelines),
                                                 hash_password(password))))


def sign_in(page: Any, name: str, password: str) -> int:
    """Fill the sign-in form and submit; returns the clicks it took (1)."""
    page.get_by_label("User name", exact=True).fill(name)
    page.get_by_label("Password", exact=True).fill(password)
    page.get_by_role("button", name="Sign in").click()
    return 1


def wait_case(page: Any, timeout_ms: float = 60_000) -> None:
    """The case page is drawn: script finished and the case image loaded."""
    from bench.dashboards import wait_for_page

    wait_for_page(page, timeout_ms)
    page.wait_for_function(
        """() => { const i = document.querySelector('.lm-case-image img');
                   return i && i.complete && i.naturalWidth > 0; }""",
        timeout=timeout_ms, polling=50)


@contextlib.contextmanager
def review_dashboard(db: Path, bus: BusSettings, state_dir: Path, users_file: Path,
                     port: int, log_path: Path | None = None,
                     extra_env: dict[str, str] | None = None) -> Iterator[Any]:
    from dashboards.process import PagesProcess

    env = {ENV_STATE_DIR: str(state_dir), ENV_USERS: str(users_file), ENV_DEMO: "0",
           **(extra_env or {})}
    with PagesProcess(db, bus, port, log_path=log_path, extra_env=env) as proc:
        yield proc


async def publish_people(bus: EventBus, site: SeededSite, reader: str) -> None:
    """QC passes and assignments for the seeded results, as the QC desk and the
    assignment service would make them."""
    from events.base import deterministic_id

    for pipeline, results in site.results.items():
        for res in results:
            trigger: InferenceCompleted | QcPassed = res
            if pipeline in QC_PIPELINES:
                trigger = res.caused(QcPassed, actor="bench.qc", run_key=res.run_key,
                                     event_id=deterministic_id("qc", res.run_key),
                                     seconds_on_case=10.0)
                await bus.publish(trigger)
            for ev in assignments(trigger, [reader]):
                await bus.publish(ev)


def run_review_bench(opens: int = 20) -> ReviewBench:
    """Seeded state in a temp dir (own nats-server): warm case loads and agree clicks."""
    from bench.dashboards import browser, publish_and_fold
    from events.nats_server import EmbeddedNats, free_port

    with tempfile.TemporaryDirectory(prefix="lastmile-bench-review-") as d:
        tmp = Path(d)
        users = tmp / "users.toml"
        write_user(users, "bench.reader", "bench-password", ["reader"])
        with EmbeddedNats(tmp / "nats", port=free_port(), sync="2m") as server:
            bus_settings = BusSettings(servers=(server.url,), stream="BENCHREVIEW")

            async def seed() -> SeededSite:
                bus = await EventBus.connect(bus_settings)
                try:
                    site = await seed_review_site(bus, tmp, b"bench-review-secret-0123456789",
                                                  bts_exams=2, hfd_exams=1)
                    await publish_people(bus, site, "bench.reader")
                    await publish_and_fold(bus, [], tmp / "read.duckdb")
                    return site
                finally:
                    await bus.close()

            site = asyncio.run(seed())
            bts = site.results["bts"][-1]
            with review_dashboard(tmp / "read.duckdb", bus_settings, tmp, users, free_port(),
                                  log_path=tmp / "streamlit.log") as proc, browser() as b:
                page = b.new_page(viewport={"width": 1500, "height": 1100})
                url = f"{proc.url}/case?study={bts.study_uid}"
                t0 = time.perf_counter()
                page.goto(url)  # the front's sign-in page, then the case
                sign_in(page, "bench.reader", "bench-password")
                wait_case(page)
                cold = (time.perf_counter() - t0) * 1000
                warm = []
                for _ in range(opens):
                    t0 = time.perf_counter()
                    page.goto(url, wait_until="commit")
                    wait_case(page)
                    warm.append(round((time.perf_counter() - t0) * 1000, 1))
                # clicks from the opened case to a recorded review, counted in the page
                page.evaluate("() => { window.__clicks = 0; document.addEventListener("
                              "'click', () => { window.__clicks += 1; }, true); }")
                page.get_by_role("button", name="Agree with AI and submit").click()
                page.get_by_text("Review recorded").wait_for(timeout=30_000)
                clicks = int(page.evaluate("() => window.__clicks"))
                page.close()
    warm_sorted = sorted(warm)
    p50 = statistics.median(warm_sorted)
    p90 = warm_sorted[min(len(warm_sorted) - 1, int(round(0.9 * (len(warm_sorted) - 1))))]
    ok = p50 < 1500 and clicks <= 3
    return ReviewBench(len(warm), round(p50, 1), round(p90, 1), round(cold, 1), clicks,
                       verdict="met" if ok else "NOT met", warm_ms=warm)
