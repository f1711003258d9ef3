"""The dashboard service of `lastmile up`: starts Streamlit on the configured port, bound to
127.0.0.1, and stops it (process gone, port free) when `up` stops."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from dashboards.process import DashboardError, streamlit_command
from events.jetstream import EventBus
from events.nats_server import free_port
from lastmile.cli_dashboard import dashboard_command
from lastmile.services_dashboards import DashboardService
from lastmile.settings import Settings
from projections.duckdb_store import ProjectionStore

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def test_command_binds_loopback_and_says_nothing_home() -> None:
    cmd = streamlit_command(8599)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "8599"
    assert cmd[cmd.index("--browser.gatherUsageStats") + 1] == "false"


async def test_service_starts_and_stops_streamlit(bus: EventBus, tmp_path: Path) -> None:
    port = free_port()
    settings = Settings(state_dir=tmp_path, dashboard_port=port)
    ProjectionStore(settings.duckdb_path).close()
    stop = asyncio.Event()
    service = DashboardService(settings)
    task = asyncio.create_task(service.run(bus, stop))
    for _ in range(300):
        if await asyncio.to_thread(_answers, port):
            break
        assert not task.done(), task.exception()
        await asyncio.sleep(0.2)
    assert await asyncio.to_thread(_answers, port)
    stop.set()
    await asyncio.wait_for(task, 30)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "streamlit still listening"
    assert (tmp_path / "dashboard.log").exists()


async def test_service_refuses_a_busy_port(bus: EventBus, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        settings = Settings(state_dir=tmp_path, dashboard_port=s.getsockname()[1])
        with pytest.raises(DashboardError, match="in use"):
            await DashboardService(settings).run(bus, asyncio.Event())


def test_dashboard_command_without_read_model_says_what_to_do(tmp_path: Path) -> None:
    app = typer.Typer()

    @app.callback()
    def main(ctx: typer.Context) -> None:
        ctx.obj = Settings(state_dir=tmp_path)

    app.command("dashboard")(dashboard_command)
    result = CliRunner().invoke(app, ["dashboard"])
    assert result.exit_code == 5
    assert "projections rebuild" in result.output
