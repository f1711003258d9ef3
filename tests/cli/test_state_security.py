"""The state directory is owner-only and its single-writer stores are locked (issue 18,
items 16 and 17): real `lastmile up` processes with the embedded nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from events.catalogue import InferenceRequested
from events.jetstream import EventBus
from events.nats_server import free_port
from lastmile.settings import Settings

pytestmark = pytest.mark.server

LASTMILE = [sys.executable, "-m", "lastmile"]
STUDY = "1.2.826.0.1.3680043.8.498.1617"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("LASTMILE_")}
    e.update(LASTMILE_STATE_DIR=str(tmp_path / "state"), LASTMILE_NATS_PORT=str(free_port()),
             LASTMILE_SERVICES='["projector"]', COLUMNS="200")
    return e


@contextlib.contextmanager
def lastmile_up(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen([*LASTMILE, "up"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "Lastmile is up" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"lastmile up did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _site(env: dict[str, str]) -> Settings:
    return Settings(state_dir=Path(env["LASTMILE_STATE_DIR"]),
                    nats_port=int(env["LASTMILE_NATS_PORT"]))


async def _publish_and_wait_for_projector(settings: Settings) -> None:
    bus = await EventBus.connect(settings.bus())
    try:
        await bus.publish(InferenceRequested.new(actor="t", study_uid=STUDY, pipeline="bts",
                                                 run_key="k1"))
    finally:
        await bus.close()
    deadline = time.monotonic() + 30
    while not settings.duckdb_path.exists():
        assert time.monotonic() < deadline, "the projector wrote no DuckDB file"
        await asyncio.sleep(0.2)


def _open_to_others(root: Path) -> list[str]:
    return [f"{p} {stat.S_IMODE(p.lstat().st_mode):o}" for p in [root, *root.rglob("*")]
            if not p.is_symlink() and p.lstat().st_mode & 0o077]


def test_up_makes_everything_under_the_state_dir_owner_only(
        env: dict[str, str], tmp_path: Path) -> None:
    state = Path(env["LASTMILE_STATE_DIR"])
    (state / "results").mkdir(parents=True, mode=0o755)
    state.chmod(0o755)  # as an older installation (or `mkdir`) left it
    old = state / "results" / "sr-1.2.3.dcm"
    old.write_bytes(b"patient data")
    old.chmod(0o644)
    with lastmile_up(env, tmp_path / "up.log"):
        asyncio.run(_publish_and_wait_for_projector(_site(env)))
        assert "readable by group or others: made" in (tmp_path / "up.log").read_text()
        made = {p.name for p in state.rglob("*")}
        assert {"lastmile.duckdb", "nats-credentials.json", "nats.conf", "sr-1.2.3.dcm"} <= made
        assert any(p.parent.name == "msgs" for p in state.rglob("*.blk"))  # the JetStream store
        assert _open_to_others(state) == []


def test_a_second_up_on_the_same_state_dir_is_refused_naming_the_first(
        env: dict[str, str], tmp_path: Path) -> None:
    with lastmile_up(env, tmp_path / "up.log") as first:
        asyncio.run(_publish_and_wait_for_projector(_site(env)))
        # another NATS port, so the port check does not catch it: the store lock does
        second = subprocess.run([*LASTMILE, "up"], env={**env, "LASTMILE_NATS_PORT": str(
            free_port())}, capture_output=True, text=True, timeout=60)
        text = " ".join(second.stderr.split())
        assert second.returncode == 1, second.stdout + second.stderr
        assert "JetStream store" in text and f"in use by pid {first.pid}" in text, text
        assert "lastmile up" in text  # the holder's command line

        # a second writer of the read model is refused too, naming the projector's process
        rebuild = subprocess.run([*LASTMILE, "projections", "rebuild"], env=env,
                                 capture_output=True, text=True, timeout=60)
        text = " ".join(rebuild.stderr.split())
        assert rebuild.returncode == 1 and f"in use by pid {first.pid}" in text, text
        assert "lastmile.duckdb" in text

        # an extra worker on the same host and state dir, pointed at the first's NATS with
        # the site's per-role credentials, still runs (it writes neither store)
        extra_env = {**env, "LASTMILE_SERVICES": '["engine"]',
                     "LASTMILE_NATS_URL": f"nats://127.0.0.1:{env['LASTMILE_NATS_PORT']}",
                     "LASTMILE_NATS_CREDENTIALS_FILE": str(
                         Path(env["LASTMILE_STATE_DIR"]) / "nats-credentials.json")}
        with lastmile_up(extra_env, tmp_path / "extra.log") as extra:
            assert extra.poll() is None

        # readers still run beside it
        audit = subprocess.run([*LASTMILE, "audit", STUDY, "--json"], env=env,
                               capture_output=True, text=True, timeout=60)
        assert audit.returncode == 0 and "engine.inference.requested" in audit.stdout
        metrics = subprocess.run([*LASTMILE, "metrics", "--json"], env=env,
                                 capture_output=True, text=True, timeout=60)
        assert metrics.returncode == 0, metrics.stderr
        assert first.poll() is None
