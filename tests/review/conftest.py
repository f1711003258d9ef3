"""A live review site for the browser tests: a real nats-server, real pipeline results
(phantom studies through the engine worker: BTS follow-up with SEG, HFD radiographs with
findings), the case-assignment service, the edit recomputer and the projector running
in a background thread, and the Streamlit pages in their own process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from playwright.sync_api import expect
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info

from bench.review import SeededSite, review_dashboard, seed_review_site, write_user
from dashboards.config import ReviewConfig
from events.jetstream import BusSettings, EventBus
from events.nats_server import EmbeddedNats, free_port
from lastmile.services_review import CaseAssignmentService

ROOT = Path(__file__).resolve().parents[2]
expect.set_options(timeout=15_000)  # the machine is shared: elements may take a while
ARTIFACTS = ROOT / "test-artifacts" / "review"
SECRET = b"review-test-secret-0123456789abcdef"
PASSWORD = "correct horse battery"
BLINDED_SALT = "salt-known-only-to-the-study-office"
USERS = {
    "reader.a": (["reader"], ["bts", "hfd"]),
    "reader.b": (["reader"], ["bts", "hfd"]),
    "qc.one": (["qc"], ["hfd"]),
    "reader.c": (["reader"], ["lts"]),
    "gov.one": (["governance"], []),
}


class Services:
    """The assigner, the edit recomputer and the projector on one event loop in a thread."""

    def __init__(self, bus_settings: BusSettings, state: Path, users: Path, db: Path) -> None:
        self.bus_settings, self.state, self.users, self.db = bus_settings, state, users, db
        self.loop = asyncio.new_event_loop()
        self.stop_event: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        from engine.edits import EditConfig, EditRecomputer
        from projections.duckdb_store import ProjectionStore
        from projections.projector import Projector

        self.stop_event = asyncio.Event()
        bus = await EventBus.connect(self.bus_settings)
        cfg = ReviewConfig(state_dir=self.state, users_file=self.users)
        store = ProjectionStore(self.db, keep_open=False)
        projector = Projector(store, batch_size=2000, idle_s=0.1)
        recomputer = EditRecomputer(EditConfig(self.state / "instances", self.state / "results",
                                               worker_id="test-edits", max_attempts=2,
                                               ack_wait_s=10.0))
        self.ready.set()
        try:
            await asyncio.gather(
                CaseAssignmentService(cfg).run(bus, self.stop_event),
                recomputer.run(bus, self.stop_event),
                projector.follow(bus, self.stop_event))
        finally:
            store.close()
            await bus.close()

    def start(self) -> Services:
        self.thread.start()
        self.ready.wait(30)
        if self.error:
            raise self.error
        return self

    def stop(self) -> None:
        if self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(30)


@dataclass
class ReviewSite:
    url: str
    bus: BusSettings
    state: Path
    db: Path
    seeded: SeededSite
    users_file: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def query(self, sql: str, params: list[Any] | None = None) -> list[list[Any]]:
        """Read the DuckDB read model from another process (the projector writes it in
        this one; DuckDB allows one configuration per file per process)."""
        code = ("import duckdb, json, sys; con = duckdb.connect(sys.argv[1], read_only=True);"
                "print(json.dumps(con.execute(sys.argv[2], json.loads(sys.argv[3]))"
                ".fetchall(), default=str))")
        out = subprocess.run([sys.executable, "-c", code, str(self.db), sql,
                              json.dumps(params or [])], capture_output=True, text=True,
                             timeout=60, check=True)
        rows: list[list[Any]] = json.loads(out.stdout)
        return rows

    def history(self, study_uid: str) -> list[Any]:
        async def go() -> list[Any]:
            bus = await EventBus.connect(self.bus, ensure_stream=False)
            try:
                return [e for _, e in await bus.history(study_uid)]
            finally:
                await bus.close()

        return _off_thread(go())

    def run(self, make: Any) -> Any:
        """``await make(bus)`` on a fresh connection, off this thread."""
        async def go() -> Any:
            bus = await EventBus.connect(self.bus, ensure_stream=False)
            try:
                return await make(bus)
            finally:
                await bus.close()

        return _off_thread(go())

    def python(self, code: str) -> Any:
        """Run ``code`` (which prints JSON) in a child process with ``db`` bound to the
        read model path; returns the parsed output."""
        out = subprocess.run([sys.executable, "-c", f"db = {str(self.db)!r}\n{code}"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout)

    def publish(self, event: Any) -> None:
        async def go() -> None:
            bus = await EventBus.connect(self.bus, ensure_stream=False)
            try:
                await bus.publish(event)
            finally:
                await bus.close()

        _off_thread(go())


def _off_thread(coro: Any) -> Any:
    """Run a coroutine on another thread: Playwright's sync API keeps an event loop
    running on this one."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result(timeout=60)


async def _seed(bus_settings: BusSettings, state: Path) -> SeededSite:
    bus = await EventBus.connect(bus_settings)
    try:
        return await seed_review_site(bus, state, SECRET, bts_exams=2, hfd_exams=1,
                                      lts_exams=1)
    finally:
        await bus.close()


@pytest.fixture(scope="package")
def review_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReviewSite]:
    """One seeded site for the browser tests and the front's tests (seeding runs the
    engine: it is the slow part)."""
    tmp = tmp_path_factory.mktemp("review")
    users = tmp / "users.toml"
    for name, (roles, pipelines) in USERS.items():
        write_user(users, name, PASSWORD, roles, pipelines)
    db = tmp / "read.duckdb"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with EmbeddedNats(tmp / "nats", port=free_port(), sync="2m") as server:
        # the default stream name: `lastmile users ...` run by the tests (a CLI has no
        # stream option) records its access.user.changed facts on this site's stream
        bus_settings = BusSettings(servers=(server.url,), publish_retry_s=5.0)
        services = Services(bus_settings, tmp, users, db).start()
        try:
            seeded = asyncio.run(_seed(bus_settings, tmp))
            site = ReviewSite("", bus_settings, tmp, db, seeded, users)
            # 2 BTS x 2 readers, 1 LTS x 1 reader (HFD waits for QC)
            _wait_rows(site, "SELECT count(*) FROM assignments", 5)
            blinded = tmp / "blinded.toml"
            blinded.write_text(f'pipeline = "lts"\nsalt = "{BLINDED_SALT}"\n'
                               'readers = ["reader.c"]\nsources = ["ai", "expert", "novice"]\n')
            blinded.chmod(0o600)  # it holds the salt: a readable file is refused
            site.extra["blinded"] = blinded
            with review_dashboard(db, bus_settings, tmp, users, free_port(),
                                  log_path=ARTIFACTS / "streamlit.log",
                                  extra_env={"LASTMILE_BLINDED_STUDY": str(blinded)}) as proc:
                site.url = proc.url
                site.extra["pages"] = proc  # the front and, behind it, Streamlit
                yield site
        finally:
            services.stop()


def _wait_rows(site: ReviewSite, sql: str, at_least: int, timeout_s: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    n = 0
    while time.monotonic() < deadline:
        try:
            n = int(site.query(sql)[0][0])
        except subprocess.CalledProcessError:
            n = 0
        if n >= at_least:
            return
        time.sleep(0.3)
    raise AssertionError(f"{sql}: {n} rows, wanted {at_least}")


wait_rows = _wait_rows


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    from bench.dashboards import browser

    with browser() as b:
        yield b


@pytest.fixture
def context(chromium: Any) -> Iterator[Any]:
    """A fresh browser profile (no sign-in cookie) per test."""
    ctx = chromium.new_context(viewport={"width": 1500, "height": 1100})
    try:
        yield ctx
    finally:
        ctx.close()


def deflate_bomb(seg: pydicom.Dataset, out: Path, inflated_mib: int = 1024) -> Path:
    """A real SEG in Deflated Explicit VR Little Endian whose dataset ends with 1 GiB of
    Data Set Trailing Padding (FFFC,FFFC): about 1 MB on disk."""
    meta = pydicom.dataset.FileMetaDataset(seg.file_meta)
    meta.TransferSyntaxUID = pydicom.uid.UID("1.2.840.10008.1.2.1.99")
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, seg)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    size = inflated_mib * 1024 * 1024
    parts = [z.compress(body.getvalue()),
             z.compress(b"\xfc\xff\xfc\xffOB\x00\x00" + size.to_bytes(4, "little"))]
    zeros = bytes(1024 * 1024)
    parts += [z.compress(zeros) for _ in range(inflated_mib)]
    parts.append(z.flush())
    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    out.write_bytes(head.getvalue() + b"".join(parts))
    return out
