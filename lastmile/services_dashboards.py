"""The dashboard service of ``lastmile up``: the Streamlit pages behind their
authenticating front (``dashboards.process.PagesProcess``) beside the other services, the
front bound to 127.0.0.1 on ``settings.dashboard_port``; the pages read the DuckDB file
read-only between the projector's batches and the event log for audits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from dashboards.process import DashboardError, PagesProcess
from events.jetstream import EventBus
from lastmile.runtime import Service
from lastmile.settings import Settings

log = logging.getLogger("lastmile.dashboards")


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
        process = PagesProcess(s.duckdb_path, bus.settings, s.dashboard_port,
                               log_path=s.state_dir / "dashboard.log", state_dir=s.state_dir)
        await asyncio.to_thread(process.start)
        log.info("dashboard on %s (log %s)", process.url, process.log_path)
        try:
            while not stop.is_set():
                if process.poll() is not None:
                    raise DashboardError(f"the pages exited with {process.poll()}; "
                                         f"see {process.log_path}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
        finally:
            await asyncio.to_thread(process.stop)
