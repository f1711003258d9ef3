"""The dashboard as a child process: ``streamlit run dashboards/app.py`` bound to a loopback
port, started and stopped cleanly. Its location settings travel in its environment
(``LASTMILE_DASHBOARD_DUCKDB``, ``LASTMILE_DASHBOARD_BUS``, ``LASTMILE_DASHBOARD_STATE_DIR``),
never on its command line."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dashboards.config import ENV_BUS, ENV_DUCKDB, ENV_STATE_DIR, bus_to_json
from events.jetstream import BusSettings

APP = Path(__file__).resolve().parent.parent / "dashboards" / "app.py"


PAGES = ("overview", "agreement", "longitudinal", "drift", "reliability", "audit", "models")


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
