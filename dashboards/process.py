"""The pages as child processes: ``streamlit run dashboards/app.py`` bound to a loopback
port (``DashboardProcess``), and the authenticating front in front of it
(``PagesProcess``: what `lastmile up`, `lastmile dashboard`, the benches and the tests
start), started and stopped cleanly. Location settings travel in the environment
(``LASTMILE_DASHBOARD_DUCKDB``, ``LASTMILE_DASHBOARD_BUS``, ``LASTMILE_DASHBOARD_STATE_DIR``),
never on a command line.

    PagesProcess(duckdb_path, bus, port=8501, state_dir=...).start()
      1. a secret for this start (``LASTMILE_FRONT_SECRET``, 256 random bits), given to both
         children in their environment only;
      2. ``streamlit run dashboards/app.py`` on 127.0.0.1:<free port>;
      3. ``python -m dashboards.front --port 8501`` with ``LASTMILE_FRONT_UPSTREAM``
         pointing at Streamlit; ready when the front's ``/_lm/health`` answers 200.

Front options from the environment: ``LASTMILE_FRONT_TLS_CERT``/``LASTMILE_FRONT_TLS_KEY``
(serve HTTPS; cookies are then Secure), ``LASTMILE_FRONT_TRUSTED_PROXIES`` (addresses of a
TLS-terminating reverse proxy whose ``X-Forwarded-For``/``-Proto`` are believed; none by
default), and those read by ``dashboards.front.FrontConfig``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dashboards.config import (
    ENV_BUS,
    ENV_DUCKDB,
    ENV_FRONT_SECRET,
    ENV_FRONT_UPSTREAM,
    ENV_STATE_DIR,
    MAX_UPLOAD_MB,
    bus_to_json,
)
from events.jetstream import BusSettings
from events.nats_server import free_port

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
            "--client.toolbarMode", "viewer", "--server.maxUploadSize", str(MAX_UPLOAD_MB),
            "--server.enableXsrfProtection", "true"]


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
        _stop_proc(self.proc, timeout_s)

    def __enter__(self) -> DashboardProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stop_proc(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM to the child's process group, SIGKILL if it outlives ``timeout_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


# --------------------------------------------------------------------------- the front


ENV_TLS_CERT = "LASTMILE_FRONT_TLS_CERT"
ENV_TLS_KEY = "LASTMILE_FRONT_TLS_KEY"
ENV_TRUSTED_PROXIES = "LASTMILE_FRONT_TRUSTED_PROXIES"


def front_command(port: int, host: str = "127.0.0.1",
                  environ: dict[str, str] | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    cmd = [sys.executable, "-m", "dashboards.front", "--host", host, "--port", str(port),
           "--log-level", os.environ.get("LASTMILE_FRONT_LOG_LEVEL", "warning")]
    if env.get(ENV_TLS_CERT) and env.get(ENV_TLS_KEY):
        cmd += ["--tls-cert", env[ENV_TLS_CERT], "--tls-key", env[ENV_TLS_KEY]]
    if env.get(ENV_TRUSTED_PROXIES):
        cmd += ["--trusted-proxies", env[ENV_TRUSTED_PROXIES]]
    return cmd


@dataclass
class PagesProcess:
    """Streamlit behind the front, both child processes, started and stopped together.
    ``url`` is the front's (the only address to give people)."""

    duckdb_path: Path
    bus: BusSettings | None
    port: int
    host: str = "127.0.0.1"
    log_path: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    state_dir: Path | None = None
    streamlit: DashboardProcess | None = field(default=None, repr=False)
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)  # the front

    @property
    def scheme(self) -> str:
        env = {**os.environ, **self.extra_env}
        return "https" if env.get(ENV_TLS_CERT) and env.get(ENV_TLS_KEY) else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> PagesProcess:
        secret = secrets.token_urlsafe(32)
        env = {**self.extra_env, ENV_FRONT_SECRET: secret}
        self.streamlit = DashboardProcess(self.duckdb_path, self.bus, free_port(),
                                          log_path=self.log_path, extra_env=env,
                                          state_dir=self.state_dir).start(timeout_s)
        full = {**dashboard_env(self.duckdb_path, self.bus, state_dir=self.state_dir),
                **env, ENV_FRONT_UPSTREAM: self.streamlit.url}
        with contextlib.ExitStack() as files:
            sink: Any = subprocess.DEVNULL
            if self.log_path is not None:
                sink = files.enter_context(open(self.log_path, "ab"))  # noqa: SIM115
            self.proc = subprocess.Popen(front_command(self.port, self.host, full), env=full,
                                         stdout=sink, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.poll() is not None:
                self.stop()
                raise DashboardError("the pages' front exited"
                                     + (f"; see {self.log_path}" if self.log_path else ""))
            if self.healthy():
                return self
            time.sleep(0.2)
        self.stop()
        raise DashboardError(f"the pages' front did not answer on {self.url} within "
                             f"{timeout_s:.0f}s")

    def healthy(self) -> bool:
        import ssl

        ctx = ssl._create_unverified_context() if self.scheme == "https" else None  # noqa: S323
        try:
            with urllib.request.urlopen(f"{self.url}/_lm/health", timeout=1,
                                        context=ctx) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def poll(self) -> int | None:
        """The exit code of whichever child exited first; None while both run."""
        for p in (self.proc, self.streamlit.proc if self.streamlit else None):
            if p is not None and p.poll() is not None:
                return p.returncode
        return None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _stop_proc(self.proc, timeout_s)
        if self.streamlit is not None:
            self.streamlit.stop(timeout_s)

    def __enter__(self) -> PagesProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
