"""The review pages in the composition root: users and roles, the PACS deep link, blinded
masks and their key, the case-assignment service, and `lastmile bench review`.

Register (one line each):

    # lastmile/cli.py
    app.add_typer(review_wiring.users_app, name="users")
    app.add_typer(review_wiring.review_app, name="review")
    app.command("link")(review_wiring.link_command)
    bench_app.command("review")(review_wiring.bench_review_command)

    # lastmile/services.py, in services_for(), inside `if "dashboard" in wanted:`
    services += review_wiring.review_services(settings)

Case assignment: ``CaseAssignmentService`` (durable consumer ``review-assigner``) turns
each ``InferenceCompleted`` (or, for QC-gated pipelines such as HFD, each ``QcPassed``)
into one ``CaseAssigned`` per reader of the pipeline in the users file, with ids derived
from (run, reader): a redelivery or a second assigner adds nothing
(``dashboards.review.policy.assignments``).

Settings (environment, read by ``dashboards.config.ReviewConfig``): ``LASTMILE_USERS_FILE``
(default ``<state_dir>/users.toml``), ``LASTMILE_AUTH_PROXY_HEADER``, ``LASTMILE_DEMO``,
``LASTMILE_BLINDED_STUDY``, ``LASTMILE_QC_PIPELINES`` (``hfd``), ``LASTMILE_PUBLIC_URL``
(the dashboard's address as PACS reaches it, for `lastmile link`), and
``LASTMILE_DASHBOARD_STATE_DIR`` (set for the Streamlit process: where the instance
store and results are).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from dashboards.config import (
    ENV_BLINDED,
    ENV_DEMO,
    ENV_STATE_DIR,
    ENV_USERS,
    ReviewConfig,
)
from dashboards.review import dicom_files
from dashboards.review.auth import (
    AuthError,
    User,
    Users,
    hash_password,
    load_users,
    parse_roles,
    save_users,
    with_user,
)
from dashboards.review.blinded import BlindedStudyError, load_blinded_study, unblinding
from dashboards.review.policy import (
    QC_PIPELINES,
    ReviewRefused,
    assignments,
    build_edit,
    cases_of_study,
    current_cases,
)
from events.base import Event
from events.catalogue import InferenceCompleted, QcPassed
from events.instance_store import InstanceStore
from events.jetstream import BusSettings, Delivery, EventBus
from events.subjects import type_filter
from lastmile.runtime import Service, open_bus
from lastmile.settings import Settings

log = logging.getLogger("lastmile.review")
out = Console()
err = Console(stderr=True)

users_app = typer.Typer(help="Who may sign in to the pages, with which roles.",
                        no_args_is_help=True)
review_app = typer.Typer(help="Blinded reading: extra masks and the unblinding key.",
                         no_args_is_help=True)
ASSIGNER_DURABLE = "review-assigner"


def review_config(settings: Settings, environ: dict[str, str] | None = None) -> ReviewConfig:
    env = dict(os.environ if environ is None else environ)
    env.setdefault(ENV_STATE_DIR, str(settings.state_dir))
    return ReviewConfig.from_env(env)


def _settings(ctx: typer.Context) -> Settings:
    settings = ctx.find_root().obj
    if not isinstance(settings, Settings):
        raise typer.BadParameter("settings not loaded")
    return settings


def _load(path: Path) -> Users:
    try:
        return load_users(path)
    except AuthError as exc:
        err.print(f"[red]users:[/] {exc}")
        raise typer.Exit(3) from None


# --------------------------------------------------------------------------- users


@users_app.command("add")
def users_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Sign-in name (letters, digits, . _ -).")],
    role: Annotated[list[str], typer.Option("--role", help="reader, qc, governance or "
                                            "admin; repeat for several.")],
    pipeline: Annotated[list[str] | None, typer.Option(
        "--pipeline", help="Pipelines this user reads or QCs; repeat; none = all.")] = None,
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="Read the password from standard input (scripts).")] = False,
) -> None:
    """Add a user (or replace their roles, pipelines and password). The password is
    prompted for and stored only as an scrypt hash, in a file of mode 0600."""
    cfg = review_config(_settings(ctx))
    try:
        roles = parse_roles(role)
        from dashboards.review.auth import NAME

        if not NAME.match(name):
            raise AuthError(f"{name!r} is not a valid user name (letters, digits, . _ -)")
        if password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        else:
            password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
        user = User(name, roles, tuple(pipeline or ()), hash_password(password))
    except AuthError as exc:
        err.print(f"[red]users:[/] {exc}")
        raise typer.Exit(2) from None
    save_users(cfg.users_file, with_user(_load(cfg.users_file), user))
    out.print(f"user {name}: {', '.join(sorted(r.value for r in roles))}"
              f"{' for ' + ', '.join(user.pipelines) if user.pipelines else ''} "
              f"(in {cfg.users_file})")


@users_app.command("list")
def users_list(ctx: typer.Context) -> None:
    """The users, their roles and pipelines (never their password hashes)."""
    cfg = review_config(_settings(ctx))
    users = _load(cfg.users_file)
    t = Table(title=str(cfg.users_file))
    for col in ("user", "roles", "pipelines"):
        t.add_column(col)
    for name in sorted(users.by_name):
        u = users.by_name[name]
        t.add_row(name, ", ".join(sorted(r.value for r in u.roles)),
                  ", ".join(u.pipelines) or "(all)")
    out.print(t)


# --------------------------------------------------------------------------- deep link


def deep_link(cfg: ReviewConfig, study_uid: str, *, dashboard_port: int = 8501,
              ours: bool = False) -> str:
    """The stable URL PACS opens for a study: the XNAT session when XNAT is configured
    (what the paper's Visage buttons did), else our case page."""
    if cfg.xnat_url and not ours:
        from engine.xnat_publisher import session_label

        return (f"{cfg.xnat_url}/data/projects/{cfg.xnat_project}/experiments/"
                f"{session_label(study_uid)}?format=html")
    base = cfg.public_url or f"http://127.0.0.1:{dashboard_port}"
    return f"{base}/case?study={study_uid}"


def link_command(
    ctx: typer.Context,
    study_uid: Annotated[str, typer.Argument(help="StudyInstanceUID.")],
    ours: Annotated[bool, typer.Option("--ours", help="Our case page even when XNAT is "
                                       "configured.")] = False,
) -> None:
    """Print the PACS deep link of a study (configure it as a PACS button with the
    StudyInstanceUID substituted)."""
    settings = _settings(ctx)
    print(deep_link(review_config(settings), study_uid.strip(),
                    dashboard_port=settings.dashboard_port, ours=ours))


# --------------------------------------------------------------------------- blinded masks


async def add_mask(bus: EventBus, cfg: ReviewConfig, study_uid: str, source: str, data: bytes,
                   actor: str, run_key: str | None = None) -> Event:
    """Register an expert/novice SEG of a study's current result for blinded reading:
    validated like an edit, stored in the instance store, recorded as ``EditSubmitted``
    with ``source`` = the mask's origin."""
    events = [e for _, e in await bus.history(study_uid)]
    cases = cases_of_study(events)
    current = [cases[run_key]] if run_key and run_key in cases else current_cases(cases)
    seg_cases = [c for c in current if any(Path(k).name.startswith("seg-")
                                           for k in c.result.result_keys)]
    if len(seg_cases) != 1:
        raise ReviewRefused(f"study {study_uid} has {len(seg_cases)} current results with a "
                            "segmentation; name one with --run")
    case = seg_cases[0]
    ai_seg = next(cfg.results_dir / k for k in case.result.result_keys
                  if Path(k).name.startswith("seg-"))
    dicom_files.validate_edit(data, ai_seg_path=ai_seg, study_uid=study_uid,
                              source_series=case.result.selected_series)
    stored = InstanceStore(cfg.instances_dir).put([data])
    admin = User(actor, parse_roles(["admin"]))
    ev = build_edit(case, admin, store_key=stored.store_key, sha256=stored.sha256,
                    source=source)
    await bus.publish(ev)
    return ev


@review_app.command("add-mask")
def add_mask_command(
    ctx: typer.Context,
    study_uid: Annotated[str, typer.Argument(help="StudyInstanceUID.")],
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="DICOM SEG.")],
    source: Annotated[str, typer.Option(help="Where the mask comes from (e.g. expert, "
                                        "novice).")],
    run: Annotated[str | None, typer.Option(help="Run key, if several results.")] = None,
    actor: Annotated[str, typer.Option(help="Who registers it (recorded).")] = "admin",
) -> None:
    """Add an expert or novice segmentation of a study for blinded reading."""
    settings = _settings(ctx)
    cfg = review_config(settings)
    if source == "ai":
        err.print("[red]review:[/] the source 'ai' is the AI's own result")
        raise typer.Exit(2)

    async def go() -> Event:
        async with open_bus(settings) as bus:
            return await add_mask(bus, cfg, study_uid, source, file.read_bytes(), actor, run)

    try:
        ev = asyncio.run(go())
    except (ReviewRefused, dicom_files.EditRejected) as exc:
        err.print(f"[red]review:[/] {exc}")
        raise typer.Exit(1) from None
    out.print(f"{source} mask recorded for run {getattr(ev, 'run_key', '?')} "
              f"(event {ev.event_id})")


@review_app.command("unblinding-key")
def unblinding_key_command(
    ctx: typer.Context,
    out_file: Annotated[Path, typer.Option("--out", help="JSON file label -> source "
                                           "(mode 0600), for LASTMILE_UNBLINDING_KEY.")],
) -> None:
    """Write the blinded study's key (label -> ai/expert/novice) for every run of its
    pipeline in the log; only the holder of the study configuration (its salt) can."""
    settings = _settings(ctx)
    cfg = review_config(settings)
    if cfg.blinded_study is None:
        err.print(f"[red]review:[/] {ENV_BLINDED} is not set")
        raise typer.Exit(3)
    try:
        study = load_blinded_study(cfg.blinded_study)
    except BlindedStudyError as exc:
        err.print(f"[red]review:[/] {exc}")
        raise typer.Exit(3) from None

    async def go() -> dict[str, str]:
        async with open_bus(settings) as bus:
            evs = [e async for _, e, _ in bus.read(
                filter_subject=type_filter(InferenceCompleted.type_name()))
                if isinstance(e, Event)]
            return unblinding(study, evs)

    key = asyncio.run(go())
    fd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(key, f, indent=1, sort_keys=True)
    out.print(f"{len(key)} labels written to {out_file}")


# --------------------------------------------------------------------------- assignment


class CaseAssignmentService(Service):
    """Assigns each new result (after QC for gated pipelines) to its pipeline's readers."""

    name = "review-assigner"

    def __init__(self, cfg: ReviewConfig) -> None:
        self.cfg = cfg

    def readers(self, pipeline: str) -> list[str]:
        try:
            return load_users(self.cfg.users_file).readers_of(pipeline)
        except AuthError as exc:
            log.error("users file: %s; no assignment made", exc)
            raise

    async def handle(self, bus: EventBus, event: Event) -> int:
        if not isinstance(event, InferenceCompleted | QcPassed) or not event.pipeline:
            return 0
        made = assignments(event, self.readers(event.pipeline),
                           qc_pipelines=self.cfg.qc_pipelines)
        for ev in made:
            await bus.publish(ev)
        return len(made)

    async def run(self, bus: EventBus, stop: asyncio.Event) -> None:
        async def handler(event: Event, delivery: Delivery) -> None:
            await self.handle(bus, event)

        await bus.consume(ASSIGNER_DURABLE, handler, filter_subjects=[
            type_filter(InferenceCompleted.type_name()), type_filter(QcPassed.type_name())],
            stop=stop, max_attempts=5, ack_wait_s=30.0)


def review_services(settings: Settings) -> list[Service]:
    return [CaseAssignmentService(review_config(settings))]


# --------------------------------------------------------------------------- seeding


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


# --------------------------------------------------------------------------- bench


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
    from lastmile.dashboards_wiring import wait_for_page

    wait_for_page(page, timeout_ms)
    page.wait_for_function(
        """() => { const i = document.querySelector('[data-testid="stImage"] img');
                   return i && i.complete && i.naturalWidth > 0; }""",
        timeout=timeout_ms, polling=50)


@contextlib.contextmanager
def review_dashboard(db: Path, bus: BusSettings, state_dir: Path, users_file: Path,
                     port: int, log_path: Path | None = None,
                     extra_env: dict[str, str] | None = None) -> Iterator[Any]:
    from lastmile.dashboards_wiring import DashboardProcess

    env = {ENV_STATE_DIR: str(state_dir), ENV_USERS: str(users_file), ENV_DEMO: "0",
           **(extra_env or {})}
    with DashboardProcess(db, bus, port, log_path=log_path, extra_env=env) as proc:
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
    from events.nats_server import EmbeddedNats, free_port
    from lastmile.dashboards_wiring import browser, publish_and_fold

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
                page.goto(url)
                from lastmile.dashboards_wiring import wait_for_page

                wait_for_page(page)
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


def bench_review_command(
    opens: Annotated[int, typer.Option(min=3, help="Warm case opens to time.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Seed real pipeline results, start the pages, and time warm case loads (deep link
    to drawn image) and the clicks of an "agree" in headless Chromium."""
    result = run_review_bench(opens)
    if as_json:
        print(json.dumps(result.as_dict(), indent=1))
        return
    t = Table(title="bench review: case page (BTS, deep link, signed in)")
    for col in ("opens", "cold (ms)", "warm p50 (ms)", "warm p90 (ms)", "clicks to agree"):
        t.add_column(col)
    t.add_row(str(result.case_loads), f"{result.cold_ms:.0f}", f"{result.warm_p50_ms:.0f}",
              f"{result.warm_p90_ms:.0f}", str(result.agree_clicks))
    out.print(t)
    out.print(f"{result.target}: {result.verdict}. Peer: {result.peer}.")
