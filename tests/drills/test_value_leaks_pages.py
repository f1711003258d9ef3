"""Drill (issue 18 item 2, log-wide, the pages' side): real DICOM files (pydicom-data)
whose every text value is damaged around a marker, sent by dcmtk's storescu to `lastmile
up` (receiver, engine, projector and the pages behind their front, on a real
nats-server). Whatever the services accept or refuse, no marker may reach an event, the
service log, the DuckDB read model, `lastmile metrics --json`, the replay, the
de-identified export, or any governance page (each study's audit page with every event
opened) as a signed-in governance user sees it in Chromium: reasons name attribute
keywords, never values.

``tests/drills/test_value_leaks.py`` sends malformed phantom studies through the same
path and searches the JetStream store on disk and both exports byte for byte; this one
adds real files from another source and the pages.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import duckdb
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement

from bench.review import sign_in, write_user
from events.codec import encode
from events.jetstream import BusSettings, EventBus
from events.nats_server import EmbeddedNats, free_port
from tests.drills.procs import LASTMILE, clean_env, lastmile_up, storescu
from tests.malformed import KEEP, MARKER, TEXT_VRS

pytestmark = [
    pytest.mark.server, pytest.mark.slow,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="Debian dcmtk not installed"),
]

SOURCES = ("CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm", "SC_rgb.dcm")
PASSWORD = "correct horse battery"
MARKS = (MARKER, MARKER.lower())
#: header values ``ingest.instance.stored`` copies on purpose for routing (events/
#: catalogue.py): left valid in both copies (other descriptive values are damaged: the
#: receiver keeps them only when well formed)
DESCRIPTIVE = {"Modality", "SeriesDescription"}
LEAKS = Path(__file__).resolve().parents[2] / "test-artifacts" / "value-leaks.json"


def _damage(ds: pydicom.Dataset, keep: set[str]) -> None:
    """Every text attribute but ``keep``: damaged around MARKER as
    ``tests.malformed.malformed`` does, written as raw bytes (pydicom will not hold a DS
    of "ZQX7.5")."""
    for elem in list(ds):  # DataElements (read from the file, values still valid)
        if elem.VR not in TEXT_VRS or elem.keyword in keep or elem.tag.group == 0x0002:
            continue
        value = {"DA": f"13.{MARKER}.1937", "TM": f"25:{MARKER}", "DS": f"{MARKER}.5",
                 "IS": f"{MARKER}.5", "CS": f"{MARKER.lower()} x", "AS": f"{MARKER}\\1",
                 "AE": f"{MARKER}\\1"}.get(elem.VR, f"{MARKER}-{'x' * 70}").encode()
        value += b" " * (len(value) % 2)
        ds._dict[elem.tag] = RawDataElement(elem.tag, elem.VR, len(value), value, 0,
                                            False, True)


def _damaged(out: Path) -> list[Path]:
    """Each source twice: every text value damaged but what routing needs (``KEEP``), and
    every text value damaged but the character set (both but ``DESCRIPTIVE``); new UIDs
    per copy so none is a duplicate. Written Explicit VR Little Endian (raw values need
    a known VR)."""
    files: list[Path] = []
    for name in SOURCES:
        for keep in (KEEP | DESCRIPTIVE, DESCRIPTIVE | {"SpecificCharacterSet"}):
            source = get_testdata_file(name)
            assert isinstance(source, str), name
            ds = pydicom.dcmread(source)
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.decompress()
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
            n = len(files) + 1
            ds.StudyInstanceUID = f"1.2.826.0.1.3680043.8.498.7781{n}"
            ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.8.498.7782{n}"
            ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.7783{n}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            _damage(ds, keep)
            path = out / f"{n:02d}-{name}"
            ds.save_as(path, enforce_file_format=True)
            assert MARKER.encode() in path.read_bytes()
            files.append(path)
    return files


def _hits(text: str) -> list[str]:
    """The lines of ``text`` with a marker (empty: clean)."""
    hits = []
    for line in text.splitlines():
        at = min((i for i in (line.find(m) for m in MARKS) if i >= 0), default=-1)
        if at >= 0:
            hits.append(line[max(0, at - 120):at + 60])
    return hits


def _no_leaks(where: str, leaked: dict[str, list[str]]) -> None:
    """Assert nothing leaked; else write what did to test-artifacts/value-leaks.json."""
    if leaked:
        LEAKS.parent.mkdir(parents=True, exist_ok=True)
        LEAKS.write_text(json.dumps({"where": where, "leaked": leaked}, indent=1))
    assert not leaked, f"{where}: {len(leaked)} with a damaged value; see {LEAKS}"


def _duckdb_hits(path: Path) -> list[str]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        hits = []
        for (table,) in con.execute("SELECT table_name FROM information_schema.tables "
                                    "WHERE table_type = 'BASE TABLE'").fetchall():
            for row in con.execute(f'SELECT * FROM "{table}"').fetchall():
                hits += [f"{table}: {h}" for h in _hits(str(row))]
        return hits
    finally:
        con.close()


def _parquet_hits(root: Path) -> list[str]:
    files = sorted(root.rglob("*.parquet"))
    assert files, f"no export under {root}"
    con = duckdb.connect()
    try:
        return [f"{f.name}: {h}" for f in files
                for row in con.execute("SELECT * FROM read_parquet(?)", [str(f)]).fetchall()
                for h in _hits(str(row))]
    finally:
        con.close()


async def _settled(bus: EventBus, studies: int, timeout_s: float = 120.0) -> list[Any]:
    """Every event once each study has a fact and the log stopped growing for 5 s."""
    deadline = time.monotonic() + timeout_s
    last, quiet_since = -1, time.monotonic()
    while True:
        events = [(seq, e) async for seq, e, _ in bus.read()]
        seen = {getattr(e, "study_uid", None) for _, e in events}
        if len(events) != last:
            last, quiet_since = len(events), time.monotonic()
        if (len(seen - {None}) >= studies and time.monotonic() - quiet_since > 5) \
                or time.monotonic() > deadline:
            return [e for _, e in events]
        await asyncio.sleep(0.5)


def _pages_text(url: str, studies: list[str], shots: Path) -> dict[str, str]:
    """The text of every governance page (and each study's audit page) as a governance
    user sees it in Chromium, after the front's sign-in."""
    from bench.dashboards import browser, wait_for_page
    from dashboards.process import PAGES, page_url

    out: dict[str, str] = {}
    with browser() as b:
        ctx = b.new_context(viewport={"width": 1500, "height": 1100})
        page = ctx.new_page()
        page.goto(f"{url}/overview")
        sign_in(page, "gov.leak", PASSWORD)
        targets = [page_url(url, p) for p in PAGES] + \
            [f"{url}/audit?study={s}" for s in studies]
        for i, target in enumerate(targets):
            page.goto(target)
            wait_for_page(page, 90_000)
            for summary in page.locator("details summary").all()[:30]:
                summary.click()  # an audit entry's whole event, a page's expanders
            page.wait_for_timeout(1000)
            wait_for_page(page, 90_000)
            out[target] = page.inner_text("body")
            page.screenshot(path=str(shots / f"page-{i:02d}.png"), full_page=True)
        ctx.close()
    return out


@pytest.mark.timeout(900)  # 15 pages in Chromium and four CLI runs on a loaded machine
async def test_damaged_values_reach_no_event_log_line_read_model_export_or_page(
        tmp_path: Path) -> None:
    files = _damaged(tmp_path)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    users = state / "users.toml"
    write_user(users, "gov.leak", PASSWORD, ["governance"])
    dicom_port, page_port = free_port(), free_port()
    with EmbeddedNats(tmp_path / "nats", port=free_port(), sync="2m") as server:
        env = clean_env(state_dir=str(state), nats_url=server.url, dicom_port=str(dicom_port),
                        dashboard_port=str(page_port), dicom_min_free_mb="0",
                        services='["ingest", "engine", "projector", "dashboard"]',
                        users_file=str(users))
        log = tmp_path / "up.log"
        with lastmile_up(env, log, wait_port=dicom_port, timeout_s=120):
            answers = []
            for path in files:  # one association each: a refusal does not stop the rest
                sent = await storescu(dicom_port, "LASTMILE", [path])
                answers.append((path.name, sent.returncode, bool(sent.succeeded)))
            assert any(ok for _, _, ok in answers), answers  # some were stored...
            bus = await EventBus.connect(BusSettings(servers=(server.url,)),
                                         ensure_stream=False)
            try:
                events = await _settled(bus, studies=len(files))
            finally:
                await bus.close()
            studies = sorted({e.study_uid for e in events if getattr(e, "study_uid", None)})
            kinds = sorted({e.type_name() for e in events})
            assert "ingest.instance.stored" in kinds, kinds
            bodies = {e.type_name() + " " + str(i): encode(e)[1].decode("utf-8", "replace")
                      for i, e in enumerate(events)}
            _no_leaks("events", {k: _hits(v) for k, v in bodies.items() if _hits(v)})
            pages = await asyncio.to_thread(  # Playwright sync API: off the event loop
                _pages_text, f"http://127.0.0.1:{page_port}", studies, tmp_path)
            audits = [pages[f"http://127.0.0.1:{page_port}/audit?study={s}"] for s in studies]
            assert all(s in text for s, text in zip(studies, audits, strict=True))  # drawn
            _no_leaks("pages", {k: _hits(v) for k, v in pages.items() if _hits(v)})
            cli = [*LASTMILE]
            metrics = subprocess.run([*cli, "metrics", "--json"], env=env, capture_output=True,
                                     text=True, timeout=120)
            assert metrics.returncode == 0, metrics.stderr[-2000:]
            json.loads(metrics.stdout)
            assert not _hits(metrics.stdout + metrics.stderr)
            replay = subprocess.run([*cli, "replay"], env=env, capture_output=True,
                                    text=True, timeout=120)
            assert replay.returncode == 0 and len(replay.stdout.splitlines()) >= len(events)
            assert not _hits(replay.stdout + replay.stderr)
            export = tmp_path / "export"
            done = subprocess.run([*cli, "replay", "--deidentify", "--to", "parquet",
                                   str(export)], env=env, capture_output=True, text=True,
                                  timeout=120)
            assert done.returncode == 0, done.stderr[-2000:]
            assert not _parquet_hits(export)
        service_log = log.read_text(errors="replace")
        assert "Lastmile is up" in service_log and not _hits(service_log), _hits(service_log)
        db_files = sorted(state.rglob("*.duckdb"))
        assert db_files
        for db in db_files:
            assert not _duckdb_hits(db), db
    # the log's own files, byte for byte (message bodies and headers as JetStream keeps them
    # on disk), and every state file but the DICOM stores (instances and results carry the
    # patient's attributes by design)
    for root, skip in ((tmp_path / "nats", ()), (state, ("instances", "results"))):
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root)
            if rel.parts[0] in skip:
                continue
            data = path.read_bytes()
            assert not any(m.encode() in data for m in MARKS), rel
