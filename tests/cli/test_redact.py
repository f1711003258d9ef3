"""`lastmile redact` (issue 18, item 2): a value that leaked into the log is erased from
the JetStream store files on disk, the DuckDB read model and later exports, and the
redaction is an event without the value. A real nats-server, real `lastmile` processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from events.catalogue import InferenceFailed, InferenceRequested, InstanceRejected
from events.nats_server import free_port
from lastmile.runtime import open_bus
from lastmile.settings import Settings
from projections.duckdb_store import ProjectionStore
from projections.projector import rebuild

pytestmark = pytest.mark.server

LASTMILE = [sys.executable, "-m", "lastmile"]
STUDY = "1.2.826.0.1.3680043.8.498.2424"
MARKER = "13.04.1937"  # a non-conformant PatientBirthDate quoted by an exception


def _files_with(root: Path, needle: bytes) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and needle in p.read_bytes())


def _duckdb_rows_with(path: Path, needle: str) -> int:
    con = duckdb.connect(str(path), read_only=True)
    try:
        hits = 0
        for (table,) in con.execute("SELECT table_name FROM information_schema.tables "
                                    "WHERE table_type = 'BASE TABLE'").fetchall():
            rows = con.execute(f'SELECT * FROM "{table}"').fetchall()
            hits += sum(needle in str(row) for row in rows)
        return hits
    finally:
        con.close()


async def _leak(settings: Settings) -> list[int]:
    """Three clean facts and three that quote the value; returns the leaking sequences."""
    leaking = []
    async with open_bus(settings) as bus:
        await bus.publish(InferenceRequested.new(actor="w", study_uid=STUDY, pipeline="bts",
                                                 run_key="k1"))
        p = await bus.publish(InferenceFailed.new(
            actor="w", study_uid=STUDY, pipeline="bts", run_key="k1", operator="write_sr",
            error=f"ValueError: invalid date '{MARKER}' for PatientBirthDate", attempt=1,
            final=True))
        leaking.append(p.sequence)
        p = await bus.publish(InstanceRejected.new(
            actor="LASTMILE", study_uid=STUDY, reason=f"bad value {MARKER}", status=0xA900,
            status_name="x", calling_ae="A", called_ae="B"))
        leaking.append(p.sequence)
        await bus.publish(InferenceRequested.new(actor="w", study_uid=STUDY, pipeline="bts",
                                                 run_key="k2"))
        p = await bus.publish(InferenceFailed.new(
            actor="w", study_uid=STUDY, pipeline="bts", run_key="k2", operator="write_sr",
            error=f'date "{MARKER}"', attempt=1, final=True))
        leaking.append(p.sequence)
        with ProjectionStore(settings.duckdb_path) as store:
            await rebuild(bus, store)
    return leaking


def test_redact_erases_a_leaked_value_everywhere_and_records_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASTMILE_")}
    env.update(LASTMILE_STATE_DIR=str(state), LASTMILE_NATS_PORT=str(free_port()),
               COLUMNS="300")
    settings = Settings(state_dir=state, nats_port=int(env["LASTMILE_NATS_PORT"]))
    leaking = asyncio.run(_leak(settings))
    needle = MARKER.encode()
    # the test can see the leak: in the JetStream block files and in DuckDB
    assert any(f.startswith("nats/") for f in _files_with(state, needle))
    assert _duckdb_rows_with(settings.duckdb_path, MARKER) >= 2

    values = tmp_path / "leaked.txt"
    values.write_text(MARKER + "\n")
    run = subprocess.run([*LASTMILE, "redact", "--grep-file", str(values), "--dry-run",
                          "--reason", "birth date quoted by the SR writer"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"{len(leaking)} message(s) would be erased" in run.stdout
    assert _files_with(state, needle)  # a dry run changes nothing

    run = subprocess.run([*LASTMILE, "redact", "--grep-file", str(values), "--yes",
                          "--reason", "birth date quoted by the SR writer"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"erased {len(leaking)} message(s)" in " ".join(run.stdout.split())
    assert MARKER not in run.stdout + run.stderr

    # nowhere under the state dir any more: JetStream's files, DuckDB, the rest
    assert _files_with(state, needle) == []
    assert _duckdb_rows_with(settings.duckdb_path, MARKER) == 0
    # the rebuilt read model still has the clean facts
    con = duckdb.connect(str(settings.duckdb_path), read_only=True)
    try:
        tables = {t for (t,) in con.execute("SELECT table_name FROM information_schema.tables"
                                            ).fetchall()}
        assert "inference" in tables
        assert con.execute("SELECT count(*) FROM inference").fetchone() == (2,)
    finally:
        con.close()

    # the log: the clean facts, and one redaction event that names the messages only
    replay = subprocess.run([*LASTMILE, "replay"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert replay.returncode == 0, replay.stderr
    events = [json.loads(line) for line in replay.stdout.splitlines()]
    assert MARKER not in replay.stdout
    types = [e["type"] for e in events]
    assert types == ["engine.inference.requested", "engine.inference.requested",
                     "system.log.redacted"]
    redacted = events[-1]
    assert redacted["sequences"] == leaking
    assert redacted["types"] == ["engine.inference.failed", "ingest.instance.rejected",
                                 "engine.inference.failed"]
    assert redacted["actor"].startswith("os:")
    assert redacted["reason"] == "birth date quoted by the SR writer"

    # an export made now holds no trace either
    export = subprocess.run([*LASTMILE, "replay", "--to", "parquet", str(tmp_path / "out"),
                             "--deidentify"], env=env, capture_output=True, text=True,
                            timeout=120)
    assert export.returncode == 0, export.stderr
    assert _files_with(tmp_path / "out", needle) == []


def test_redact_refuses_unsafe_requests(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LASTMILE_")}
    env.update(LASTMILE_STATE_DIR=str(tmp_path / "state"), LASTMILE_NATS_PORT=str(free_port()))
    short = tmp_path / "short.txt"
    short.write_text("M\n")  # a PatientSex would match half the log
    run = subprocess.run([*LASTMILE, "redact", "--grep-file", str(short), "--reason", "x"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "shorter than 4 bytes" in " ".join(run.stderr.split())
    value = tmp_path / "v.txt"
    value.write_text(MARKER + "\n")
    run = subprocess.run([*LASTMILE, "redact", "--grep-file", str(value),
                          "--reason", f"it was {MARKER}"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and "contains one of the values" in run.stderr
    assert MARKER not in run.stdout + run.stderr
