"""The command line as a user runs it: real processes, a real embedded nats-server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from events.catalogue import InferenceRequested, RouteUnmatched
from events.jetstream import EventBus
from events.nats_server import free_port
from lastmile.settings import Settings

LASTMILE = [sys.executable, "-m", "lastmile"]
COMMANDS = [[], ["up"], ["audit"], ["replay"], ["bench"], ["bench", "events"]]


def run(args: list[str], env: dict[str, str],
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LASTMILE, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("LASTMILE_")}
    e.update(LASTMILE_STATE_DIR=str(tmp_path / "state"), LASTMILE_NATS_PORT=str(free_port()),
             LASTMILE_DICOM_PORT=str(free_port()), LASTMILE_DASHBOARD_PORT=str(free_port()),
             COLUMNS="200")
    return e


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "lastmile")
def test_every_command_has_help(command: list[str], env: dict[str, str]) -> None:
    result = run([*command, "--help"], env)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_a_wrong_flag_is_one_clear_error(env: dict[str, str]) -> None:
    result = run(["audit", "--bogus"], env)
    assert result.returncode == 2
    assert "No such option: --bogus" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_server_is_one_clear_line_and_exit_4(env: dict[str, str]) -> None:
    result = run(["--nats-url", f"nats://127.0.0.1:{free_port()}", "audit", "1.2.3"], env)
    assert result.returncode == 4
    assert "cannot reach NATS at nats://127.0.0.1:" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_bad_config_names_the_line_and_the_key(env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "lastmile.toml"
    config.write_text('state_dir = "x"\n\ndicom_max_pdu = "four"\nnats_snyc = "always"\n')
    result = run(["--config", str(config), "audit", "1.2.3"], env)
    assert result.returncode == 3
    text = " ".join(result.stderr.split())
    assert f"{config}:3: dicom_max_pdu:" in text
    assert f"{config}:4: nats_snyc: unknown setting" in text


def test_bad_environment_value_is_named(env: dict[str, str]) -> None:
    result = run(["audit", "1.2.3"], {**env, "LASTMILE_NATS_SYNC": "sometimes"})
    assert result.returncode == 3
    assert "LASTMILE_NATS_SYNC" in result.stderr


@pytest.fixture
def lastmile_up(env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([*LASTMILE, "up"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    assert proc.stdout is not None
    seen = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen += line
        if "Lastmile is up" in line:
            break
        if proc.poll() is not None:
            pytest.fail(f"lastmile up exited: {seen}")
    else:
        proc.kill()
        pytest.fail(f"lastmile up did not come up: {seen}")
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _site(env: dict[str, str]) -> Settings:
    """The settings of the site that `lastmile up` in ``env`` runs (its state dir)."""
    return Settings(state_dir=Path(env["LASTMILE_STATE_DIR"]),
                    nats_port=int(env["LASTMILE_NATS_PORT"]))


async def _publish(env: dict[str, str], events: list[object]) -> None:
    bus = await EventBus.connect(_site(env).bus())  # the site's admin credential
    for event in events:
        await bus.publish(event)  # type: ignore[arg-type]
    await bus.close()


def _server_pids(env: dict[str, str]) -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"lastmile-{env['LASTMILE_NATS_PORT']}|"
                          f"{env['LASTMILE_STATE_DIR']}/nats/nats.conf"],
                         capture_output=True, text=True)
    return out.stdout.split()


@pytest.mark.server
def test_up_serves_audit_and_replay_and_stops_cleanly(
        lastmile_up: subprocess.Popen[str], env: dict[str, str], tmp_path: Path) -> None:
    study = "1.2.826.0.1.3680043.8.498.4242"
    events = [
        RouteUnmatched.new(actor="LASTMILE", study_uid=study, called_ae="LASTMILE",
                           reason="no rule matched"),
        InferenceRequested.new(actor="t", study_uid=study, pipeline="bts", run_key="k1"),
        InferenceRequested.new(actor="t", study_uid="1.2.3.other", pipeline="bts",
                               run_key="k2"),
    ]
    asyncio.run(_publish(env, events))
    assert _server_pids(env), "the embedded nats-server should be running"

    audit = run(["audit", study, "--json"], env)
    assert audit.returncode == 0, audit.stderr
    rows = json.loads(audit.stdout)
    assert [r["type"] for r in rows] == ["ingest.route.unmatched", "engine.inference.requested"]
    assert [r["sequence"] for r in rows] == [1, 2]

    human = run(["audit", study], env)
    assert "ingest.route.unmatched" in human.stdout and "no rule matched" in human.stdout

    assert run(["audit", "1.2.404"], env).returncode == 5

    lines = run(["replay"], env).stdout.splitlines()
    assert [json.loads(x)["event_id"] for x in lines] == [e.event_id for e in events]

    out = tmp_path / "export"
    replay = run(["replay", "--to", "parquet", str(out), "--deidentify", "--json"], env)
    assert replay.returncode == 0, replay.stderr
    assert json.loads(replay.stdout)["events"] == 3
    table = pq.read_table(out / "events.parquet").to_pylist()
    raw = (out / "events.parquet").read_bytes()
    assert study.encode() not in raw  # UIDs remapped everywhere, body included
    remapped = {r["study_uid"] for r in table}
    assert len(remapped) == 2 and all(u.startswith("2.25.") for u in remapped)
    assert table[0]["study_uid"] == table[1]["study_uid"]  # consistently

    lastmile_up.send_signal(signal.SIGINT)
    output = lastmile_up.communicate(timeout=30)[0]
    assert lastmile_up.returncode == 0, output
    assert "stopped cleanly" in output
    assert _server_pids(env) == []


@pytest.mark.server
def test_audit_works_on_a_stopped_installation(env: dict[str, str]) -> None:
    """No `lastmile up` running: audit starts the embedded server on the state dir."""
    result = run(["audit", "1.2.3"], env)
    assert result.returncode == 5 and "no events for study 1.2.3" in result.stderr
    assert _server_pids(env) == []


@pytest.mark.server
def test_bench_events_reports_both_paths(env: dict[str, str]) -> None:
    result = run(["bench", "events", "--count", "2000", "--json"], env, timeout=120)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["count"] == 2000
    for key in ("lastmile_publish_per_s", "lastmile_consume_per_s", "plain_publish_per_s",
                "plain_consume_per_s"):
        assert figures[key] > 0
    assert 200 < figures["event_bytes"] < 600


@pytest.mark.server
@pytest.mark.slow
def test_bench_ingest_measures_every_receiver_and_the_floor(env: dict[str, str]) -> None:
    """The benchmark's own checks run too: it fails if a receiver stored fewer files."""
    result = run(["bench", "ingest", "--count", "20", "--studies", "2", "--no-senders",
                  "--json"], env,
                 timeout=240)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    names = {(r["receiver"].split()[0], r["associations"]) for r in figures["runs"]}
    for a in (1, 2):
        assert {("dcmtk", a), ("bare", a), ("pynetdicom", a), ("lastmile", a)} <= names
        assert f"lastmile/pynetdicom + fsync + acked event ({a} assoc)" in figures["ratios"]
    assert all(r["instances"] == 20 and r["mb_per_s"] > 0 for r in figures["runs"])
    assert 0 < figures["completion_p50_s"] < 2.0


def test_services_setting_chooses_what_up_runs(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker-only host (scale-out) runs the engine and nothing else."""
    from lastmile.services import services_for
    from lastmile.settings import load_settings

    monkeypatch.setenv("LASTMILE_SERVICES", '["engine"]')
    names = [s.name for s in services_for(load_settings(state_dir=tmp_path))]
    assert names == ["engine-worker", "engine-edits", "pacs-redelivery"]
    monkeypatch.delenv("LASTMILE_SERVICES")
    everything = {s.name for s in services_for(load_settings(state_dir=tmp_path))}
    assert {"engine-worker", "projector", "dashboard"} <= everything
    assert len(everything) > 3
